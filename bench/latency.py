"""`python -m bench latency BUNDLE [BUNDLE...]`: end-to-end tail latency of the real server.

For every bundle (its n, k are those of the code measured: the bundle's first, or every
bundle's `--coding N,K`; pass one bundle per k to compare k's) and every mode, the real
server is started as a subprocess and driven over HTTP by a separate load-generator
process (bench/loadgen.py):

- `paper`: the paper's setup. `num_queries` queries sent in waves of k x
  `concurrency_per_k` (the next wave when the last is answered); the server's
  `--fault-straggler-per-group` delays exactly one uniformly random worker of the first k
  in each coding group by `delay_ms`.
- `poisson`: open-loop Poisson arrivals at each of `poisson_rates` (queries/s), same faults.

Modes: `reference` is the uncoded server *without* stragglers (what the paper calls the
no-straggler latency) and `coded-clean` the coded server without stragglers (what coding
costs when nothing straggles); `uncoded`, `replication`, `parm`, `approxifer`, `coded` run
with the stragglers. A bundle without parm.onnx skips `parm` (recorded as skipped).
One JSON record (stats, 41-point latency quantile curves, configuration, machine) and one
PNG go to `out_dir`; raw per-request records and server logs stay under `run_dir`.

Under load (`--load-fractions F1,F2,...`: this replaces the two parts above; one bundle):
open-loop tail latency at fractions of the server's own capacity, with and without faults.

1. Capacity, measured in the same run: closed-loop throughput of the `uncoded` server
   without faults, `capacity_concurrency` clients sending batch-1 binary requests for
   `capacity_duration_s`; the coded server's is measured and recorded the same way. The
   offered rates are fraction x the uncoded capacity.
2. For every `--load-modes` mode (parm skipped, with the reason, when the bundle has no
   parm.onnx) and every `--load-faults` setting, one server run with Poisson arrivals
   (bench/loadgen.py, latency from the scheduled send time) at each rate, `load_queries`
   queries per point: p50 / p99 / p99.9, goodput (200 responses/s), failures, reconstructed
   fraction. Faults: `none`; `straggler`, the paper's one straggler per group
   (`--fault-delay-ms D --fault-straggler-per-group --fault-seed S`); `delay-prob`, every
   worker call delayed D ms with probability `delay_prob` (`--fault-delay-ms D
   --fault-delay-prob P --fault-seed S`); D = `delay_ms`, S = `seed`. Each point also
   records whether the load generator kept to its schedule (achieved / scheduled send
   rate >= 1 - `send_rate_tolerance`, and whether `max_in_flight` requests were open).
3. The floor: the same load generator, pattern and rates against bench/echo.py, a bare
   aiohttp server that answers at once.
4. Targets at half the uncoded capacity (`LOAD_TARGETS`, reported, never asserted): no
   faults, uncoded p99.9 <= 5 x its p50 and coded p99.9 <= 1.5 x uncoded p99.9; with
   `delay-prob`, coded p99.9 <= 0.3 x uncoded p99.9; with `straggler`, coded p99.9 <= 1.1 x
   coded without faults; and the coded reconstructed fraction without faults (reconstructed
   answers are approximate, so it bounds how much of the served accuracy is exact).

Output: `load-latency{-tag}.json` (config, machine, capacity, floor, table, targets) and
`.png` (p99.9 against load, one panel per fault setting, the floor dashed). The full run
(defaults: 4 fractions x 5 modes x 3 fault settings, 8,000 queries per point) takes about
20-25 minutes on an idle 2-core CPU where the uncoded capacity of bundles/mnist-default is
~950 q/s (the time scales as 1 / capacity); the log gives the estimate once it is known:

    python -m bench latency bundles/mnist-default --load-fractions 0.3,0.5,0.7,0.9 --tag mnist-default
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code, refuse_coding_in
from bench.errors import BenchError
from bench.loadgen import LoadConfig, LoadgenError, LoadRecord, send_stats, summarize_record
from bench.machine import machine_info, machine_label
from bench.serverproc import BenchProcessError, ServerProcess, install_sigterm_handler, run_loadgen
from kernels.configs import add_dataclass_flags, dataclass_values, field_names, strict_from_dict
from runtime.manifest import MANIFEST_NAME, PARM_FILE

logger = logging.getLogger(__name__)

MODES = ("reference", "coded-clean", "uncoded", "replication", "parm", "approxifer", "coded")
# Modes run without fault injection, and the server mode each one runs.
CLEAN_MODES = {"reference": "uncoded", "coded-clean": "coded"}
QUANTILES = np.concatenate([np.linspace(0.0, 0.9, 10), np.linspace(0.91, 0.99, 9),
                            np.linspace(0.991, 0.999, 9), [0.9995, 1.0]])  # tail-dense CDF grid

# Under load: the server modes, the fault settings, and the load the targets are read at.
LOAD_MODES = ("uncoded", "replication", "parm", "approxifer", "coded")
LOAD_FAULTS = ("none", "straggler", "delay-prob")
CAPACITY_MODES = ("uncoded", "coded")  # closed-loop capacity of both; rates come from the first
TARGET_FRACTION = 0.5
MAX_CAPACITY_RPS = 20_000  # sizes the capacity run's request cap (the run stops at its duration)
LOADGEN_START_S = 1.0  # rough cost of one load-generator process, for the duration estimate
# Not `latency*.json`: bench/report.py renders those as paper / Poisson records.
LOAD_RECORD_NAME = "load-latency{suffix}.json"


class LatencyBenchError(BenchError):
    """Invalid latency-benchmark configuration."""


@dataclass
class LatencyConfig:
    bundles: tuple[str, ...] = ()
    coding: str | None = None  # the code every bundle is served with, "N,K"; None = each one's first
    modes: tuple[str, ...] = MODES
    num_queries: int = 5000
    delay_ms: float = 100.0
    concurrency_per_k: int = 1
    poisson_rates: tuple[float, ...] = ()
    poisson_queries: int = 1000
    warmup_requests: int = 50
    max_queue_delay_ms: float = 5.0
    server_args: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("thread",)  # --workers-backend of each run, side by side
    ray_args: tuple[str, ...] = ()  # extra server flags of the ray backend's runs only
    seed: int = 0
    ready_timeout_s: float = 180.0
    out_dir: str = "bench/results/serving"
    run_dir: str = "runs/bench/latency"
    tag: str = ""
    # Under load (non-empty `load_fractions` runs it instead of the paper / Poisson parts).
    load_fractions: tuple[float, ...] = ()
    load_modes: tuple[str, ...] = LOAD_MODES
    load_faults: tuple[str, ...] = LOAD_FAULTS
    load_queries: int = 8000
    load_warmup_requests: int = 200  # per server (capacity ones too), closed loop at capacity_concurrency
    delay_prob: float = 0.1
    capacity_concurrency: int = 32
    capacity_duration_s: float = 8.0
    send_rate_tolerance: float = 0.05

    def __post_init__(self) -> None:
        self.bundles = tuple(str(b) for b in self.bundles)
        self.modes = tuple(self.modes)
        self.poisson_rates = tuple(float(r) for r in self.poisson_rates)
        self.server_args = tuple(self.server_args)
        self.backends = tuple(self.backends)
        self.ray_args = tuple(self.ray_args)
        self.load_fractions = tuple(float(f) for f in self.load_fractions)
        self.load_modes = tuple(self.load_modes)
        self.load_faults = tuple(self.load_faults)
        if not self.bundles:
            raise LatencyBenchError("need at least one BUNDLE directory")
        from runtime.worker import BACKENDS

        if not self.backends or any(b not in BACKENDS for b in self.backends):
            raise LatencyBenchError(f"backends must be a non-empty subset of {tuple(BACKENDS)}, "
                                    f"got {list(self.backends)}")
        if self.load_fractions and self.backends != ("thread",):
            raise LatencyBenchError("--backends is for the paper and Poisson parts; the under-load "
                                    "run uses the thread backend")
        for b in self.bundles:
            if not (Path(b) / MANIFEST_NAME).is_file():
                raise LatencyBenchError(f"{b}: not a bundle (no {MANIFEST_NAME}); build one with "
                                        "`python -m export` or `python -m bench.devbundle`")
        self.coding = check_coding(self.coding, self.bundles, LatencyBenchError)
        refuse_coding_in("--server-args", self.server_args, LatencyBenchError)
        refuse_coding_in("--ray-args", self.ray_args, LatencyBenchError)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise LatencyBenchError(f"modes must be a non-empty subset of {MODES}, got {list(self.modes)}")
        for name in ("num_queries", "concurrency_per_k", "poisson_queries"):
            if getattr(self, name) < 1:
                raise LatencyBenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_requests < 0 or self.delay_ms < 0 or self.max_queue_delay_ms < 0:
            raise LatencyBenchError("--warmup-requests, --delay-ms, --max-queue-delay-ms must be >= 0")
        if any(r <= 0 for r in self.poisson_rates):
            raise LatencyBenchError(f"--poisson-rates must be > 0, got {list(self.poisson_rates)}")
        self._check_load()

    def _check_load(self) -> None:
        """The under-load flags; checked even when unused, so a typo never waits for a run."""
        if any(not (f > 0 and math.isfinite(f)) for f in self.load_fractions):
            raise LatencyBenchError(f"--load-fractions must be finite and > 0, got {list(self.load_fractions)}")
        if len(set(self.load_fractions)) != len(self.load_fractions):
            raise LatencyBenchError(f"--load-fractions has a repeat: {list(self.load_fractions)}")
        for name, allowed in (("load_modes", LOAD_MODES), ("load_faults", LOAD_FAULTS)):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
                raise LatencyBenchError(f"--{name.replace('_', '-')} must be a non-empty subset of "
                                        f"{','.join(allowed)} without repeats, got {list(values)}")
        for name in ("load_queries", "capacity_concurrency"):
            if getattr(self, name) < 2:
                raise LatencyBenchError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(self, name)}")
        if self.load_warmup_requests < 0:
            raise LatencyBenchError(f"--load-warmup-requests must be >= 0, got {self.load_warmup_requests}")
        if not self.capacity_duration_s > 0:
            raise LatencyBenchError(f"--capacity-duration-s must be > 0, got {self.capacity_duration_s}")
        if not 0 < self.delay_prob <= 1:
            raise LatencyBenchError(f"--delay-prob must be in (0, 1], got {self.delay_prob}")
        if not 0 <= self.send_rate_tolerance < 1:
            raise LatencyBenchError(f"--send-rate-tolerance must be in [0, 1), got {self.send_rate_tolerance}")
        if self.load_fractions and len(self.bundles) != 1:
            raise LatencyBenchError(f"--load-fractions measures one bundle per run, got {len(self.bundles)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyConfig:
        return strict_from_dict(cls, d, LatencyBenchError)


def server_args_for(mode: str, config: LatencyConfig) -> list[str]:
    """Server flags for one mode: `reference` / `coded-clean` run without faults."""
    args = ["--mode", CLEAN_MODES.get(mode, mode), *coding_server_args(config.coding),
            "--max-queue-delay-ms", str(config.max_queue_delay_ms), "--log-level", "WARNING"]
    if mode not in CLEAN_MODES and config.delay_ms > 0:
        args += ["--fault-delay-ms", str(config.delay_ms), "--fault-straggler-per-group",
                 "--fault-seed", str(config.seed)]
    return args + list(config.server_args)


def quantile_curve(record: LoadRecord) -> dict[str, list[float]]:
    ok = np.array([lat for lat, st in zip(record.latency_ms, record.status, strict=True) if st == 200])
    return {"fraction": QUANTILES.round(4).tolist(),
            "latency_ms": np.quantile(ok, QUANTILES).round(3).tolist() if ok.size else []}


def _measure(srv: ServerProcess, load: LoadConfig, run_dir: Path, name: str, timeout_s: float) -> dict:
    record = run_loadgen(load, run_dir / f"{name}.json", run_dir / f"{name}.loadgen.log", timeout_s)
    stats = summarize_record(record)
    logger.info("%-28s p50 %7.1f  p99 %7.1f  p99.9 %7.1f  mean %7.1f ms  %6.1f q/s  failed %d  recon %.2f",
                name, stats["p50_ms"], stats["p99_ms"], stats["p99.9_ms"], stats["mean_ms"],
                stats["throughput_rps"], stats["failed"], stats["reconstructed_fraction"])
    return {"stats": stats, "errors": record.errors, "quantiles": quantile_curve(record)}


def bench_bundle(bundle: str, config: LatencyConfig, run_dir: Path, backend: str = "thread"
                 ) -> dict[str, Any]:
    manifest = load_code(bundle, config.coding)
    n, k = manifest.coding.n, manifest.coding.k
    concurrency = k * config.concurrency_per_k
    result: dict[str, Any] = {"bundle": bundle, "code": manifest.code.label, "n": n, "k": k,
                              "delay_ms": config.delay_ms,
                              "backend": backend,
                              "model_name": manifest.model_name, "concurrency": concurrency,
                              "provenance_note": manifest.provenance.get("note"),
                              "modes": [], "skipped": {}}
    for mode in config.modes:
        if mode == "parm" and manifest.parm is None:
            result["skipped"][mode] = f"bundle has no {PARM_FILE}"
            continue
        args = [*server_args_for(mode, config), "--workers-backend", backend,
                *(config.ray_args if backend == "ray" else ())]
        tag = f"k{k}-{backend}-{mode}"
        entry: dict[str, Any] = {"mode": mode, "server_args": args}
        base = LoadConfig(model_name=manifest.model_name, input_name=manifest.input.name,
                          input_shape=manifest.input.shape, seed=config.seed)
        try:
            with ServerProcess(bundle, args, run_dir / f"{tag}.server.log",
                               ready_timeout_s=config.ready_timeout_s) as srv:
                entry["server_ready_s"] = round(srv.ready_s or 0.0, 2)
                paper = LoadConfig(**{**asdict(base), "url": srv.url, "pattern": "waves",
                                      "num_requests": config.num_queries, "concurrency": concurrency,
                                      "warmup_requests": config.warmup_requests})
                timeout_s = 120 + config.num_queries / concurrency * (config.delay_ms / 1e3 + 0.5)
                entry["paper"] = _measure(srv, paper, run_dir, f"{tag}-paper", timeout_s)
                entry["poisson"] = []
                for rate in config.poisson_rates:
                    load = LoadConfig(**{**asdict(base), "url": srv.url, "pattern": "poisson",
                                         "rate_per_s": rate, "num_requests": config.poisson_queries,
                                         "warmup_requests": 0})
                    timeout_s = 120 + 3 * config.poisson_queries / rate
                    point = _measure(srv, load, run_dir, f"{tag}-poisson{rate:g}", timeout_s)
                    point["rate_per_s"] = rate
                    entry["poisson"].append(point)
        except BenchProcessError as exc:
            logger.error("mode %s on %s failed: %s", mode, bundle, exc)
            entry["error"] = str(exc)[:2000]
        result["modes"].append(entry)
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, evaluated on the paper scenario (reported, never asserted)."""
    p999 = {m["mode"]: m["paper"]["stats"]["p99.9_ms"] for m in result["modes"] if "paper" in m}
    out: dict[str, Any] = {"p99.9_ms": p999}
    if "coded" in p999 and "reference" in p999:
        ratio = p999["coded"] / p999["reference"]
        out["coded_over_reference"] = round(ratio, 3)
        out["coded_within_1.05x_reference"] = bool(ratio <= 1.05)
    if "coded" in p999 and "coded-clean" in p999:
        out["coded_over_coded_clean"] = round(p999["coded"] / p999["coded-clean"], 3)
    if "coded" in p999 and "uncoded" in p999:
        ratio = p999["coded"] / p999["uncoded"]
        out["coded_over_uncoded"] = round(ratio, 3)
        out["coded_within_0.5x_uncoded"] = bool(ratio <= 0.5)
    return out


