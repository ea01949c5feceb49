"""`python -m bench latency BUNDLE [BUNDLE...]`: end-to-end tail latency of the real server.

For every bundle (its k comes from the manifest; pass one bundle per k to compare k's) and
every mode, the real server is started as a subprocess and driven over HTTP by a separate
load-generator process (bench/loadgen.py):

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
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.loadgen import LoadConfig, LoadRecord, summarize_record
from bench.machine import machine_info, machine_label
from bench.serverproc import BenchProcessError, ServerProcess, install_sigterm_handler, run_loadgen
from kernels.configs import add_dataclass_flags, dataclass_values, strict_from_dict
from runtime.manifest import MANIFEST_NAME, PARM_FILE

logger = logging.getLogger(__name__)

MODES = ("reference", "coded-clean", "uncoded", "replication", "parm", "approxifer", "coded")
# Modes run without fault injection, and the server mode each one runs.
CLEAN_MODES = {"reference": "uncoded", "coded-clean": "coded"}
QUANTILES = np.concatenate([np.linspace(0.0, 0.9, 10), np.linspace(0.91, 0.99, 9),
                            np.linspace(0.991, 0.999, 9), [0.9995, 1.0]])  # tail-dense CDF grid


class LatencyBenchError(BenchError):
    """Invalid latency-benchmark configuration."""


@dataclass
class LatencyConfig:
    bundles: tuple[str, ...] = ()
    modes: tuple[str, ...] = MODES
    num_queries: int = 5000
    delay_ms: float = 100.0
    concurrency_per_k: int = 1
    poisson_rates: tuple[float, ...] = ()
    poisson_queries: int = 1000
    warmup_requests: int = 50
    max_queue_delay_ms: float = 5.0
    server_args: tuple[str, ...] = ()
    seed: int = 0
    ready_timeout_s: float = 180.0
    out_dir: str = "bench/results/serving"
    run_dir: str = "runs/bench/latency"
    tag: str = ""

    def __post_init__(self) -> None:
        self.bundles = tuple(str(b) for b in self.bundles)
        self.modes = tuple(self.modes)
        self.poisson_rates = tuple(float(r) for r in self.poisson_rates)
        self.server_args = tuple(self.server_args)
        if not self.bundles:
            raise LatencyBenchError("need at least one BUNDLE directory")
        for b in self.bundles:
            if not (Path(b) / MANIFEST_NAME).is_file():
                raise LatencyBenchError(f"{b}: not a bundle (no {MANIFEST_NAME}); build one with "
                                        "`python -m export` or `python -m bench.devbundle`")
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyConfig:
        return strict_from_dict(cls, d, LatencyBenchError)


def server_args_for(mode: str, config: LatencyConfig) -> list[str]:
    """Server flags for one mode: `reference` / `coded-clean` run without faults."""
    args = ["--mode", CLEAN_MODES.get(mode, mode),
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


def bench_bundle(bundle: str, config: LatencyConfig, run_dir: Path) -> dict[str, Any]:
    from runtime.manifest import Manifest

    manifest = Manifest.load(bundle)
    n, k = manifest.coding.n, manifest.coding.k
    concurrency = k * config.concurrency_per_k
    result: dict[str, Any] = {"bundle": bundle, "n": n, "k": k, "delay_ms": config.delay_ms,
                              "model_name": manifest.model_name, "concurrency": concurrency,
                              "provenance_note": manifest.provenance.get("note"),
                              "modes": [], "skipped": {}}
    for mode in config.modes:
        if mode == "parm" and manifest.parm is None:
            result["skipped"][mode] = f"bundle has no {PARM_FILE}"
            continue
        args = server_args_for(mode, config)
        tag = f"k{k}-{mode}"
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


def run(config: LatencyConfig) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = Path(config.run_dir) / stamp
    info = machine_info()
    logger.info("latency bench: %s", json.dumps(asdict(config)))
    logger.info("machine: %s", machine_label(info))
    t0 = time.perf_counter()
    bundles = [bench_bundle(b, config, run_dir) for b in config.bundles]
    record = {"benchmark": "latency", "config": asdict(config), "machine": info,
              "machine_after": {"load_average": machine_info()["load_average"]},
              "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
              "percentiles": "numpy linear interpolation over successful requests",
              "bundles": bundles}
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
        logger.info("k=%d targets: %s", b["k"], json.dumps(b["targets"]))
    return record


# Flags that take a comma (or, for server args, space) separated list; the rest map one-to-one.
_LIST_FLAGS = ("bundles", "modes", "poisson_rates", "server_args")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories (one per k)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list (default %(default)s)")
    p.add_argument("--poisson-rates", default="", help="comma list of queries/s, e.g. 20,50")
    p.add_argument("--server-args", default="", help="extra server flags, space separated")
    add_dataclass_flags(p, LatencyConfig, skip=_LIST_FLAGS, helps={
        "num_queries": "queries per mode in the paper setup (paper: 5000)",
        "delay_ms": "straggler delay, one worker per group (paper: 100)",
        "tag": "suffix of the result file names",
    })
    return p


def config_from_args(args: argparse.Namespace) -> LatencyConfig:
    return LatencyConfig(
        bundles=tuple(args.bundles), modes=tuple(m for m in args.modes.split(",") if m),
        poisson_rates=tuple(float(r) for r in args.poisson_rates.split(",") if r),
        server_args=tuple(args.server_args.split()),
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
