"""An emulated pycuda for CPU tests of the GPU host code (kernels.cuda_*, runtime.engines).

Device memory is one numpy byte heap at real host addresses; a launch checks its parameter
struct with the offsets written in decoder.cu (not with kernels.cuda_params' structs: every
pointer must lie in the heap) and then runs the real kernel on the heap through the host
twin of decoder.cu (kernels.host_twin; the test skips, saying so, where no C++ compiler is).
Like the real driver, every call needs a CUDA context current on the CALLING thread
(contexts are per thread; `pycuda.autoprimaryctx` pushes the primary one on the importing
thread only), and otherwise fails with CUDA's "invalid device context". Allocations are
tracked, so tests can see leaks and frees.

    driver = install(monkeypatch)    # sys.modules["pycuda"...] -> the fake, primary pushed here
"""

from __future__ import annotations

import struct
import sys
import threading
import types
from typing import Any

import numpy as np
import pytest

HEAP_BYTES = 1 << 22
NP_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}  # bf16: same size
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


class FakeDriver(types.ModuleType):
    class Error(Exception):
        pass

    class device_attribute:  # noqa: N801 - pycuda's name
        MULTIPROCESSOR_COUNT = "sm_count"

    class function_attribute:  # noqa: N801 - pycuda's name
        NUM_REGS = "num_regs"

    def __init__(self, sm_count: int = 4) -> None:
        super().__init__("pycuda.driver")
        raw = np.zeros(HEAP_BYTES + 256, dtype=np.uint8)
        start = -raw.ctypes.data % 256  # allocations are 256-byte aligned, as cuMemAlloc's are
        self.heap = raw[start : start + HEAP_BYTES]
        self.heap_base = self.heap.ctypes.data
        self.top = 0
        self.launches: list[tuple[str, tuple[int, ...], object]] = []
        self.live: dict[int, int] = {}  # device address -> bytes, not yet freed
        self.pinned_live = 0  # page-locked host buffers not yet freed
        self.pinned_made = 0
        self._stacks = threading.local()
        driver = self

        class Device:
            def name(self) -> str:
                return "Fake GPU"

            def compute_capability(self) -> tuple[int, int]:
                return (9, 0)

            def get_attribute(self, attribute: str) -> int:
                assert attribute == "sm_count"
                return sm_count

        class Context:
            def __init__(self, handle: int) -> None:
                self.handle = handle

            def push(self) -> None:
                driver.stack().append(self)

            @staticmethod
            def pop() -> None:
                driver.stack().pop()

            @staticmethod
            def get_current() -> Context | None:
                stack = driver.stack()
                return stack[-1] if stack else None

            def get_device(self) -> Device:
                driver.need_context("cuCtxGetDevice")
                return Device()

        class Stream:
            def __init__(self) -> None:
                driver.need_context("cuStreamCreate")
                self.handle = 0xABC0 + len(driver.launches)

            def synchronize(self) -> None:
                driver.need_context("cuStreamSynchronize")

        class Allocation:
            def __init__(self, address: int) -> None:
                self.address = address

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                driver.need_context("cuMemFree")
                driver.live.pop(self.address)

        class HostAllocation(bytearray):
            def free(self) -> None:
                driver.need_context("cuMemFreeHost")
                driver.pinned_live -= 1

        class Event:
            def __init__(self) -> None:
                driver.need_context("cuEventCreate")

            def record(self, stream: Any) -> None:
                driver.need_context("cuEventRecord")
                assert isinstance(stream, Stream)
                self.at = len(driver.launches)

            def synchronize(self) -> None:
                driver.need_context("cuEventSynchronize")

            def time_since(self, start: Any) -> float:
                return 0.001 * (self.at - start.at)  # ms: one microsecond per launch in between

        self.Device, self.Context, self.Stream = Device, Context, Stream
        self.Allocation, self.HostAllocation, self.Event = Allocation, HostAllocation, Event
        self.primary = Context(0xC0)

    # -- contexts ----------------------------------------------------------------------------
    def stack(self) -> list[Any]:
        if not hasattr(self._stacks, "stack"):
            self._stacks.stack = []
        return self._stacks.stack

    def need_context(self, routine: str) -> None:
        if not self.stack():
            raise self.Error(f"{routine} failed: invalid device context")

    # -- memory ------------------------------------------------------------------------------
    def mem_alloc(self, nbytes: int) -> Any:
        self.need_context("cuMemAlloc")
        address = self.heap_base + self.top
        self.top += -(-nbytes // 256) * 256
        assert self.top <= self.heap.size, "fake heap exhausted"
        self.live[address] = nbytes
        return self.Allocation(address)

    def pagelocked_empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        self.need_context("cuMemHostAlloc")
        dtype = np.dtype(dtype)
        buffer = self.HostAllocation(int(np.prod(shape)) * dtype.itemsize)
        self.pinned_live += 1
        self.pinned_made += 1
        return np.ndarray(shape, dtype, buffer=buffer)  # .base is the allocation, as in pycuda

    def pinned(self, array: np.ndarray) -> bool:
        """Whether `array` lies in page-locked memory (a view of a pagelocked_empty array)."""
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        return isinstance(base, self.HostAllocation)

    def view(self, address: int, count: int, dtype: Any) -> np.ndarray:
        start = int(address) - self.heap_base
        end = start + count * np.dtype(dtype).itemsize
        assert 0 <= start <= end <= self.heap.size, f"{address:#x} + {end - start} bytes is not device memory"
        return self.heap[start:end].view(dtype)

    def put(self, array: np.ndarray) -> int:
        address = int(self.mem_alloc(array.nbytes))
        self.view(address, array.size, array.dtype)[:] = array.reshape(-1)
        return address

    def memcpy_dtod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.need_context("cuMemcpyDtoDAsync")
        assert isinstance(stream, self.Stream)
        self.view(dst, nbytes, np.uint8)[:] = self.view(src, nbytes, np.uint8)

    def memcpy_htod_async(self, dst: Any, src: np.ndarray, stream: Any) -> None:
        self.need_context("cuMemcpyHtoDAsync")
        assert isinstance(stream, self.Stream)
        assert self.pinned(src), "async copies need page-locked memory"
        self.view(dst, src.nbytes, np.uint8)[:] = src.reshape(-1).view(np.uint8)

    def memcpy_dtoh_async(self, dst: np.ndarray, src: Any, stream: Any) -> None:
        self.need_context("cuMemcpyDtoHAsync")
        assert isinstance(stream, self.Stream)
        assert self.pinned(dst), "async copies need page-locked memory"
        dst.reshape(-1).view(np.uint8)[:] = self.view(src, dst.nbytes, np.uint8)

    def module_from_buffer(self, image: bytes) -> FakeModule:
        self.need_context("cuModuleLoadData")
        assert image[:4] == FATBIN_MAGIC, "not a fatbin"
        return FakeModule(self)


class FakeModule:
    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver

    def get_function(self, name: str) -> FakeFunction:
        self.driver.need_context("cuModuleGetFunction")
        if not name.startswith("ci_"):
            raise self.driver.Error(f"cuModuleGetFunction failed: named symbol not found ({name})")
        return FakeFunction(self.driver, name)


class FakeFunction:
    def __init__(self, driver: FakeDriver, name: str) -> None:
        self.driver, self.name, self.arg_format = driver, name, None

    def get_attribute(self, attribute: str) -> int:
        assert attribute == "num_regs"
        return 78 if "one_shot" in self.name else 29  # ptxas's counts for sm_90

    def prepare(self, arg_types: list[str]) -> FakeFunction:
        self.arg_format = "".join(arg_types)
        return self

    def prepared_async_call(self, grid: tuple[int, ...], block: tuple[int, ...], stream: Any, params: bytes) -> None:
        drv = self.driver
        drv.need_context("cuLaunchKernel")
        assert isinstance(stream, drv.Stream) and block[0] * block[1] * block[2] <= 256 and grid[0] >= 1
        assert struct.calcsize(self.arg_format) == len(params), "prepared size differs from the blob"
        drv.launches.append((self.name, grid, stream))
        if self.name == "ci_spin_wait":
            return
        # The struct as decoder.cu lays it out: every pointer the kernel will touch must be
        # fake device memory (the twin trusts pointers, as a GPU does), unused slots zero.
        dtype = NP_DTYPES[self.name.split("_")[-1 if "general" not in self.name else -2]]
        if self.name.startswith("ci_one_shot_decode_"):  # OneShotParams
            pointers = struct.unpack_from("<64Q", params, 0)
            parity, out, n, _scale, m = struct.unpack_from("<QQqfi", params, 512)
            assert 0 <= m <= 64 and not any(pointers[m:])
            for pointer in (*pointers[:m], parity, out):
                drv.view(pointer, n, dtype)
        elif self.name.startswith("ci_online_update_"):  # OnlineUpdateParams
            est, x, copy_out, final_out, n, *_ = struct.unpack("<QQQQqfffi", params)
            drv.view(x, n, dtype)
            if not final_out:
                drv.view(est, n, np.float32)
            for pointer in (copy_out, final_out):
                if pointer:
                    drv.view(pointer, n, dtype)
        else:  # GeneralParams
            r_max = int(self.name.rsplit("_r", 1)[1])
            inputs, outputs = struct.unpack_from("<64Q", params, 0), struct.unpack_from("<8Q", params, 512)
            table = np.frombuffer(params, dtype="<f4", count=8 * 64, offset=576).reshape(8, 64)
            n, k, r = struct.unpack_from("<qii", params, 2624)
            assert 1 <= r <= r_max and 1 <= k <= 64 and not table[r:].any()
            assert not any(inputs[k:]) and not any(outputs[r:])
            for pointer in (*inputs[:k], *outputs[:r]):
                drv.view(pointer, n, dtype)
        host_twin().launch(self.name, grid[0], block[0] * block[1] * block[2], params)


def host_twin() -> Any:
    """decoder.cu built for the host (kernels.host_twin); skips the test where it cannot be built."""
    from kernels.errors import KernelBuildError
    from kernels.host_twin import load_twin

    try:
        return load_twin()
    except KernelBuildError as exc:
        pytest.skip(f"the host twin of decoder.cu cannot be built here: {exc}")


def install(monkeypatch: pytest.MonkeyPatch, sm_count: int = 4) -> FakeDriver:
    """The fake as `pycuda`, `pycuda.driver` and `pycuda.autoprimaryctx`; "importing" the
    latter pushed the primary context on THIS thread only, as the real one does."""
    from kernels import cuda_driver

    driver = FakeDriver(sm_count)
    driver.primary.push()
    primary = types.ModuleType("pycuda.autoprimaryctx")
    primary.context = driver.primary  # type: ignore[attr-defined]
    package = types.ModuleType("pycuda")
    package.driver, package.autoprimaryctx = driver, primary  # type: ignore[attr-defined]
    for name, module in (("pycuda", package), ("pycuda.driver", driver), ("pycuda.autoprimaryctx", primary)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(cuda_driver, "_primary", None)  # attached again by import_pycuda()
    return driver


def write_fake_fatbin(path: Any) -> Any:
    path.write_bytes(FATBIN_MAGIC + struct.pack("<HHQ", 1, 16, 0))
    return path