# ---------------------------------------------------------------------------------------
# Under load: capacity, open-loop Poisson points per (mode, fault, rate), the echo floor.


@dataclass(frozen=True)
class LoadTarget:
    """`stat` of (mode, fault) <= factor x `ref_stat` of (ref_mode, ref_fault), both measured
    at the same offered load (TARGET_FRACTION of the uncoded capacity)."""

    name: str
    mode: str
    fault: str
    factor: float
    ref_mode: str
    ref_fault: str
    ref_stat: str = "p99.9_ms"
    stat: str = "p99.9_ms"

    def text(self) -> str:
        return (f"{self.mode} {self.stat[:-3]} ({self.fault}) <= {self.factor:g} x "
                f"{self.ref_mode} {self.ref_stat[:-3]} ({self.ref_fault})")


LOAD_TARGETS = (
    LoadTarget("uncoded_p99.9_within_5x_its_p50", "uncoded", "none", 5.0, "uncoded", "none", ref_stat="p50_ms"),
    LoadTarget("coded_p99.9_within_1.5x_uncoded", "coded", "none", 1.5, "uncoded", "none"),
    LoadTarget("coded_p99.9_within_0.3x_uncoded_delay_prob", "coded", "delay-prob", 0.3, "uncoded", "delay-prob"),
    LoadTarget("coded_straggler_p99.9_within_1.1x_coded_no_faults", "coded", "straggler", 1.1, "coded", "none"),
)


