"""CUDA decoder host logic (pointers, packing, plans, streams) on an emulated pycuda driver, on CPU."""

from __future__ import annotations

import itertools
import struct
import sys
import types

import numpy as np
import pytest

from kernels import cuda_decoder as cd
from kernels import cuda_kernels
from kernels import reference as ref
from kernels.coding import CodingScheme
from kernels.cuda_kernels import CudaKernels
from kernels.errors import CudaDecoderError

RNG = np.random.default_rng(7)

# ---- CPU: the host side of CudaKernels / CudaOnlineDecoder on an emulated driver -------------
# A fake pycuda whose "device memory" is one numpy byte heap and whose kernels unpack the
# parameter structs with the offsets written in decoder.cu (not with cuda_params' structs)
# and run kernels.reference. It checks the host logic (pointers, row offsets, packing, plan
# execution, stream use) without a GPU; the real kernels are checked by the gpu tests above.

_HEAP_BASE = 0x10000
_NP_DTYPES = {"f32": np.float32, "f16": np.float16}


class _FakeDriver(types.ModuleType):
    class Error(Exception):
        pass

    class device_attribute:  # noqa: N801 - pycuda's name
        MULTIPROCESSOR_COUNT = "sm_count"

    class function_attribute:  # noqa: N801 - pycuda's name
        NUM_REGS = "num_regs"

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        self.heap = np.zeros(1 << 22, dtype=np.uint8)
        self.top = 0
        self.launches: list[tuple[str, tuple[int, ...], object]] = []
        driver = self

        class Stream:
            def __init__(self) -> None:
                self.handle = 0xABC0 + len(driver.launches)

            def synchronize(self) -> None:
                pass

        class Allocation:
            def __init__(self, address: int) -> None:
                self.address = address

            def __int__(self) -> int:
                return self.address

        class Event:
            def record(self, stream) -> None:
                assert isinstance(stream, Stream)
                self.at = len(driver.launches)

            def synchronize(self) -> None:
                pass

            def time_since(self, start: Event) -> float:
                return 0.001 * (self.at - start.at)  # ms: one microsecond per launch in between

        self.Stream, self.Allocation, self.Event = Stream, Allocation, Event

    def mem_alloc(self, nbytes: int):
        address = _HEAP_BASE + self.top
        self.top += -(-nbytes // 256) * 256
        assert self.top <= self.heap.size, "fake heap exhausted"
        return self.Allocation(address)

    def view(self, address: int, count: int, dtype) -> np.ndarray:
        start = address - _HEAP_BASE
        return self.heap[start : start + count * np.dtype(dtype).itemsize].view(dtype)

    def put(self, array: np.ndarray) -> int:
        address = int(self.mem_alloc(array.nbytes))
        self.view(address, array.size, array.dtype)[:] = array.reshape(-1)
        return address

    def memcpy_dtod_async(self, dst: int, src: int, nbytes: int, stream) -> None:
        assert isinstance(stream, self.Stream)
        self.view(dst, nbytes, np.uint8)[:] = self.view(src, nbytes, np.uint8)

    def module_from_buffer(self, image: bytes):
        assert image[:4] == struct.pack("<I", 0xBA55ED50), "not a fatbin"
        return _FakeModule(self)


class _FakeModule:
    def __init__(self, driver: _FakeDriver) -> None:
        self.driver = driver

    def get_function(self, name: str):
        if not name.startswith("ci_"):
            raise self.driver.Error(f"cuModuleGetFunction failed: named symbol not found ({name})")
        return _FakeFunction(self.driver, name)


class _FakeFunction:
    def __init__(self, driver: _FakeDriver, name: str) -> None:
        self.driver, self.name, self.arg_format = driver, name, None

    def get_attribute(self, attribute: str) -> int:
        assert attribute == "num_regs"
        return 78 if "one_shot" in self.name else 29  # ptxas's counts for sm_90

    def prepare(self, arg_types: list[str]) -> _FakeFunction:
        self.arg_format = "".join(arg_types)
        return self

    def prepared_async_call(self, grid, block, stream, params: bytes) -> None:
        drv = self.driver
        assert isinstance(stream, drv.Stream) and block[0] * block[1] * block[2] <= 256 and grid[0] >= 1
        assert struct.calcsize(self.arg_format) == len(params), "prepared size differs from the blob"
        drv.launches.append((self.name, grid, stream))
        if self.name == "ci_spin_wait":
            return
        dtype = _NP_DTYPES[self.name.split("_")[-1 if "general" not in self.name else -2]]
        if self.name.startswith("ci_one_shot_decode_"):  # OneShotParams
            pointers = struct.unpack_from("<64Q", params, 0)
            parity, out, n, scale, m = struct.unpack_from("<QQqfi", params, 512)
            inputs = [drv.view(p, n, dtype) for p in pointers[:m]]
            assert not any(pointers[m:])
            ref.one_shot_decode(inputs, drv.view(parity, n, dtype), scale, out=drv.view(out, n, dtype))
        elif self.name.startswith("ci_online_update_"):  # OnlineUpdateParams
            est, x, copy_out, final_out, n, alpha, beta, final_scale, _ = struct.unpack("<QQQQqfffi", params)
            ref.online_update(
                drv.view(est, n, np.float32),
                drv.view(x, n, dtype),
                alpha,
                beta,
                copy_out=drv.view(copy_out, n, dtype) if copy_out else None,
                final_out=drv.view(final_out, n, dtype) if final_out else None,
                final_scale=final_scale,
            )
        else:  # GeneralParams
            r_max = int(self.name.rsplit("_r", 1)[1])
            inputs, outputs = struct.unpack_from("<64Q", params, 0), struct.unpack_from("<8Q", params, 512)
            table = np.frombuffer(params, dtype="<f4", count=8 * 64, offset=576).reshape(8, 64)
            n, k, r = struct.unpack_from("<qii", params, 2624)
            assert 1 <= r <= r_max and not table[r:].any()
            decoded = ref.general_decode(table[:r, :k], [drv.view(p, n, dtype) for p in inputs[:k]])
            for row, pointer in zip(decoded, outputs[:r], strict=True):
                drv.view(pointer, n, dtype)[:] = row


@pytest.fixture
def fake_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path) -> tuple[CudaKernels, _FakeDriver]:
    driver = _FakeDriver()

    class Device:
        def name(self) -> str:
            return "Fake GPU"

        def compute_capability(self) -> tuple[int, int]:
            return (9, 0)

        def get_attribute(self, attribute: str) -> int:
            assert attribute == "sm_count"
            return 4

    primary = types.ModuleType("pycuda.autoprimaryctx")
    primary.context = types.SimpleNamespace(get_device=Device)  # type: ignore[attr-defined]
    package = types.ModuleType("pycuda")
    package.driver, package.autoprimaryctx = driver, primary  # type: ignore[attr-defined]
    for name, module in (("pycuda", package), ("pycuda.driver", driver), ("pycuda.autoprimaryctx", primary)):
        monkeypatch.setitem(sys.modules, name, module)
    fatbin = tmp_path / "fake.fatbin"
    fatbin.write_bytes(struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 0))
    return CudaKernels(fatbin=fatbin), driver


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "scheme",
    [CodingScheme.average(3), CodingScheme(n=4, k=3, coefficients=[[0.2, 0.5, 0.3]]), CodingScheme.design(6, 4)],
    ids=repr,
)
def test_cuda_online_decoder_host_logic_on_an_emulated_driver(fake_kernels, scheme: CodingScheme, dtype: str) -> None:
    kernels, driver = fake_kernels
    shape = (2, 5)
    values = RNG.standard_normal((scheme.k, *shape)).astype(np.float32)
    host = np.concatenate([values, scheme.encode(values)]).astype(dtype)  # (n, *shape)
    pointers = [driver.put(row) for row in host]
    decoder = cd.CudaOnlineDecoder(scheme, shape, dtype=dtype, kernels=kernels)
    expected = ref.ReferenceOnlineDecoder(scheme, shape, dtype=dtype)
    for subset in itertools.combinations(range(scheme.n), scheme.k):
        order = [int(i) for i in RNG.permutation(subset)]
        decoder.reset()
        expected.reset()
        driver.launches.clear()
        readies = [decoder.add(i, pointers[i]) for i in order]
        for i in order:
            expected.add(i, host[i])
        assert readies == [False] * (scheme.k - 1) + [True]
        assert decoder.finalize() is decoder.out
        got = driver.view(decoder.out_pointer, scheme.k * values[0].size, dtype).reshape(scheme.k, *shape)
        np.testing.assert_array_equal(got, expected.finalize(), err_msg=str(order))
        assert all(stream is decoder.stream for _, _, stream in driver.launches)
        if decoder.planner.online:  # one fused launch per arrival, except a plain copy at the end
            assert len(driver.launches) == scheme.k - (scheme.n - 1 not in subset)


