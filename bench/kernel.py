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
bench/results/kernel_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench.machine import machine_info, machine_label

logger = logging.getLogger(__name__)

GPU_GRID = {"ds": (784, 3072, 65536, 1048576), "batches": (1, 32, 256), "ks": (2, 4, 10, 32)}
CPU_GRID = {"ds": (784, 3072, 65536), "batches": (1, 32), "ks": (2, 4, 10)}
CPU_LABEL = "numpy-reference (CPU)"
BANDWIDTH_TARGET_ELEMENTS = 16 * 2**20  # targets: >= 85% of copy bandwidth from 16M floats up
_DTYPES = ("float32", "float16", "bfloat16")


class KernelBenchError(ValueError):
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
    out_dir: str = "bench/results"
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
        if self.max_gib <= 0 or self.copy_mib < 1:
            raise KernelBenchError(f"max_gib > 0 and copy_mib >= 1, got {self.max_gib}, {self.copy_mib}")
        if self.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.tag):
            raise KernelBenchError(f"tag: letters, digits, '_', '.', '-' only, got {self.tag!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KernelBenchConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KernelBenchError(f"unknown KernelBenchConfig keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def grid(self, default: dict[str, tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
        return self.ds or default["ds"], self.batches or default["batches"], self.ks or default["ks"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _median_us(samples_s: list[float]) -> float:
    return statistics.median(samples_s) * 1e6


# ---- numpy reference (CPU) ------------------------------------------------------------------


def _time_host(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _median_us(samples)


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
                moved = (k + 1) * n * itemsize
                rows.append(
                    {
                        "d": d,
                        "batch": batch,
                        "k": k,
                        "elements": n,
                        "bytes_per_decode": moved,
                        "fused_us": fused_us,
                        "fused_gbps": moved / fused_us / 1e3,
                        "fused_host_us": fused_us,
                        "unfused_us": None,
                        "speedup": None,
                        "copy_us_at_size": copy_at_us,
                        "copy_gbps_at_size": 2 * n * itemsize / copy_at_us / 1e3,
                        "update_us": update_us,
                        "fraction_of_copy": moved / fused_us / 1e3 / copy_gbps,
                    }
                )
                logger.info("d=%d batch=%d k=%d: %.1f us", d, batch, k, fused_us)
    return {"backend": CPU_LABEL, "device": "cpu", "copy_gbps": copy_gbps, "rows": rows, "skipped": skipped}


# ---- CUDA -------------------------------------------------------------------------------------


class _DeviceTimer:
    """Per-launch CUDA-event timing with the stream pre-filled by a spin kernel."""

    def __init__(self, kernels: Any, stream: Any, iters: int) -> None:
        self.kernels, self.stream = kernels, stream
        self.starts = [kernels.new_event() for _ in range(iters)]  # created once
        self.ends = [kernels.new_event() for _ in range(iters)]

    def __call__(self, fn: Callable[[], Any], warmup: int, host: bool = False) -> tuple[float, float | None]:
        """(median device us per call, host wall-clock us per call incl. Python, if `host`)."""
        iters = len(self.starts)
        for _ in range(warmup):
            fn()
        self.kernels.synchronize(self.stream)
        host_us = None
        if host:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            self.kernels.synchronize(self.stream)
            host_us = (time.perf_counter() - start) / iters * 1e6
        # Hold the stream long enough for Python to queue all (event, launch, event) triples.
        enqueue_s = self._enqueue_estimate_s(fn)
        self.kernels.spin_wait(int(min(2.0, 3 * enqueue_s * iters + 1e-3) * 1e9), self.stream)
        for i in range(iters):
            self.kernels.record(self.starts[i], self.stream)
            fn()
            self.kernels.record(self.ends[i], self.stream)
        samples = [self.kernels.elapsed_ms(s, e) * 1e-3 for s, e in zip(self.starts, self.ends, strict=True)]
        return _median_us(samples), host_us

    def _enqueue_estimate_s(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        for i in range(5):
            self.kernels.record(self.starts[i % len(self.starts)], self.stream)
            fn()
            self.kernels.record(self.ends[i % len(self.ends)], self.stream)
        elapsed = (time.perf_counter() - start) / 5
        self.kernels.synchronize(self.stream)
        return elapsed


class _Arrays:
    """Allocation, random data and the unfused chain in torch or CuPy, on our stream."""

    def __init__(self, library: str, stream_handle: int, dtype: str) -> None:
        self.library = library
        if library == "torch":
            import torch

            self.lib = torch
            self.stream = torch.cuda.ExternalStream(stream_handle)
            self.dtype = getattr(torch, dtype)
        else:
            import cupy

            self.lib = cupy
            self.stream = cupy.cuda.ExternalStream(stream_handle)
            if dtype == "bfloat16":
                raise KernelBenchError("CuPy has no bfloat16: use --unfused torch or another --dtype")
            self.dtype = getattr(cupy, dtype)

    def randn(self, rows: int, n: int, seed: int) -> Any:
        if self.library == "torch":
            generator = self.lib.Generator(device="cuda").manual_seed(seed)
            out = self.lib.randn(rows, n, device="cuda", generator=generator).to(self.dtype)
            self.lib.cuda.synchronize()
            return out
        out = self.lib.random.default_rng(seed).standard_normal((rows, n), dtype=self.lib.float32).astype(self.dtype)
        self.lib.cuda.Device().synchronize()
        return out

    def release(self) -> None:
        """Hand cached blocks back so the next, larger pool can be allocated."""
        if self.library == "torch":
            self.lib.cuda.empty_cache()
        else:
            self.lib.get_default_memory_pool().free_all_blocks()

    def empty(self, n: int) -> Any:
        if self.library == "torch":
            return self.lib.empty(n, device="cuda", dtype=self.dtype)
        return self.lib.empty(n, dtype=self.dtype)

    def unfused(self, out: Any, parity: Any, inputs: list[Any], k: int) -> Callable[[], None]:
        def chain() -> None:
            if self.library == "torch":
                with self.lib.cuda.stream(self.stream):
                    self.lib.mul(parity, k, out=out)
                    for x in inputs:
                        out.sub_(x)
            else:
                with self.stream:
                    self.lib.multiply(parity, k, out=out)
                    for x in inputs:
                        self.lib.subtract(out, x, out=out)

        return chain


def _array_library(choice: str) -> str:
    """torch or cupy (choice: auto | torch | cupy): allocates buffers, runs the unfused chain."""
    if choice in ("auto", "torch"):
        try:
            import torch

            if torch.cuda.is_available():
                return "torch"
        except ImportError:
            pass
        if choice == "torch":
            raise KernelBenchError("--unfused torch: torch with CUDA is not available")
    try:
        import cupy  # noqa: F401

        return "cupy"
    except ImportError as exc:
        raise KernelBenchError("the CUDA benchmark allocates with torch or CuPy; neither is usable") from exc


def run_cuda(config: KernelBenchConfig) -> dict[str, Any]:
    from kernels.cuda_decoder import load_kernels

    kernels = load_kernels()
    library = _array_library("auto" if config.unfused == "none" else config.unfused)
    stream = kernels.new_stream()  # created once; torch/CuPy join it through ExternalStream
    arrays = _Arrays(library, int(stream.handle), config.dtype)
    timer = _DeviceTimer(kernels, stream, config.iters)
    itemsize = 2 if config.dtype != "float32" else 4

    copy_n = config.copy_mib * 2**20 // itemsize
    copy_src, copy_dst = arrays.randn(1, copy_n, config.seed)[0], arrays.empty(copy_n)
    src_ptr, dst_ptr = _ptr(copy_src), _ptr(copy_dst)
    copy_us, _ = timer(functools.partial(kernels.copy, dst_ptr, src_ptr, copy_n * itemsize, stream), config.warmup)
    copy_gbps = 2 * copy_n * itemsize / copy_us / 1e3
    del copy_src, copy_dst
    logger.info("device-to-device copy of %d MiB: %.1f us, %.0f GB/s", config.copy_mib, copy_us, copy_gbps)

    rows, skipped = [], []
    ds, batches, ks = config.grid(GPU_GRID)
    for d in ds:
        for batch in batches:
            n = d * batch
            fitting = [k for k in ks if (k + 3) * n * itemsize <= config.max_gib * 2**30]
            for k in sorted(set(ks) - set(fitting)):
                skipped.append({"d": d, "batch": batch, "k": k, "reason": f"needs more than {config.max_gib} GiB"})
            if not fitting:
                continue
            pool = arrays.randn(max(fitting), n, config.seed + d + batch)  # parity + up to k-1 results
            out, out_unfused, est = arrays.empty(n), arrays.empty(n), arrays.empty(n if itemsize == 4 else 2 * n)
            copy_at_size = functools.partial(kernels.copy, _ptr(out), _ptr(pool[0]), n * itemsize, stream)
            copy_at = timer(copy_at_size, config.warmup)[0]
            update = kernels.prepare_online_update(_ptr(est), pool[1], n, alpha=-1.0, dtype=config.dtype)
            update_us = timer(functools.partial(update, stream), config.warmup)[0]
            for k in fitting:
                inputs = [pool[j] for j in range(1, k)]
                fused = kernels.prepare_one_shot_decode(inputs, pool[0], out, n, float(k), dtype=config.dtype)
                fused_us, fused_host_us = timer(functools.partial(fused, stream), config.warmup, host=True)
                unfused_us = None
                if config.unfused != "none":
                    chain = arrays.unfused(out_unfused, pool[0], inputs, k)
                    unfused_us = timer(chain, config.warmup)[0]
                moved = (k + 1) * n * itemsize
                rows.append(
                    {
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
                        "copy_us_at_size": copy_at,
                        "copy_gbps_at_size": 2 * n * itemsize / copy_at / 1e3,
                        "update_us": update_us,
                        "fraction_of_copy": moved / fused_us / 1e3 / copy_gbps,
                    }
                )
                logger.info(
                    "d=%d batch=%d k=%d: fused %.2f us (%.0f GB/s), unfused %s us",
                    d,
                    batch,
                    k,
                    fused_us,
                    moved / fused_us / 1e3,
                    "-" if unfused_us is None else f"{unfused_us:.2f}",
                )
            inputs = chain = None  # views of the pool: drop them so its memory can go
            del pool, out, out_unfused, est, update, copy_at_size
            arrays.release()
    return {
        "backend": f"cuda ({library} for buffers and the unfused chain)",
        "device": kernels.device_name,
        "compute_capability": list(kernels.compute_capability),
        "copy_gbps": copy_gbps,
        "rows": rows,
        "skipped": skipped,
    }


def _ptr(array: Any) -> int:
    from kernels.cuda_decoder import device_pointer

    return device_pointer(array)


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
        worst = min(r["speedup"] for r in k10)
        targets["speedup_k10"] = {
            "goal": ">= 3x vs unfused at k = 10",
            "worst": worst,
            "median": statistics.median(r["speedup"] for r in k10),
            "met": worst >= 3.0,
        }
    return targets


def plot(record: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    ks = sorted({r["k"] for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, len(ks))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for color, k in zip(colors, ks, strict=True):
        mine = sorted((r for r in rows if r["k"] == k), key=lambda r: r["elements"])
        x = [r["elements"] for r in mine]
        left.plot(x, [r["fused_us"] for r in mine], "o-", color=color, label=f"fused k={k}")
        if any(r["unfused_us"] is not None for r in mine):
            left.plot(x, [r["unfused_us"] for r in mine], "x--", color=color, alpha=0.7, label=f"unfused k={k}")
        right.plot(x, [r["fused_gbps"] for r in mine], "o-", color=color, label=f"k={k}")
    copy_label = "host memory copy" if record["device"] == "cpu" else "device-to-device copy"
    right.axhline(record["copy_gbps"], color="black", lw=1, label=copy_label)
    right.axhline(0.85 * record["copy_gbps"], color="gray", lw=1, ls=":", label="85% of copy")
    for axis, ylabel in ((left, "us per decode (median)"), (right, "achieved GB/s (read + write)")):
        axis.set_xscale("log")
        axis.set_xlabel("elements per vector (d x batch)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    left.set_yscale("log")
    fig.suptitle(f"one-shot decode, {record['backend']}: {record['device']}\n{record['machine_label']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(config: KernelBenchConfig) -> dict[str, Any]:
    """Run the benchmark and write JSON + PNG; returns the record."""
    backend = config.backend
    if backend == "auto":
        from kernels.build import KernelBuildError
        from kernels.cuda_decoder import CudaUnavailableError, load_kernels

        try:
            load_kernels()
            backend = "cuda"
        except (CudaUnavailableError, KernelBuildError) as exc:
            logger.info("no usable CUDA decoder (%s): timing the numpy reference instead", exc)
            backend = "numpy"
    logger.info("kernel benchmark: backend %s, config %s", backend, asdict(config))
    started = time.perf_counter()
    result = run_cuda(config) if backend == "cuda" else run_numpy(config)
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
    plot(record, out_dir / f"{name}.png")
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


def main(argv: list[str] | None = None) -> int:
    defaults = KernelBenchConfig()
    parser = argparse.ArgumentParser(prog="python -m bench kernel", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=defaults.backend, choices=("auto", "cuda", "numpy"))
    parser.add_argument("--ds", type=_ints, default=(), help=f"comma list (GPU default {GPU_GRID['ds']})")
    parser.add_argument("--batches", type=_ints, default=(), help=f"comma list (GPU default {GPU_GRID['batches']})")
    parser.add_argument("--ks", type=_ints, default=(), help=f"comma list (GPU default {GPU_GRID['ks']})")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="timed launches per point (median)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--dtype", default=defaults.dtype, choices=_DTYPES)
    parser.add_argument("--unfused", default=defaults.unfused, choices=("auto", "torch", "cupy", "none"))
    parser.add_argument("--max-gib", type=float, default=defaults.max_gib, help="skip points needing more memory")
    parser.add_argument("--copy-mib", type=int, default=defaults.copy_mib, help="size of the ceiling copy")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out-dir", default=defaults.out_dir)
    parser.add_argument("--tag", default=defaults.tag, help="suffix for the output file names")
    args = parser.parse_args(argv)
    from kernels.build import KernelBuildError
    from kernels.cuda_decoder import CudaDecoderError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = KernelBenchConfig(**{k: v for k, v in vars(args).items()})
        record = run(config)
    except (KernelBenchError, KernelBuildError, CudaDecoderError) as exc:
        logger.error("error: %s", exc)
        return 2
    print(summary(record))
    return 0