def fault_args(fault: str, config: LatencyConfig) -> list[str]:
    """Server flags of one fault setting (see the module docstring)."""
    common = ["--fault-delay-ms", str(config.delay_ms), "--fault-seed", str(config.seed)]
    if fault == "none":
        return []
    if fault == "straggler":
        return [*common, "--fault-straggler-per-group"]
    if fault == "delay-prob":
        return [*common, "--fault-delay-prob", str(config.delay_prob)]
    raise LatencyBenchError(f"unknown fault setting {fault!r}; one of {LOAD_FAULTS}")


def fault_label(fault: str, config: LatencyConfig) -> str:
    if fault == "straggler":
        return f"one straggler per group, +{config.delay_ms:g} ms"
    if fault == "delay-prob":
        return f"every call +{config.delay_ms:g} ms w.p. {config.delay_prob:g}"
    return "no faults"


def load_server_args(mode: str, fault: str, config: LatencyConfig) -> list[str]:
    return ["--mode", mode, *coding_server_args(config.coding), "--max-queue-delay-ms",
            str(config.max_queue_delay_ms), "--log-level", "WARNING", *fault_args(fault, config), *config.server_args]


def rates_for(capacity_rps: float, fractions: tuple[float, ...]) -> list[float]:
    """Offered rates (queries/s): each fraction of the measured capacity."""
    if not (capacity_rps > 0 and math.isfinite(capacity_rps)):
        raise LatencyBenchError(f"capacity must be a positive number of queries/s, got {capacity_rps}; "
                                "check the capacity server's log")
    return [round(f * capacity_rps, 3) for f in fractions]


