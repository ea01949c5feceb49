"""The pycuda boundary: one status checker, the primary context, and device pointers.

pycuda is imported lazily and attaches to the device's PRIMARY context
(`pycuda.autoprimaryctx`, never `autoinit`), the one torch, CuPy and TensorRT use, so their
pointers are valid here. A CUDA context is current per thread, and autoprimaryctx pushes it
on the importing thread only; so every driver call goes through `check()`, which first makes
the primary context current on the calling thread (once per thread: executor threads, the
event loop, a waiter thread alike) and then turns pycuda's exceptions into one
CudaDecoderError carrying the CUDA routine and status. Argument errors raise CodingError,
like the numpy reference (kernels.reference).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from kernels.errors import CodingError, CudaDecoderError, CudaUnavailableError
from kernels.reference import check_dtype

SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # kernel name suffix per dtype
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

T = TypeVar("T")

_primary: Any = None  # the primary context, once import_pycuda() has attached to it
_this_thread = threading.local()  # .context: the context this thread has made current


def make_current(context: Any) -> None:
    """Make `context` current on the calling thread (idempotent; a dict lookup after the first
    call on a thread). Pushed, never popped: the threads that call the driver live as long as
    the runtime, and the primary context outlives them all."""
    if getattr(_this_thread, "context", None) is context:
        return
    driver = sys.modules["pycuda.driver"]
    current = driver.Context.get_current()
    if current is None or current.handle != context.handle:
        context.push()
    _this_thread.context = context


def check(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one driver call on this thread with the primary context current; a pycuda error
    becomes CudaDecoderError(what, routine, status).

    pycuda formats its errors as "<routine> failed: <status text>[ - <log>]".
    """
    try:
        if _primary is not None:
            make_current(_primary)
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


def import_pycuda() -> tuple[Any, Any]:
    """(pycuda.driver, primary context) or CudaUnavailableError saying how to get them; from
    then on check() makes that context current on whichever thread calls the driver."""
    global _primary
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
    _primary = primary.context
    return driver, primary.context


def dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str) and dtype in SUFFIX:
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
    # dtype first: a byte count in the wrong element type says nothing useful
    if dtype is not None and got_dtype is not None and got_dtype != dtype:
        raise CodingError(f"{what}: expected dtype {dtype}, got {got_dtype}")
    if nbytes is not None and got_bytes is not None and got_bytes < nbytes:
        raise CodingError(f"{what}: expected at least {nbytes} bytes, got {got_bytes}")
    return pointer


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))
