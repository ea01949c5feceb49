"""Load the fused decoder kernels (kernels/decoder.cu) with pycuda and run them on device pointers.

  kernels = load_kernels()                       # builds/caches the fatbin, loads it once
  decoder = CudaOnlineDecoder(scheme, (B, d), out=out_tensor)   # out: (k, B, d) on the GPU
  for index, result in arrivals:                 # torch CUDA tensors, CuPy arrays, raw pointers
      if decoder.add(index, result):             # one fused O(B*d) kernel per arrival
          break
  decoder.finalize(); decoder.synchronize()      # `out` now holds all k embeddings

Context and streams: pycuda is imported lazily and attaches to the device's PRIMARY context
(`pycuda.autoprimaryctx`, never `autoinit`), the one torch, CuPy and TensorRT use, so their
pointers are valid here. pycuda's context is current on the importing thread only: call from
that thread (the runtime's event loop), or push `kernels.context` first. Streams are created
once (one per decoder, one default per CudaKernels) and handed to every launch; `.handle` is
the raw CUstream for `torch.cuda.ExternalStream(handle)` / `cupy.cuda.ExternalStream(handle)`.
pycuda's Stream() is a blocking stream, so it is ordered after work on the legacy default
stream (torch's default); producers on other streams must be synchronised by the caller.

Every driver call goes through `check()`, which turns pycuda's exceptions into one
CudaDecoderError carrying the CUDA routine and status. Argument errors raise CodingError,
like the numpy reference (kernels.reference), whose semantics every launch here has.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from kernels import build
from kernels.coding import CodingError, CodingScheme
from kernels.reference import MAX_INPUTS, MAX_OUTPUTS, CopyOp, DecodeOp, OnlinePlanner, UpdateOp, check_dtype

logger = logging.getLogger(__name__)

BLOCK_THREADS = 256  # CI_BLOCK in decoder.cu (its __launch_bounds__)
MAX_BLOCKS_PER_SM = 2048 // BLOCK_THREADS  # a full SM's worth of threads; the loops are grid-stride
_REGISTERS_PER_SM = 65536
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# Host images of the kernels' parameter structs (decoder.cu pins them with static_asserts).
ONE_SHOT_PARAMS = struct.Struct(f"<{MAX_INPUTS}QQQqfi")  # inputs, parity, out, n, scale, m
ONLINE_UPDATE_PARAMS = struct.Struct("<QQQQqfffi")  # est, x, copy_out, final_out, n, alpha, beta, scale, pad
_GENERAL_HEAD = struct.Struct(f"<{MAX_INPUTS}Q{MAX_OUTPUTS}Q")  # inputs, outputs
_GENERAL_TAIL = struct.Struct("<qii")  # n, num_inputs, num_outputs
GENERAL_PARAMS_SIZE = _GENERAL_HEAD.size + 4 * MAX_OUTPUTS * MAX_INPUTS + _GENERAL_TAIL.size

T = TypeVar("T")


class CudaDecoderError(RuntimeError):
    """A CUDA driver call failed; `routine` and `status` name the call and its CUresult."""

    def __init__(self, message: str, routine: str | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.routine = routine
        self.status = status


class CudaUnavailableError(CudaDecoderError):
    """pycuda is not installed, or no CUDA device / driver is usable."""


def check(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one driver call; a pycuda error becomes CudaDecoderError(what, routine, status).

    pycuda formats its errors as "<routine> failed: <status text>[ - <log>]".
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        driver = sys.modules.get("pycuda.driver")
        if driver is None or not isinstance(exc, driver.Error):
            raise
        text = str(exc)
        routine, _, status = text.partition(" failed: ")
        if not status:
            routine, status = None, text
        raise CudaDecoderError(f"CUDA error while trying to {what}: {text}", routine=routine, status=status) from exc


def _import_pycuda() -> tuple[Any, Any]:
    """(pycuda.driver, primary context) or CudaUnavailableError saying how to get them."""
    try:
        import pycuda.driver as driver
    except ImportError as exc:
        raise CudaUnavailableError(
            f"pycuda is not importable ({exc}): install the `gpu` extra (pip install -e '.[gpu]'), "
            "or use the numpy reference kernels.reference on CPU"
        ) from exc
    try:
        import pycuda.autoprimaryctx as primary  # retains + pushes the primary context
    except Exception as exc:  # noqa: BLE001 - cuInit / no device / driver mismatch all mean "no GPU"
        raise CudaUnavailableError(f"no usable CUDA device for the decoder kernels: {exc}") from exc
    return driver, primary.context


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str) and dtype in _SUFFIX:
        return dtype
    return check_dtype(dtype).name


def device_pointer(obj: Any, *, nbytes: int | None = None, dtype: str | None = None, what: str = "buffer") -> int:
    """Raw device address of a torch CUDA tensor, CuPy/numba array, pycuda allocation or int.

    Checks what the object can tell: device memory, C-contiguous, at least `nbytes`, dtype.
    """
    got_bytes: int | None = None
    got_dtype: str | None = None
    if isinstance(obj, bool) or isinstance(obj, np.ndarray):
        raise CodingError(f"{what}: expected device memory, got {type(obj).__name__} (host memory)")
    if isinstance(obj, (int, np.integer)):
        pointer = int(obj)
    elif hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):  # torch.Tensor
        if not obj.is_cuda:
            raise CodingError(f"{what}: expected a CUDA tensor, got one on {obj.device}")
        if not obj.is_contiguous():
            raise CodingError(f"{what}: expected a contiguous tensor; call .contiguous() first")
        pointer, got_bytes = obj.data_ptr(), obj.numel() * obj.element_size()
        got_dtype = str(obj.dtype).removeprefix("torch.")
    elif hasattr(obj, "__cuda_array_interface__"):  # CuPy, numba, pycuda GPUArray
        cai = obj.__cuda_array_interface__
        typestr, shape = np.dtype(cai["typestr"]), tuple(cai["shape"])
        strides = cai.get("strides")
        if strides is not None and tuple(strides) != _c_strides(shape, typestr.itemsize):
            raise CodingError(f"{what}: expected a C-contiguous array, got strides {tuple(strides)}")
        pointer, got_bytes, got_dtype = int(cai["data"][0]), math.prod(shape) * typestr.itemsize, typestr.name
    elif hasattr(obj, "__int__"):  # pycuda DeviceAllocation
        pointer = int(obj)
    else:
        raise CodingError(
            f"{what}: expected a device pointer (int), a torch CUDA tensor or an object with "
            f"__cuda_array_interface__, got {type(obj).__name__}"
        )
    if pointer == 0:
        raise CodingError(f"{what}: got a null device pointer")
    if nbytes is not None and got_bytes is not None and got_bytes < nbytes:
        raise CodingError(f"{what}: expected at least {nbytes} bytes, got {got_bytes}")
    if dtype is not None and got_dtype is not None and got_dtype != dtype:
        raise CodingError(f"{what}: expected dtype {dtype}, got {got_dtype}")
    return pointer


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def pack_one_shot(inputs: Sequence[int], parity: int, out: int, n: int, parity_scale: float) -> bytes:
    if len(inputs) > MAX_INPUTS:
        raise CodingError(f"one_shot_decode takes at most {MAX_INPUTS} inputs, got {len(inputs)}")
    pointers = list(inputs) + [0] * (MAX_INPUTS - len(inputs))
    return ONE_SHOT_PARAMS.pack(*pointers, parity, out, n, parity_scale, len(inputs))


def pack_online_update(
    est: int, x: int, n: int, alpha: float, beta: float, copy_out: int, final_out: int, final_scale: float
) -> bytes:
    return ONLINE_UPDATE_PARAMS.pack(est, x, copy_out, final_out, n, alpha, beta, final_scale, 0)


def pack_general(coeffs: np.ndarray, inputs: Sequence[int], outputs: Sequence[int], n: int) -> bytes:
    rows, cols = coeffs.shape
    if cols != len(inputs) or not 1 <= cols <= MAX_INPUTS:
        raise CodingError(f"general_decode: coeffs {coeffs.shape} for {len(inputs)} inputs (1..{MAX_INPUTS})")
    if rows != len(outputs) or not 1 <= rows <= MAX_OUTPUTS:
        raise CodingError(f"general_decode: {rows} coefficient rows for {len(outputs)} outputs per launch")
    table = np.zeros((MAX_OUTPUTS, MAX_INPUTS), dtype="<f4")  # rows >= R must be zero: see decoder.cu
    table[:rows, :cols] = coeffs
    head = _GENERAL_HEAD.pack(*inputs, *([0] * (MAX_INPUTS - cols)), *outputs, *([0] * (MAX_OUTPUTS - rows)))
    return head + table.tobytes() + _GENERAL_TAIL.pack(n, cols, rows)


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
        self.driver, self.context = _import_pycuda()
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
        blocks = min(-(-items // BLOCK_THREADS), self.sm_count * per_sm)
        return (max(1, blocks), 1, 1)

    # -- prepared launches (same semantics as kernels.reference) -------------------------

    def prepare_one_shot_decode(
        self, inputs: Sequence[Any], parity: Any, out: Any, n: int, parity_scale: float, dtype: Any = "float32"
    ) -> Launch:
        """out = parity_scale * parity - sum_i inputs[i], each of n elements of `dtype`.

        Inputs are separate pointers (up to 64), passed by value in the kernel's parameter
        struct; a packed [k-1, B, d] buffer is passed as base + i * n * itemsize.
        """
        name = _dtype_name(dtype)
        nbytes = n * _ITEMSIZE[name]
        pointers = [device_pointer(x, nbytes=nbytes, dtype=name, what=f"inputs[{i}]") for i, x in enumerate(inputs)]
        params = pack_one_shot(
            pointers,
            device_pointer(parity, nbytes=nbytes, dtype=name, what="parity"),
            device_pointer(out, nbytes=nbytes, dtype=name, what="out"),
            n,
            parity_scale,
        )
        kernel = f"ci_one_shot_decode_{_SUFFIX[name]}"
        return Launch(self, kernel, self.grid(n, _ITEMSIZE[name], kernel, len(params)), params)

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
        name = _dtype_name(dtype)
        nbytes = n * _ITEMSIZE[name]
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
        kernel = f"ci_online_update_{_SUFFIX[name]}"
        return Launch(self, kernel, self.grid(n, _ITEMSIZE[name], kernel, len(params)), params)

    def prepare_general_decode(
        self, coeffs: np.ndarray, inputs: Sequence[Any], outputs: Sequence[Any], n: int, dtype: Any = "float32"
    ) -> list[Launch]:
        """outputs[r] = sum_j coeffs[r, j] * inputs[j]; one launch per 8 output rows."""
        name = _dtype_name(dtype)
        nbytes = n * _ITEMSIZE[name]
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
            kernel = f"ci_general_decode_{_SUFFIX[name]}_r{r_max}"
            launches.append(Launch(self, kernel, self.grid(n, _ITEMSIZE[name], kernel, len(params)), params))
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
        function = self.function("ci_spin_wait", 8)
        params = struct.pack("<q", int(duration_ns))
        check(
            "launch ci_spin_wait",
            function.prepared_async_call,
            (1, 1, 1),
            (1, 1, 1),
            stream or self.default_stream,
            params,
        )


FATBIN_ENV = "CODED_INVNET_FATBIN"  # a prebuilt fatbin (machines without nvcc)


@functools.lru_cache(maxsize=1)
def load_kernels() -> CudaKernels:
    """The process-wide CudaKernels: $CODED_INVNET_FATBIN if set, else the cached build of
    kernels/decoder.cu (compiled with nvcc on first use, see kernels.build)."""
    return CudaKernels(fatbin=os.environ.get(FATBIN_ENV) or None)


class CudaOnlineDecoder:
    """kernels.coding.OnlineDecoder on device pointers: one fused kernel per arrival.

    `shape` is one result's shape (e.g. (B, C, H, W)); `out` is device memory for the
    (k, *shape) answer in `dtype` (allocated here when None; `.out_pointer` is its address).
    add(index, result) takes device memory of `shape` and `dtype` and returns True once, on
    the arrival that completes the group (its kernels are then queued on `.stream`).
    Results must stay alive until finalize(); the decoder keeps references to them.
    The plan (which kernel, which coefficients) is kernels.reference.OnlinePlanner's, shared
    with the numpy ReferenceOnlineDecoder.
    """

    def __init__(
        self,
        scheme: CodingScheme,
        shape: tuple[int, ...],
        *,
        out: Any = None,
        dtype: Any = "float32",
        stream: Any = None,
        kernels: CudaKernels | None = None,
    ) -> None:
        self.planner = OnlinePlanner(scheme)
        self.scheme = scheme
        self.shape = tuple(int(s) for s in shape)
        self.size = math.prod(self.shape)
        self.dtype = _dtype_name(dtype)
        self.kernels = kernels or load_kernels()
        self.stream = stream if stream is not None else self.kernels.new_stream()  # created once
        self._row_bytes = self.size * _ITEMSIZE[self.dtype]
        self._est = self.kernels.alloc(4 * self.size) if self.planner.online else None
        self._est_pointer = int(self._est) if self._est is not None else 0
        self._results: dict[int, tuple[Any, int]] = {}
        self._owned_out: Any = None
        self.set_output(out)

    @property
    def stream_handle(self) -> int:
        """Raw CUstream, for torch.cuda.ExternalStream / cupy.cuda.ExternalStream."""
        return int(self.stream.handle)

    @property
    def ready(self) -> bool:
        return self.planner.ready

    def set_output(self, out: Any) -> None:
        """Decode the next group into `out` ((k, *shape) device memory; None: our own buffer)."""
        nbytes = self.scheme.k * self._row_bytes
        if out is None:
            if self._owned_out is None:
                self._owned_out = self.kernels.alloc(nbytes)
            out = self._owned_out
        self.out = out
        self.out_pointer = device_pointer(out, nbytes=nbytes, dtype=self.dtype, what="out")

    def reset(self, out: Any = None) -> None:
        """Start the next coding group (optionally into a new `out`); buffers are reused."""
        self.planner.reset()
        self._results.clear()
        if out is not None:
            self.set_output(out)

    def _row(self, row: int) -> int:
        return self.out_pointer + row * self._row_bytes

    def add(self, index: int, value: Any) -> bool:
        index = self.planner.check_index(index)
        pointer = device_pointer(value, nbytes=self._row_bytes, dtype=self.dtype, what=f"result of worker {index}")
        accepted, ops = self.planner.add(index)
        if not accepted:
            return False
        self._results[index] = (value, pointer)  # keeps the caller's buffer alive
        for op in ops:
            self._run(op)
        return self.planner.ready

    def _run(self, op: UpdateOp | CopyOp | DecodeOp) -> None:
        kernels, n = self.kernels, self.size
        if isinstance(op, UpdateOp):
            kernels.prepare_online_update(
                self._est_pointer,
                self._results[op.source][1],
                n,
                op.alpha,
                op.beta,
                copy_out=None if op.copy_row is None else self._row(op.copy_row),
                final_out=None if op.final_row is None else self._row(op.final_row),
                final_scale=op.final_scale,
                dtype=self.dtype,
            )(self.stream)
        elif isinstance(op, CopyOp):
            kernels.copy(self._row(op.row), self._results[op.source][1], self._row_bytes, self.stream)
        else:
            inputs = [self._results[s][1] for s in op.sources]
            outputs = [self._row(r) for r in op.rows]
            for launch in kernels.prepare_general_decode(op.coeffs, inputs, outputs, n, self.dtype):
                launch(self.stream)

    def finalize(self) -> Any:
        """`out` (the object given, or our allocation); its kernels are queued on `.stream`."""
        if not self.planner.ready:
            raise CodingError(f"finalize needs k={self.scheme.k} distinct results, got {len(self.planner.received)}")
        return self.out

    def synchronize(self) -> None:
        self.kernels.synchronize(self.stream)