def _base_load(manifest: Any, url: str, config: LatencyConfig) -> LoadConfig:
    return LoadConfig(url=url, model_name=manifest.model_name, input_name=manifest.input.name,
                      input_shape=manifest.input.shape, seed=config.seed)


def measure_capacity(bundle: str, manifest: Any, mode: str, config: LatencyConfig, run_dir: Path) -> dict[str, Any]:
    """Closed-loop goodput of `mode` without faults: batch-1 binary requests for a fixed time."""
    args = load_server_args(mode, "none", config)
    with ServerProcess(bundle, args, run_dir / f"capacity-{mode}.server.log",
                       ready_timeout_s=config.ready_timeout_s) as srv:
        cap_requests = MAX_CAPACITY_RPS * math.ceil(config.capacity_duration_s)
        load = LoadConfig(**{**asdict(_base_load(manifest, srv.url, config)), "pattern": "closed",
                             "concurrency": config.capacity_concurrency, "duration_s": config.capacity_duration_s,
                             "num_requests": cap_requests,
                             "warmup_requests": config.load_warmup_requests})
        timeout_s = 120 + 3 * config.capacity_duration_s
        record = run_loadgen(load, run_dir / f"capacity-{mode}.json", run_dir / f"capacity-{mode}.loadgen.log",
                             timeout_s)
    stats = summarize_record(record)
    logger.info("capacity %-8s %7.1f q/s (closed loop, %d clients, %.0f s; p50 %.1f ms, failed %d)", mode,
                stats["throughput_rps"], config.capacity_concurrency, config.capacity_duration_s,
                stats["p50_ms"], stats["failed"])
    return {"mode": mode, "server_args": args, "capacity_rps": stats["throughput_rps"], "stats": stats,
            "errors": record.errors, "server_ready_s": round(srv.ready_s or 0.0, 2)}