def test_cuda_kernels_functional_api_on_an_emulated_driver(fake_kernels) -> None:
    kernels, driver = fake_kernels
    xs = [RNG.standard_normal(1003).astype(np.float32) for _ in range(12)]
    pointers = [driver.put(x) for x in xs]
    out = int(driver.mem_alloc(4 * 1003))
    kernels.one_shot_decode(pointers[:4], pointers[4], out, 1003, 5.0)
    np.testing.assert_array_equal(driver.view(out, 1003, np.float32), ref.one_shot_decode(xs[:4], xs[4], 5.0))
    coeffs = RNG.standard_normal((11, 12)).astype(np.float32)
    outs = [int(driver.mem_alloc(4 * 1003)) for _ in range(11)]
    driver.launches.clear()
    kernels.general_decode(coeffs, pointers, outs, 1003)
    assert [name for name, _, _ in driver.launches] == ["ci_general_decode_f32_r8", "ci_general_decode_f32_r4"]
    got = np.stack([driver.view(p, 1003, np.float32) for p in outs])
    np.testing.assert_array_equal(got, ref.general_decode(coeffs, xs))
    assert kernels.grid(1003, 4, "ci_one_shot_decode_f32", 544) == (1, 1, 1)
    assert kernels.grid(10**8, 4, "ci_one_shot_decode_f32", 544) == (4 * 3, 1, 1)  # 4 SMs x 3 blocks at 78 regs
    assert kernels.grid(10**8, 4, "ci_online_update_f32", 56) == (4 * 8, 1, 1)  # 29 regs: a full SM
    with pytest.raises(CudaDecoderError, match="named symbol not found") as info:
        kernels.function("no_such_kernel", 8)
    assert info.value.routine == "cuModuleGetFunction"


def test_event_timing_and_spin_on_an_emulated_driver(fake_kernels) -> None:
    kernels, driver = fake_kernels
    start, end = kernels.new_event(), kernels.new_event()
    kernels.record(start)
    kernels.spin_wait(1_000_000)
    kernels.spin_wait(1_000_000)
    kernels.record(end)
    assert kernels.elapsed_ms(start, end) == pytest.approx(0.002)
    assert [name for name, _, _ in driver.launches] == ["ci_spin_wait"] * 2


def test_load_kernels_uses_a_prebuilt_fatbin(fake_kernels, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fatbin = tmp_path / "prebuilt.fatbin"
    fatbin.write_bytes(struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 0))
    monkeypatch.setenv(cuda_kernels.FATBIN_ENV, str(fatbin))
    monkeypatch.setattr(cuda_kernels.build, "build", lambda *a, **k: pytest.fail("must not compile"))
    cuda_kernels.load_kernels.cache_clear()
    try:
        assert cuda_kernels.load_kernels().device_name == "Fake GPU"
    finally:
        cuda_kernels.load_kernels.cache_clear()
