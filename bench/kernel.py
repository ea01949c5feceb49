"""`python -m bench kernel`: latency and bandwidth of the fused decoder kernel (CUDA or numpy).

For every (d, batch, k) of the grid it decodes one missing embedding of the n = k+1 code,
out = k * parity - sum of the k-1 received f_j, over a batch of d-vectors (n = d * batch
elements per vector), and records:

  fused_us        median device time of one ci_one_shot_decode launch (CUDA events around
                  each launch, >= 100 launches after warm-up; a spin kernel queued first keeps
                  the stream busy so the launches run back to back and Python's launch cost
                  is not in the number). fused_host_us is the wall-clock cost per call
                  including Python and pycuda (a stream sync every `iters` calls).
  fused_gbps      (k+1) * n * itemsize bytes moved per decode / fused_us
  copy_gbps       a device-to-device copy measured the same way in the same run (read + write
                  bytes), once on a large buffer (the ceiling) and once at each n
  unfused_us      the same decode as a chain of torch (or CuPy) ops on the same stream:
                  out = k * parity; out -= f_j for each j  (k launches); speedup = unfused/fused
  update_us       one online arrival (ci_online_update: est -= f_j), O(n) whatever k is

Without a GPU (or with --backend numpy) it times kernels.reference with time.perf_counter,
labelled "numpy-reference (CPU)", on a smaller default grid. Writes
bench/results/kernel/kernel_<device>.json and .png. The CUDA timing lives in bench.kernel_cuda.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.machine import machine_info, machine_label
from kernels.configs import add_dataclass_flags, dataclass_values, strict_from_dict

logger = logging.getLogger(__name__)

GPU_GRID = {"ds": (784, 3072, 65536, 1048576), "batches": (1, 32, 256), "ks": (2, 4, 10, 32)}
CPU_GRID = {"ds": (784, 3072, 65536), "batches": (1, 32), "ks": (2, 4, 10)}
CPU_LABEL = "numpy-reference (CPU)"
BANDWIDTH_TARGET_ELEMENTS = 16 * 2**20  # targets: >= 85% of copy bandwidth from 16M floats up
SPEEDUP_TARGET = 3.0  # vs the unfused chain at k = 10, where it is not bandwidth-bound
SPEEDUP_OF_BOUND = 0.9  # where it is: this fraction of bandwidth_bound_speedup(k)
_DTYPES = ("float32", "float16", "bfloat16")


class KernelBenchError(BenchError):
    """Invalid kernel-benchmark configuration, or a backend that cannot run here."""


@dataclass
class KernelBenchConfig:
    backend: str = "auto"  # auto (CUDA if usable, else numpy) | cuda | numpy
    ds: tuple[int, ...] = ()  # empty: the backend's default grid
    batches: tuple[int, ...] = ()
    ks: tuple[int, ...] = ()
    iters: int = 100
    warmup: int = 10
    dtype: str = "float32"
    unfused: str = "auto"  # auto | torch | cupy | none (the unfused chain on the GPU)
    max_gib: float = 40.0  # skip grid points whose buffers need more device/host memory
    copy_mib: int = 1024  # buffer of the ceiling copy measurement
    seed: int = 0
    grid_waves: int = 1  # one-shot/online grids: this many waves of resident blocks (1: one)
    out_dir: str = "bench/results/kernel"
    tag: str = ""

    def __post_init__(self) -> None:
        for name in ("ds", "batches", "ks"):
            values = tuple(int(v) for v in getattr(self, name))
            if any(v < 1 for v in values):
                raise KernelBenchError(f"{name}: expected positive integers, got {values}")
            setattr(self, name, values)
        if any(k < 2 or k > 65 for k in self.ks):
            raise KernelBenchError(f"ks: the one-shot kernel decodes k in 2..65, got {self.ks}")
        if self.backend not in ("auto", "cuda", "numpy"):
            raise KernelBenchError(f"backend: expected auto, cuda or numpy, got {self.backend!r}")
        if self.unfused not in ("auto", "torch", "cupy", "none"):
            raise KernelBenchError(f"unfused: expected auto, torch, cupy or none, got {self.unfused!r}")
        if self.dtype not in _DTYPES:
            raise KernelBenchError(f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")
        if self.iters < 1 or self.warmup < 0:
            raise KernelBenchError(f"iters >= 1 and warmup >= 0, got {self.iters}, {self.warmup}")
        if self.grid_waves < 1:
            raise KernelBenchError(f"grid_waves: expected >= 1, got {self.grid_waves}")
        if self.max_gib <= 0 or self.copy_mib < 1:
            raise KernelBenchError(f"max_gib > 0 and copy_mib >= 1, got {self.max_gib}, {self.copy_mib}")
        if self.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.tag):
            raise KernelBenchError(f"tag: letters, digits, '_', '.', '-' only, got {self.tag!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KernelBenchConfig:
        return strict_from_dict(cls, values, KernelBenchError)

    def grid(self, default: dict[str, tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
        return self.ds or default["ds"], self.batches or default["batches"], self.ks or default["ks"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def median_us(samples_s: list[float]) -> float:
    return statistics.median(samples_s) * 1e6


def decode_row(d: int, batch: int, k: int, itemsize: int, *, fused_us: float, fused_host_us: float | None,
               unfused_us: float | None, copy_at_us: float, update_us: float, copy_gbps: float) -> dict[str, Any]:
    """One grid point of the record; bandwidths count every byte read and written once."""
    n = d * batch
    moved = (k + 1) * n * itemsize
    return {
        "d": d,
        "batch": batch,
        "k": k,
        "elements": n,
        "bytes_per_decode": moved,
        "fused_us": fused_us,
        "fused_gbps": moved / fused_us / 1e3,
        "fused_host_us": fused_host_us,
        "unfused_us": unfused_us,
        "speedup": None if unfused_us is None else unfused_us / fused_us,
        # where both are bandwidth-bound the speed-up is at most the ratio of passes over
        # memory: the chain reads parity and writes out (2), then reads out and f_j and
        # writes out per input (3 (k-1)); the fused kernel reads k and writes 1
        "bandwidth_bound_speedup": bandwidth_bound_speedup(k),
        "copy_us_at_size": copy_at_us,
        "copy_gbps_at_size": 2 * n * itemsize / copy_at_us / 1e3,
        "update_us": update_us,
        "fraction_of_copy": moved / fused_us / 1e3 / copy_gbps,
    }


# ---- numpy reference (CPU) ------------------------------------------------------------------


def _time_host(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return median_us(samples)


def run_numpy(config: KernelBenchConfig) -> dict[str, Any]:
    from kernels import reference as ref

    dtype = ref.check_dtype(config.dtype)
    itemsize = dtype.itemsize
    rng = np.random.default_rng(config.seed)
    copy_n = min(config.copy_mib, 256) * 2**20 // itemsize  # host RAM: keep it modest
    src, dst = rng.standard_normal(copy_n).astype(dtype), np.empty(copy_n, dtype)
    copy_us = _time_host(functools.partial(np.copyto, dst, src), min(config.iters, 20), 2)
    copy_gbps = 2 * copy_n * itemsize / copy_us / 1e3
    del src, dst
    rows, skipped = [], []
    ds, batches, ks = config.grid(CPU_GRID)
    for d in ds:
        for batch in batches:
            n = d * batch
            k_max = max(ks)
            if (k_max + 3) * n * itemsize > config.max_gib * 2**30:
                skipped.append({"d": d, "batch": batch, "reason": f"needs more than {config.max_gib} GiB"})
                continue
            pool = rng.standard_normal((k_max + 1, n), dtype=np.float32).astype(dtype)  # (k_max+1, n)
            out, est = np.empty(n, dtype), np.zeros(n, np.float32)
            copy_at_us = _time_host(functools.partial(np.copyto, out, pool[0]), config.iters, config.warmup)
            update = functools.partial(ref.scaled_accumulate, est, pool[1], -1.0)
            update_us = _time_host(update, config.iters, config.warmup)
            for k in ks:
                decode = functools.partial(ref.one_shot_decode, list(pool[1:k]), pool[0], float(k), out=out)
                fused_us = _time_host(decode, config.iters, config.warmup)
                rows.append(decode_row(d, batch, k, itemsize, fused_us=fused_us, fused_host_us=fused_us,
                                       unfused_us=None, copy_at_us=copy_at_us, update_us=update_us,
                                       copy_gbps=copy_gbps))
                logger.info("d=%d batch=%d k=%d: %.1f us", d, batch, k, fused_us)
    return {"backend": CPU_LABEL, "device": "cpu", "copy_gbps": copy_gbps, "rows": rows, "skipped": skipped}


def bandwidth_bound_speedup(k: int) -> float:
    """Fused vs unfused chain, both at full bandwidth: (3k - 1) / (k + 1) passes; 2.64 at k = 10."""
    return (3 * k - 1) / (k + 1)


def speedup_goal(row: dict[str, Any]) -> float:
    """The speed-up a row must reach: 3x where launches and latency dominate (the chain's k
    launches against one), 0.9 x the bandwidth bound where both are bandwidth-bound."""
    if row["elements"] >= BANDWIDTH_TARGET_ELEMENTS:
        return SPEEDUP_OF_BOUND * row["bandwidth_bound_speedup"]
    return SPEEDUP_TARGET


def evaluate_targets(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, evaluated on this record's rows (GPU records only)."""
    rows = record["rows"]
    big = [r for r in rows if r["elements"] >= BANDWIDTH_TARGET_ELEMENTS]
    mnist = [r for r in rows if r["d"] == 784]
    k10 = [r for r in rows if r["k"] == 10 and r["speedup"] is not None]
    targets: dict[str, Any] = {"measured_on": record["device"]}
    if big:
        worst = min(r["fraction_of_copy"] for r in big)
        targets["bandwidth"] = {"goal": ">= 0.85 of copy at d*batch >= 16M", "worst": worst, "met": worst >= 0.85}
    if mnist:
        worst = max(r["fused_us"] for r in mnist)
        targets["mnist_latency"] = {"goal": "<= 5 us at d = 784", "worst_us": worst, "met": worst <= 5.0}
    if k10:
        worst = min(k10, key=lambda r: r["speedup"] / speedup_goal(r))
        targets["speedup_k10"] = {
            "goal": f">= {SPEEDUP_TARGET:g}x vs the unfused chain at k = 10; where both are bandwidth-bound "
                    f"(d*batch >= 16M) >= {SPEEDUP_OF_BOUND:g} x the bound (3k-1)/(k+1) = "
                    f"{bandwidth_bound_speedup(10):.2f}x",
            "worst": worst["speedup"],
            "worst_row": {"d": worst["d"], "batch": worst["batch"], "goal": speedup_goal(worst)},
            "median": statistics.median(r["speedup"] for r in k10),
            "met": all(r["speedup"] >= speedup_goal(r) for r in k10),
        }
    return targets