def load_point(record: LoadRecord, config: LatencyConfig) -> dict[str, Any]:
    """One (mode, fault, rate) measurement: latency stats, goodput, and the loadgen's own check."""
    sent = send_stats(record)
    sent["keeps_up"] = bool(sent["send_rate_ratio"] >= 1.0 - config.send_rate_tolerance)
    sent["in_flight_limit_reached"] = bool(sent["peak_in_flight"] >= sent["max_in_flight"])
    point: dict[str, Any] = {"loadgen": sent, "errors": record.errors}
    try:
        stats = summarize_record(record)
    except LoadgenError as exc:  # every request failed: keep the point, say why
        point["error"] = str(exc)
        return point
    stats["goodput_rps"] = stats["throughput_rps"]  # 200 responses/s over the point's wall time
    point["stats"] = stats
    return point


def _poisson_points(url: str, manifest: Any, fractions: tuple[float, ...], rates: list[float],
                    config: LatencyConfig, run_dir: Path, name: str) -> list[dict[str, Any]]:
    """Every rate against one running server (or the echo stub), warm-up before the first."""
    points = []
    for i, (fraction, rate) in enumerate(zip(fractions, rates, strict=True)):
        warmup = config.load_warmup_requests if i == 0 else 0
        load = LoadConfig(**{**asdict(_base_load(manifest, url, config)), "pattern": "poisson",
                             "rate_per_s": rate, "num_requests": config.load_queries,
                             "concurrency": config.capacity_concurrency, "warmup_requests": warmup})
        timeout_s = 120 + 4 * config.load_queries / rate + warmup
        tag = f"{name}-f{fraction:g}"
        record = run_loadgen(load, run_dir / f"{tag}.json", run_dir / f"{tag}.loadgen.log", timeout_s)
        point = {"fraction": fraction, "rate_per_s": rate, **load_point(record, config)}
        _log_point(tag, point)
        points.append(point)
    return points


def _log_point(tag: str, point: dict[str, Any]) -> None:
    s, lg = point.get("stats"), point["loadgen"]
    if s is None:
        logger.warning("%-34s %7.1f q/s: %s", tag, point["rate_per_s"], point["error"])
        return
    logger.info("%-34s %7.1f q/s  p50 %7.1f  p99 %7.1f  p99.9 %7.1f ms  goodput %6.1f  failed %d  recon %.3f%s",
                tag, point["rate_per_s"], s["p50_ms"], s["p99_ms"], s["p99.9_ms"], s["goodput_rps"], s["failed"],
                s["reconstructed_fraction"], _behind_note(lg))


