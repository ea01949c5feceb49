"""The CUDA half of `python -m bench kernel`: CUDA-event timing of the fused decoder kernels.

Buffers and the unfused reference chain come from torch (or CuPy) on the benchmark's own
stream; bench.kernel owns the configuration, the record and the CPU (numpy) half.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from bench.kernel import GPU_GRID, KernelBenchConfig, KernelBenchError, decode_row, median_us

logger = logging.getLogger(__name__)


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
        return median_us(samples), host_us

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
    from kernels.cuda_kernels import load_kernels

    kernels = load_kernels()
    kernels.grid_waves = config.grid_waves
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
                row = decode_row(d, batch, k, itemsize, fused_us=fused_us, fused_host_us=fused_host_us,
                                 unfused_us=unfused_us, copy_at_us=copy_at, update_us=update_us, copy_gbps=copy_gbps)
                rows.append(row)
                logger.info("d=%d batch=%d k=%d: fused %.2f us (%.0f GB/s), unfused %s us", d, batch, k, fused_us,
                            row["fused_gbps"], "-" if unfused_us is None else f"{unfused_us:.2f}")
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
    from kernels.cuda_driver import device_pointer

    return device_pointer(array)