def run(config: KernelBenchConfig) -> dict[str, Any]:
    """Run the benchmark and write JSON + PNG; returns the record."""
    backend = config.backend
    if backend == "auto":
        from kernels.cuda_kernels import load_kernels
        from kernels.errors import CudaUnavailableError, KernelBuildError

        try:
            load_kernels()
            backend = "cuda"
        except (CudaUnavailableError, KernelBuildError) as exc:
            logger.info("no usable CUDA decoder (%s): timing the numpy reference instead", exc)
            backend = "numpy"
    logger.info("kernel benchmark: backend %s, config %s", backend, asdict(config))
    started = time.perf_counter()
    if backend == "cuda":
        from bench.kernel_cuda import run_cuda  # imports torch / CuPy and pycuda

        result = run_cuda(config)
    else:
        result = run_numpy(config)
    info = machine_info()
    record = {
        "benchmark": "kernel",
        "config": asdict(config),
        "machine": info,
        "machine_label": machine_label(info),
        "dtype": config.dtype,
        "wall_s": round(time.perf_counter() - started, 1),
        **result,
    }
    record["targets"] = evaluate_targets(record) if backend == "cuda" else {"note": "targets need a GPU"}
    name = f"kernel_{'cpu' if backend == 'numpy' else _slug(record['device'])}{'_' + config.tag if config.tag else ''}"
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    from bench.plots import kernel_figure

    kernel_figure(record, out_dir / f"{name}.png")
    logger.info("wrote %s.json and %s.png in %s", name, name, out_dir)
    return record