def _behind_note(sent: dict[str, Any]) -> str:
    """Why sends were late, if they were: an overloaded server (in-flight cap) or the client."""
    if sent["keeps_up"]:
        return ""
    why = "max_in_flight requests open: server overloaded" if sent["in_flight_limit_reached"] else "LOADGEN BEHIND"
    return f"  sent late, ratio {sent['send_rate_ratio']:.3f} ({why})"


def load_series(bundle: str, manifest: Any, mode: str, fault: str, rates: list[float], config: LatencyConfig,
                run_dir: Path) -> list[dict[str, Any]]:
    """One server run of (mode, fault) at every rate; rows of the table."""
    args = load_server_args(mode, fault, config)
    name = f"{mode}-{fault}"
    with ServerProcess(bundle, args, run_dir / f"{name}.server.log", ready_timeout_s=config.ready_timeout_s) as srv:
        points = _poisson_points(srv.url, manifest, config.load_fractions, rates, config, run_dir, name)
    return [{"mode": mode, "fault": fault, "server_args": args, **p} for p in points]


def load_floor(manifest: Any, rates: list[float], config: LatencyConfig, run_dir: Path) -> list[dict[str, Any]]:
    """The load generator against bench/echo.py at the same rates: the client's own latency."""
    from bench.echo import EchoProcess

    with EchoProcess(run_dir / "echo.server.log") as echo:
        points = _poisson_points(echo.url, manifest, config.load_fractions, rates, config, run_dir, "echo")
    return [{"mode": "echo", **p} for p in points]


