"""`python -m bench throughput [BUNDLE]`: server queries/s against raw ONNX Runtime f.

Raw: the bundle's f.onnx (and each encoder) in ONNX Runtime on this machine, one query
(group) per run, as the server's workers run them, best of (a) one session using all usable
CPUs and (b) one single-threaded session per CPU driven from parallel threads; f also at
`raw_batch_size` for reference. Server: the real server (each of `modes`, no faults) driven
closed loop by a separate load-generator process at `concurrency` clients.

In coded mode n workers compute f for every k queries, so on a machine whose CPUs the f
computations saturate the best the server can do is raw x k/n: the runtime's overhead ratio
is server / (raw x k/n), the issue's target >= 0.9. A second ceiling also charges the n-k
encoders (which run on the same CPUs here). Uncoded mode's ceiling is raw f itself. The load
generator shares the CPUs with the server here, which counts against the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.loadgen import LoadConfig, summarize_record
from bench.machine import machine_info, machine_label, usable_cpu_count
from bench.overhead import make_session
from bench.serverproc import ServerProcess, install_sigterm_handler, run_loadgen
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import ENCODER_IO, F_IO, MANIFEST_NAME

logger = logging.getLogger(__name__)


class ThroughputBenchError(BenchError):
    """Invalid throughput-benchmark configuration."""


@dataclass
class ThroughputConfig:
    bundle: str = "bundles/mnist-default"
    modes: tuple[str, ...] = ("coded", "uncoded")
    num_requests: int = 3000
    concurrency: int = 32
    warmup_requests: int = 200
    raw_duration_s: float = 5.0
    raw_batch_size: int = 64
    max_queue_delay_ms: float = 2.0
    server_args: tuple[str, ...] = ()
    seed: int = 0
    out_dir: str = "bench/results/serving"
    run_dir: str = "runs/bench/throughput"
    tag: str = ""

    def __post_init__(self) -> None:
        self.server_args = tuple(self.server_args)
        self.modes = tuple(self.modes)
        if not self.modes or set(self.modes) - {"coded", "uncoded"}:
            raise ThroughputBenchError(f"--modes must be a non-empty subset of coded,uncoded, got {list(self.modes)}")
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise ThroughputBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        for name in ("num_requests", "concurrency", "raw_batch_size"):
            if getattr(self, name) < 1:
                raise ThroughputBenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.raw_duration_s <= 0 or self.warmup_requests < 0:
            raise ThroughputBenchError("--raw-duration-s must be > 0 and --warmup-requests >= 0")


def _images_per_s(sessions: list, feeds: dict[str, np.ndarray], duration_s: float) -> float:
    """Run each session in its own thread (ORT releases the GIL) for duration_s; images/s."""
    counts = [0] * len(sessions)
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            sessions[i].run(None, feeds)
            counts[i] += 1

    for s in sessions:  # warm-up
        s.run(None, feeds)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration_s)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    elapsed_s = time.perf_counter() - t0
    return sum(counts) * next(iter(feeds.values())).shape[0] / elapsed_s


def _best_batch1(path: Path, feeds: dict[str, np.ndarray], cpus: int, duration_s: float) -> dict[str, float]:
    """Batch-1 runs/s of one ONNX file: one session x `cpus` threads vs one 1-thread session per CPU."""
    one_session = _images_per_s([make_session(path, "CPUExecutionProvider", cpus)], feeds, duration_s)
    per_cpu = _images_per_s([make_session(path, "CPUExecutionProvider", 1) for _ in range(cpus)], feeds,
                            duration_s)
    return {"one_session_per_s": one_session, "session_per_cpu_per_s": per_cpu,
            "best_per_s": max(one_session, per_cpu)}


def raw_throughput(config: ThroughputConfig) -> dict[str, Any]:
    from runtime.manifest import Manifest

    m = Manifest.load(config.bundle)
    root = Path(config.bundle)
    cpus = usable_cpu_count()
    rng = np.random.default_rng(config.seed)
    x1 = rng.standard_normal((1, *m.input.shape)).astype(np.float32)  # (1, C, H, W)
    xg = rng.standard_normal((1, m.coding.k, *m.input.shape)).astype(np.float32)  # (1, k, C, H, W)
    xb = rng.standard_normal((config.raw_batch_size, *m.input.shape)).astype(np.float32)
    f1 = _best_batch1(root / m.f, {F_IO[0]: x1}, cpus, config.raw_duration_s)
    batched = _images_per_s([make_session(root / m.f, "CPUExecutionProvider", cpus)], {F_IO[0]: xb},
                            config.raw_duration_s)
    encoders = {e.row: _best_batch1(root / e.file, {ENCODER_IO[0]: xg}, cpus, config.raw_duration_s)
                for e in m.encoders}
    out = {"f_batch1": f1, f"f_batch{config.raw_batch_size}_images_per_s": batched,
           "encoder_batch1_groups": {str(r): v for r, v in encoders.items()},
           "images_per_s": f1["best_per_s"], "cpus": cpus}
    logger.info("raw f: batch 1 one session %.0f/s, session per CPU %.0f/s, batch %d %.0f/s; encoders %s groups/s",
                f1["one_session_per_s"], f1["session_per_cpu_per_s"], config.raw_batch_size, batched,
                [round(v["best_per_s"], 1) for v in encoders.values()])
    return out


def ideal_rps(raw: dict[str, Any], mode: str, n: int, k: int) -> dict[str, float]:
    """CPU-bound ceilings: the issue's raw x k/n, and one that also pays for the encoders.

    Per query, coded serving runs f n/k times and each encoder 1/k times; on saturated CPUs
    the queries/s ceiling is 1 / (CPU-seconds per query). Uncoded runs f once per query."""
    f_rate = raw["images_per_s"]
    if mode == "uncoded":
        return {"raw_x_k_over_n": f_rate, "with_encoders": f_rate}
    enc_s = sum(1.0 / v["best_per_s"] for v in raw["encoder_batch1_groups"].values())
    return {"raw_x_k_over_n": f_rate * k / n, "with_encoders": k / (n / f_rate + enc_s)}


def run(config: ThroughputConfig) -> dict[str, Any]:
    from runtime.manifest import Manifest

    info = machine_info()
    logger.info("throughput bench: %s", json.dumps(asdict(config)))
    logger.info("machine: %s", machine_label(info))
    m = Manifest.load(config.bundle)
    n, k = m.coding.n, m.coding.k
    raw = raw_throughput(config)
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    servers = {}
    for mode in config.modes:
        args = ["--mode", mode, "--max-queue-delay-ms", str(config.max_queue_delay_ms),
                "--log-level", "WARNING", *config.server_args]
        with ServerProcess(config.bundle, args, run_dir / f"{mode}.server.log") as srv:
            load = LoadConfig(url=srv.url, model_name=m.model_name, input_name=m.input.name,
                              input_shape=m.input.shape, pattern="closed", num_requests=config.num_requests,
                              concurrency=config.concurrency, warmup_requests=config.warmup_requests,
                              seed=config.seed)
            record = run_loadgen(load, run_dir / f"{mode}.load.json", run_dir / f"{mode}.loadgen.log",
                                 timeout_s=120 + config.num_requests * 0.2)
        stats = summarize_record(record)
        ideal = ideal_rps(raw, mode, n, k)
        ratios = {name: stats["throughput_rps"] / v for name, v in ideal.items()}
        servers[mode] = {"server_args": args, "stats": stats, "errors": record.errors, "ready_s": srv.ready_s,
                         "ideal_rps": ideal, "ratio": ratios}
        logger.info("%s server %.1f q/s (p50 %.1f ms, failed %d); ideal raw x k/n %.1f q/s (ratio %.3f), "
                    "with encoders %.1f q/s (ratio %.3f)", mode, stats["throughput_rps"], stats["p50_ms"],
                    stats["failed"], ideal["raw_x_k_over_n"], ratios["raw_x_k_over_n"], ideal["with_encoders"],
                    ratios["with_encoders"])
    # The CPUs are shared with other jobs: measure raw again after the servers and use the
    # mean of both, recording each, so a load change during the run shows up in the record.
    raw_after = raw_throughput(config)
    raw["images_per_s_before"] = raw["images_per_s"]
    raw["images_per_s_after"] = raw_after["images_per_s"]
    raw["images_per_s"] = (raw["images_per_s_before"] + raw["images_per_s_after"]) / 2
    for row, enc in raw["encoder_batch1_groups"].items():
        enc["best_per_s"] = (enc["best_per_s"] + raw_after["encoder_batch1_groups"][row]["best_per_s"]) / 2
    for mode, srv in servers.items():
        srv["ideal_rps"] = ideal_rps(raw, mode, n, k)
        srv["ratio"] = {name: srv["stats"]["throughput_rps"] / v for name, v in srv["ideal_rps"].items()}
    primary = servers.get("coded") or next(iter(servers.values()))
    ratio = primary["ratio"]["raw_x_k_over_n"]
    result = {"benchmark": "throughput", "config": asdict(config), "machine": info, "n": n, "k": k,
              "raw": raw, "servers": servers,
              "targets": {"mode": "coded" if "coded" in servers else config.modes[0],
                          "ratio_vs_raw_x_k_over_n": round(ratio, 3), "within_0.9": bool(ratio >= 0.9)},
              "run_dir": str(run_dir)}
    suffix = f"-{config.tag}" if config.tag else ""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"throughput{suffix}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    from bench.plots import throughput_figure

    title = f"n={n}, k={k}, {config.concurrency} closed-loop clients — {machine_label(info)}"
    if "UNTRAINED" in str(m.provenance.get("note")):
        title += " — UNTRAINED bundle (timing only)"
    png = throughput_figure(result, out_dir / f"throughput{suffix}.png", title)
    logger.info("targets: %s", json.dumps(result["targets"]))
    logger.info("wrote %s and %s", json_path, png)
    return result


_LIST_FLAGS = ("bundle", "modes", "server_args")  # a positional and two list flags; the rest map 1:1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=ThroughputConfig.bundle)
    p.add_argument("--modes", default="coded,uncoded", help="server modes to measure (coded,uncoded)")
    p.add_argument("--server-args", default="", help="extra server flags, space separated")
    add_dataclass_flags(p, ThroughputConfig, skip=_LIST_FLAGS)
    return p


def config_from_args(args: argparse.Namespace) -> ThroughputConfig:
    values = dataclass_values(ThroughputConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS})
    return ThroughputConfig(bundle=args.bundle, modes=tuple(x for x in args.modes.split(",") if x),
                            server_args=tuple(args.server_args.split()), **values)


def main(argv: list[str] | None = None) -> int:
    install_sigterm_handler()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    try:
        config = config_from_args(build_parser().parse_args(argv))
    except ThroughputBenchError as exc:
        logger.error("%s", exc)
        return 2
    run(config)
    return 0