def summary(record: dict[str, Any]) -> str:
    lines = [
        f"{record['backend']} on {record['device']} ({record['machine_label']}), dtype {record['dtype']}",
        f"copy bandwidth (read + write): {record['copy_gbps']:.0f} GB/s",
        f"{'d':>8} {'batch':>5} {'k':>3} {'fused us':>10} {'GB/s':>8} {'of copy':>7} {'unfused us':>10} {'x':>6} "
        f"{'update us':>9} {'host us':>8}",
    ]
    for r in record["rows"]:
        unfused = "-" if r["unfused_us"] is None else f"{r['unfused_us']:.2f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.1f}"
        lines.append(
            f"{r['d']:>8} {r['batch']:>5} {r['k']:>3} {r['fused_us']:>10.2f} {r['fused_gbps']:>8.1f} "
            f"{r['fraction_of_copy']:>7.2f} {unfused:>10} {speedup:>6} {r['update_us']:>9.2f} "
            f"{r['fused_host_us']:>8.2f}"
        )
    for skip in record["skipped"]:
        lines.append(f"skipped {skip}")
    lines.append(f"targets: {json.dumps(record['targets'])}")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench kernel", description=__doc__.splitlines()[0])
    grids = {name: f"comma list (GPU default {GPU_GRID[name]})" for name in ("ds", "batches", "ks")}
    for name, text in grids.items():
        parser.add_argument(f"--{name}", type=_ints, default=(), help=text)
    add_dataclass_flags(
        parser, KernelBenchConfig, skip=grids,
        choices={"backend": ("auto", "cuda", "numpy"), "dtype": _DTYPES, "unfused": ("auto", "torch", "cupy", "none")},
        helps={"iters": "timed launches per point (median)", "max_gib": "skip points needing more memory",
               "copy_mib": "size of the ceiling copy", "tag": "suffix for the output file names"},
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kernels.errors import KernelsError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = KernelBenchConfig(**dataclass_values(KernelBenchConfig, vars(args)))
        record = run(config)
    except (KernelBenchError, KernelsError) as exc:
        logger.error("error: %s", exc)
        return 2
    print(summary(record))
    return 0