def evaluate_target(target: LoadTarget, rows: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """Met / missed with the ratio, or why it could not be evaluated."""
    out: dict[str, Any] = {"target": target.text(), "factor": target.factor}
    row, ref = rows.get((target.mode, target.fault)), rows.get((target.ref_mode, target.ref_fault))
    for mode, fault, r in ((target.mode, target.fault, row), (target.ref_mode, target.ref_fault, ref)):
        if r is None or "stats" not in r:
            out.update(met=None, reason=f"no successful measurement of {mode} (fault {fault}) at this load")
            return out
    value, reference = row["stats"][target.stat], ref["stats"][target.ref_stat]
    ratio = value / reference
    out.update(value_ms=round(value, 3), reference_ms=round(reference, 3), ratio=round(ratio, 4),
               met=bool(ratio <= target.factor),
               loadgen_kept_up=bool(row["loadgen"]["keeps_up"] and ref["loadgen"]["keeps_up"]))
    return out


def load_targets(table: list[dict[str, Any]], fraction: float = TARGET_FRACTION) -> dict[str, Any]:
    """Every LOAD_TARGETS entry read at `fraction`, plus the coded reconstructed fraction."""
    rows = {(r["mode"], r["fault"]): r for r in table if math.isclose(r["fraction"], fraction)}
    out: dict[str, Any] = {"fraction": fraction}
    if not rows:
        out["reason"] = f"fraction {fraction:g} not measured: add it to --load-fractions"
    out["targets"] = {t.name: evaluate_target(t, rows) for t in LOAD_TARGETS}
    coded = rows.get(("coded", "none"))
    out["coded_reconstructed_fraction_no_faults"] = (
        coded["stats"]["reconstructed_fraction"] if coded and "stats" in coded else None)
    out["reconstructed_note"] = ("reconstructed answers are decoded, hence approximate: served accuracy is exact "
                                 "only on the rest")
    return out


def estimated_load_s(config: LatencyConfig, rates: list[float], num_series: int, server_start_s: float) -> float:
    """Seconds left after the capacity runs, if every server keeps up with every rate."""
    per_series = sum(config.load_queries / r + LOADGEN_START_S for r in rates)
    return (num_series + 1) * per_series + num_series * server_start_s  # + 1: the echo floor


def run_under_load(config: LatencyConfig) -> dict[str, Any]:
    bundle = config.bundles[0]
    manifest = load_code(bundle, config.coding)
    run_dir = Path(config.run_dir) / f"load-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    info = machine_info()
    logger.info("latency under load: %s", json.dumps(asdict(config)))
    logger.info("machine: %s", machine_label(info))
    t0 = time.perf_counter()
    capacity = {m: measure_capacity(bundle, manifest, m, config, run_dir) for m in CAPACITY_MODES}
    rates = rates_for(capacity[CAPACITY_MODES[0]]["capacity_rps"], config.load_fractions)
    skipped = {"parm": f"bundle has no {PARM_FILE}"} if manifest.parm is None and "parm" in config.load_modes else {}
    modes = [m for m in config.load_modes if m not in skipped]
    start_s = max(c["server_ready_s"] for c in capacity.values())
    logger.info("rates %s q/s; about %.0f min to go", rates,
                estimated_load_s(config, rates, len(modes) * len(config.load_faults), start_s + 2.0) / 60)
    floor = load_floor(manifest, rates, config, run_dir)
    table, series_errors = [], []
    for mode in modes:
        for fault in config.load_faults:
            try:
                table += load_series(bundle, manifest, mode, fault, rates, config, run_dir)
            except BenchProcessError as exc:
                logger.error("%s with fault %s failed: %s", mode, fault, exc)
                series_errors.append({"mode": mode, "fault": fault, "error": str(exc)[:2000]})
    record = {"benchmark": "latency-load", "config": asdict(config), "machine": info,
              "machine_after": {"load_average": machine_info()["load_average"]},
              "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
              "bundle": bundle, "code": manifest.code.label, "n": manifest.coding.n, "k": manifest.coding.k,
              "model_name": manifest.model_name,
              "provenance_note": manifest.provenance.get("note"),
              "percentiles": "numpy linear interpolation over successful requests; latency from the scheduled send",
              "capacity": {"rates_from": CAPACITY_MODES[0], "concurrency": config.capacity_concurrency,
                           "duration_s": config.capacity_duration_s, **capacity},
              "fractions": list(config.load_fractions), "rates_per_s": rates,
              "fault_settings": {f: {"label": fault_label(f, config), "server_args": fault_args(f, config)}
                                 for f in config.load_faults},
              "floor": floor, "table": table, "skipped": skipped, "series_errors": series_errors,
              "targets": load_targets(table)}
    _write_load_record(record, config, info)
    return record


def _write_load_record(record: dict[str, Any], config: LatencyConfig, info: dict[str, Any]) -> None:
    from bench.plots import load_latency_figure

    suffix = f"-{config.tag}" if config.tag else ""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / LOAD_RECORD_NAME.format(suffix=suffix)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    cap = record["capacity"][CAPACITY_MODES[0]]["capacity_rps"]
    title = (f"n={record['n']}, k={record['k']}: open-loop Poisson, {config.load_queries} queries/point, "
             f"uncoded capacity {cap:.0f} q/s ({config.capacity_concurrency} closed-loop clients) — "
             f"{machine_label(info)}")
    if "UNTRAINED" in str(record["provenance_note"]):
        title += " — UNTRAINED bundle (timing only)"
    png = load_latency_figure(record, json_path.with_suffix(".png"), title)
    logger.info("wrote %s and %s", json_path, png)
    for name, t in record["targets"]["targets"].items():
        logger.info("target %s: %s", name, json.dumps(t))
    logger.info("coded reconstructed fraction, no faults: %s",
                record["targets"]["coded_reconstructed_fraction_no_faults"])


def run(config: LatencyConfig) -> dict[str, Any]:
    if config.load_fractions:
        return run_under_load(config)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = Path(config.run_dir) / stamp
    info = machine_info()
    logger.info("latency bench: %s", json.dumps(asdict(config)))
    logger.info("machine: %s", machine_label(info))
    if "ray" in config.backends and "--ray-address" not in config.ray_args:
        from bench.netns_cluster import require_loopback_only

        require_loopback_only("--backends ray")
    t0 = time.perf_counter()
    bundles = [bench_bundle(b, config, run_dir, backend) for b in config.bundles
               for backend in config.backends]
    record = {"benchmark": "latency", "config": asdict(config), "machine": info,
              "machine_after": {"load_average": machine_info()["load_average"]},
              "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
              "percentiles": "numpy linear interpolation over successful requests",
              "bundles": bundles, "backend_ratios": backend_ratios(bundles)}
    suffix = f"-{config.tag}" if config.tag else ""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"latency{suffix}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    from bench.plots import latency_figure

    ks = ",".join(str(b["k"]) for b in bundles)
    title = (f"Coded-InvNet server latency, k={ks}, {config.num_queries} queries/mode, "
             f"+{config.delay_ms:g} ms straggler/group — {machine_label(info)}")
    if any("UNTRAINED" in str(b["provenance_note"]) for b in bundles):
        title += " — UNTRAINED real-architecture bundles (timing only)"
    png = latency_figure(bundles, out_dir / f"latency{suffix}.png", title)
    logger.info("wrote %s and %s", json_path, png)
    for b in bundles:
        logger.info("k=%d %s backend targets: %s", b["k"], b["backend"], json.dumps(b["targets"]))
    if record["backend_ratios"]:
        logger.info("backend ratios: %s", json.dumps(record["backend_ratios"]))
    return record


def backend_ratios(bundles: list[dict[str, Any]]) -> dict[str, Any]:
    """Per bundle and mode, each backend's paper-setup p50 and p99.9 over the thread
    backend's (the Ray target: p50 <= 2 x thread at batch 1)."""
    stats = {(b["bundle"], b["backend"], m["mode"]): m["paper"]["stats"]
             for b in bundles for m in b["modes"] if "paper" in m}
    out: dict[str, Any] = {}
    for (bundle, backend, mode), s in stats.items():
        base = stats.get((bundle, "thread", mode))
        if backend == "thread" or base is None:
            continue
        out.setdefault(f"{bundle} {backend}/thread", {})[mode] = {
            "p50": round(s["p50_ms"] / base["p50_ms"], 3),
            "p99.9": round(s["p99.9_ms"] / base["p99.9_ms"], 3)}
    return out


# Flags that take a comma (or, for server args, space) separated list; the rest map one-to-one.
_LIST_FLAGS = ("bundles", "modes", "poisson_rates", "server_args", "backends", "ray_args", "load_fractions",
               "load_modes", "load_faults")
# The under-load flags, shown in their own help group.
_LOAD_FIELDS = ("load_queries", "load_warmup_requests", "delay_prob", "capacity_concurrency",
                "capacity_duration_s", "send_rate_tolerance")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories (one per k)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list (default %(default)s)")
    p.add_argument("--poisson-rates", default="", help="comma list of queries/s, e.g. 20,50")
    p.add_argument("--server-args", default="", help="extra server flags, space separated")
    p.add_argument("--backends", default="thread", help="comma list of --workers-backend values, each "
                   "run side by side (ray: inside a private network namespace, see bench/netns_cluster.py)")
    p.add_argument("--ray-args", default="", help="extra server flags of the ray backend's runs only, space "
                   "separated (e.g. --ray-address HOST:6379)")
    add_dataclass_flags(p, LatencyConfig, skip=_LIST_FLAGS + _LOAD_FIELDS, helps={
        "num_queries": "queries per mode in the paper setup (paper: 5000)",
        "delay_ms": "straggler delay, one worker per group (paper: 100); also the under-load fault delay",
        "tag": "suffix of the result file names",
        "coding": f"{CODING_HELP}; every BUNDLE must hold it",
    })
    g = p.add_argument_group("under load", "open-loop Poisson at fractions of the measured uncoded capacity "
                             "(replaces the paper and Poisson parts; one bundle)")
    g.add_argument("--load-fractions", default="", help="comma list of fractions of the uncoded capacity, "
                   "e.g. 0.3,0.5,0.7,0.9 (empty: no under-load run)")
    g.add_argument("--load-modes", default=",".join(LOAD_MODES), help="comma list (default %(default)s)")
    g.add_argument("--load-faults", default=",".join(LOAD_FAULTS), help="comma list (default %(default)s)")
    add_dataclass_flags(g, LatencyConfig, skip=[f for f in field_names(LatencyConfig) if f not in _LOAD_FIELDS],
                        helps={"load_queries": "Poisson queries per (mode, fault, rate) point",
                               "load_warmup_requests": "closed-loop warm-up requests per server (capacity "
                                                       "runs too), before its first measurement",
                               "delay_prob": "the delay-prob fault: each worker call delayed --delay-ms with this "
                                             "probability",
                               "capacity_concurrency": "closed-loop clients of the capacity runs",
                               "capacity_duration_s": "seconds of each capacity run",
                               "send_rate_tolerance": "a point's loadgen is behind when achieved / scheduled send "
                                                      "rate < 1 - this"})
    return p


def _comma(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def config_from_args(args: argparse.Namespace) -> LatencyConfig:
    return LatencyConfig(
        bundles=tuple(args.bundles), modes=tuple(m for m in args.modes.split(",") if m),
        poisson_rates=tuple(float(r) for r in _comma(args.poisson_rates)),
        server_args=tuple(args.server_args.split()), backends=tuple(_comma(args.backends)),
        ray_args=tuple(args.ray_args.split()),
        load_fractions=tuple(float(f) for f in _comma(args.load_fractions)),
        load_modes=tuple(_comma(args.load_modes)), load_faults=tuple(_comma(args.load_faults)),
        **dataclass_values(LatencyConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS}))


def main(argv: list[str] | None = None) -> int:
    install_sigterm_handler()
    # INFO for our own loggers only: torch.onnx / onnxscript are chatty at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    try:
        config = config_from_args(build_parser().parse_args(argv))
    except (LatencyBenchError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    run(config)
    return 0
