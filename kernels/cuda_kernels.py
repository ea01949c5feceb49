"""The loaded decoder fatbin (kernels/decoder.cu) on the current device: launches, streams, events.

  kernels = load_kernels()                       # builds/caches the fatbin, loads it once
  kernels.one_shot_decode(inputs, parity, out, n, k)   # torch CUDA tensors, CuPy arrays, pointers

Any thread may call it: every driver call goes through kernels.cuda_driver.check(), which
makes the primary context current on the calling thread first. Streams are created once (one
default per CudaKernels) and handed to every launch; `.handle` is the raw CUstream for
`torch.cuda.ExternalStream(handle)` / `cupy.cuda.ExternalStream(handle)`. pycuda's Stream()
is a blocking stream, so it is ordered after work on the legacy default stream (torch's
default) only; a producer on another stream must be ordered explicitly: record an event on
the producer's stream and make the launch stream wait on it (runtime.gpu_decode does this
for every worker result). Every launch has the semantics of its numpy twin in
kernels.reference.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernels import build
from kernels.cuda_driver import ITEMSIZE, SUFFIX, check, device_pointer, dtype_name, import_pycuda
from kernels.cuda_params import SPIN_WAIT_PARAMS, pack_general, pack_one_shot, pack_online_update
from kernels.errors import CodingError
from kernels.reference import MAX_OUTPUTS

logger = logging.getLogger(__name__)

BLOCK_THREADS = 256  # CI_BLOCK in decoder.cu (its __launch_bounds__)
MAX_BLOCKS_PER_SM = 2048 // BLOCK_THREADS  # a full SM's worth of threads; the loops are grid-stride
_REGISTERS_PER_SM = 65536
FATBIN_ENV = "CODED_INVNET_FATBIN"  # a prebuilt fatbin (machines without nvcc)


@dataclass(frozen=True)
class Launch:
    """One prepared kernel launch: build once, call many times (the bench, fixed buffers)."""

    kernels: CudaKernels
    name: str
    grid: tuple[int, int, int]
    params: bytes

    def __call__(self, stream: Any) -> None:
        function = self.kernels.function(self.name, len(self.params))
        check(
            f"launch {self.name}",
            function.prepared_async_call,
            self.grid,
            (BLOCK_THREADS, 1, 1),
            stream,
            self.params,
        )


class CudaKernels:
    """The loaded fatbin on the current device: prepared functions, streams, memory helpers."""

    def __init__(self, fatbin: str | Path | None = None, build_config: build.BuildConfig | None = None) -> None:
        self.driver, self.context = import_pycuda()
        path = Path(fatbin) if fatbin is not None else build.build(build_config)
        image = path.read_bytes()
        self.module = check(f"load {path}", self.driver.module_from_buffer, image)
        device = check("query the device", self.context.get_device)
        self.device_name: str = check("query the device name", device.name)
        self.compute_capability: tuple[int, int] = check("query the device", device.compute_capability)
        attribute = self.driver.device_attribute.MULTIPROCESSOR_COUNT
        self.sm_count: int = check("query the SM count", device.get_attribute, attribute)
        self._functions: dict[str, Any] = {}
        self._blocks_per_sm: dict[str, int] = {}
        # Grid cap in waves of resident blocks. One wave keeps every block resident (the loops
        # are grid-stride); more may hide latency at small k (few loads per thread): the
        # kernel bench measures both (`--grid-waves`).
        self.grid_waves = 1
        self.default_stream = self.new_stream()
        logger.info(
            "decoder kernels loaded from %s on %s (sm_%d%d, %d SMs)",
            path,
            self.device_name,
            *self.compute_capability,
            self.sm_count,
        )

    # -- driver objects ------------------------------------------------------------------

    def new_stream(self) -> Any:
        return check("create a stream", self.driver.Stream)

    def new_event(self) -> Any:
        return check("create an event", self.driver.Event)

    def alloc(self, nbytes: int) -> Any:
        return check(f"allocate {nbytes} bytes", self.driver.mem_alloc, max(1, nbytes))

    def copy(self, dst: int, src: int, nbytes: int, stream: Any = None) -> None:
        if nbytes:
            check(
                "copy device to device", self.driver.memcpy_dtod_async, dst, src, nbytes, stream or self.default_stream
            )

    def record(self, event: Any, stream: Any = None) -> None:
        check("record an event", event.record, stream or self.default_stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        check("wait for an event", end.synchronize)
        return float(check("read an event time", end.time_since, start))

    def synchronize(self, stream: Any = None) -> None:
        check("synchronize a stream", (stream or self.default_stream).synchronize)

    def function(self, name: str, param_bytes: int) -> Any:
        function = self._functions.get(name)
        if function is None:
            function = check(f"find kernel {name}", self.module.get_function, name)
            function.prepare([f"{param_bytes}s"])  # one struct by value: see decoder.cu
            self._functions[name] = function
        return function

    def blocks_per_sm(self, name: str, param_bytes: int) -> int:
        """Resident blocks of `name` per SM, from its register count (one grid = one wave)."""
        if name not in self._blocks_per_sm:
            function = self.function(name, param_bytes)
            registers = check(f"query {name}", function.get_attribute, self.driver.function_attribute.NUM_REGS)
            per_block = -(-max(1, registers) // 8) * 8 * BLOCK_THREADS  # allocated in units of 8 per thread
            self._blocks_per_sm[name] = max(1, min(MAX_BLOCKS_PER_SM, _REGISTERS_PER_SM // per_block))
        return self._blocks_per_sm[name]

    def grid(self, n: int, itemsize: int, name: str, param_bytes: int) -> tuple[int, int, int]:
        items = -(-n // (16 // itemsize))  # 16-byte packs (+ the tail)
        per_sm = self.blocks_per_sm(name, param_bytes)
        blocks = min(-(-items // BLOCK_THREADS), self.sm_count * per_sm * self.grid_waves)
        return (max(1, blocks), 1, 1)

    # -- prepared launches (same semantics as kernels.reference) -------------------------

    def prepare_one_shot_decode(
        self, inputs: Sequence[Any], parity: Any, out: Any, n: int, parity_scale: float, dtype: Any = "float32"
    ) -> Launch:
        """out = parity_scale * parity - sum_i inputs[i], each of n elements of `dtype`.

        Inputs are separate pointers (up to 64), passed by value in the kernel's parameter
        struct; a packed [k-1, B, d] buffer is passed as base + i * n * itemsize.
        """
        name = dtype_name(dtype)
        nbytes = n * ITEMSIZE[name]
        pointers = [device_pointer(x, nbytes=nbytes, dtype=name, what=f"inputs[{i}]") for i, x in enumerate(inputs)]
        params = pack_one_shot(
            pointers,
            device_pointer(parity, nbytes=nbytes, dtype=name, what="parity"),
            device_pointer(out, nbytes=nbytes, dtype=name, what="out"),
            n,
            parity_scale,
        )
        kernel = f"ci_one_shot_decode_{SUFFIX[name]}"
        return Launch(self, kernel, self.grid(n, ITEMSIZE[name], kernel, len(params)), params)

    def prepare_online_update(
        self,
        est: Any,
        x: Any,
        n: int,
        alpha: float,
        beta: float = 1.0,
        copy_out: Any = None,
        final_out: Any = None,
        final_scale: float = 1.0,
        dtype: Any = "float32",
    ) -> Launch:
        """est (fp32) = beta*est + alpha*x; copy_out = x; or final_out = final_scale*(...)."""
        name = dtype_name(dtype)
        nbytes = n * ITEMSIZE[name]
        params = pack_online_update(
            device_pointer(est, nbytes=4 * n, dtype="float32", what="est"),
            device_pointer(x, nbytes=nbytes, dtype=name, what="x"),
            n,
            alpha,
            beta,
            0 if copy_out is None else device_pointer(copy_out, nbytes=nbytes, dtype=name, what="copy_out"),
            0 if final_out is None else device_pointer(final_out, nbytes=nbytes, dtype=name, what="final_out"),
            final_scale,
        )
        kernel = f"ci_online_update_{SUFFIX[name]}"
        return Launch(self, kernel, self.grid(n, ITEMSIZE[name], kernel, len(params)), params)

    def prepare_general_decode(
        self, coeffs: np.ndarray, inputs: Sequence[Any], outputs: Sequence[Any], n: int, dtype: Any = "float32"
    ) -> list[Launch]:
        """outputs[r] = sum_j coeffs[r, j] * inputs[j]; one launch per 8 output rows."""
        name = dtype_name(dtype)
        nbytes = n * ITEMSIZE[name]
        coeffs = np.asarray(coeffs, dtype=np.float32)
        if coeffs.ndim != 2 or coeffs.shape != (len(outputs), len(inputs)):
            raise CodingError(
                f"general_decode: coeffs must have shape (outputs={len(outputs)}, inputs={len(inputs)}), "
                f"got {coeffs.shape}"
            )
        ins = [device_pointer(x, nbytes=nbytes, dtype=name, what=f"inputs[{j}]") for j, x in enumerate(inputs)]
        outs = [device_pointer(y, nbytes=nbytes, dtype=name, what=f"outputs[{r}]") for r, y in enumerate(outputs)]
        launches = []
        for start in range(0, len(outs), MAX_OUTPUTS):
            rows = outs[start : start + MAX_OUTPUTS]
            r_max = next(r for r in (1, 2, 4, 8) if r >= len(rows))
            params = pack_general(coeffs[start : start + len(rows)], ins, rows, n)
            kernel = f"ci_general_decode_{SUFFIX[name]}_r{r_max}"
            launches.append(Launch(self, kernel, self.grid(n, ITEMSIZE[name], kernel, len(params)), params))
        return launches

    def one_shot_decode(self, *args: Any, stream: Any = None, **kwargs: Any) -> None:
        self.prepare_one_shot_decode(*args, **kwargs)(stream or self.default_stream)

    def online_update(self, *args: Any, stream: Any = None, **kwargs: Any) -> None:
        self.prepare_online_update(*args, **kwargs)(stream or self.default_stream)

    def general_decode(self, *args: Any, stream: Any = None, **kwargs: Any) -> None:
        for launch in self.prepare_general_decode(*args, **kwargs):
            launch(stream or self.default_stream)

    def spin_wait(self, duration_ns: int, stream: Any = None) -> None:
        """Hold `stream` busy for duration_ns so the launches queued behind it run back to back."""
        function = self.function("ci_spin_wait", SPIN_WAIT_PARAMS.size)
        params = SPIN_WAIT_PARAMS.pack(int(duration_ns))
        check(
            "launch ci_spin_wait",
            function.prepared_async_call,
            (1, 1, 1),
            (1, 1, 1),
            stream or self.default_stream,
            params,
        )


@functools.lru_cache(maxsize=1)
def load_kernels() -> CudaKernels:
    """The process-wide CudaKernels: $CODED_INVNET_FATBIN if set, else the cached build of
    kernels/decoder.cu (compiled with nvcc on first use, see kernels.build)."""
    return CudaKernels(fatbin=os.environ.get(FATBIN_ENV) or None)
