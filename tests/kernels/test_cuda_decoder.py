"""CUDA decoder: host-side packing and errors on CPU; kernels vs the numpy reference on a GPU."""

from __future__ import annotations

import itertools
import struct
import sys
import types

import numpy as np
import pytest

from kernels import cuda_decoder as cd
from kernels import cuda_driver, cuda_kernels, cuda_params
from kernels import reference as ref
from kernels.coding import CodingScheme, OnlineDecoder
from kernels.cuda_kernels import CudaKernels
from kernels.errors import CodingError, CudaDecoderError, CudaUnavailableError

RNG = np.random.default_rng(7)

# ---- CPU: parameter packing, pointer checks, the status checker ---------------------------


def test_one_shot_params_pack_like_the_cuda_struct() -> None:
    blob = cuda_params.pack_one_shot([0x1000, 0x2000], parity=0x3000, out=0x4000, n=784, parity_scale=4.0)
    assert len(blob) == 544
    assert struct.unpack_from("<2Q", blob, 0) == (0x1000, 0x2000)
    assert struct.unpack_from("<Q", blob, 16) == (0,)  # unused pointer slots are null
    assert struct.unpack_from("<QQqfi", blob, 512) == (0x3000, 0x4000, 784, 4.0, 2)
    with pytest.raises(CodingError, match="at most 64 inputs"):
        cuda_params.pack_one_shot([1] * 65, 1, 1, 1, 1.0)


def test_online_update_and_general_params_pack_like_the_cuda_structs() -> None:
    blob = cuda_params.pack_online_update(
        est=8, x=16, n=5, alpha=-1.0, beta=0.0, copy_out=24, final_out=0, final_scale=2.0
    )
    assert struct.unpack("<QQQQqfffi", blob) == (8, 16, 24, 0, 5, -1.0, 0.0, 2.0, 0)
    coeffs = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    blob = cuda_params.pack_general(coeffs, [16, 32, 48], [64, 80], n=9)
    assert len(blob) == cuda_params.GENERAL_PARAMS_SIZE == 2640
    table = np.frombuffer(blob, dtype="<f4", count=8 * 64, offset=576).reshape(8, 64)
    np.testing.assert_array_equal(table[:2, :3], coeffs)
    assert not table[2:].any() and not table[:, 3:].any()  # the kernel relies on zero rows
    assert struct.unpack_from("<qii", blob, 2624) == (9, 3, 2)
    assert struct.unpack_from("<2Q", blob, 512) == (64, 80)
    with pytest.raises(CodingError, match="2 coefficient rows for 3 outputs"):
        cuda_params.pack_general(coeffs, [16, 32, 48], [64, 80, 96], n=9)


class _FakeCudaArray:
    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str, strides: tuple[int, ...] | None = None):
        self.__cuda_array_interface__ = {
            "data": (pointer, False),
            "shape": shape,
            "typestr": typestr,
            "strides": strides,
            "version": 3,
        }


def test_device_pointer_accepts_cuda_arrays_and_checks_them() -> None:
    assert cuda_driver.device_pointer(0x1000) == 0x1000
    assert cuda_driver.device_pointer(_FakeCudaArray(0x2000, (4, 3), "<f4"), nbytes=48, dtype="float32") == 0x2000
    assert cuda_driver.device_pointer(_FakeCudaArray(0x2000, (4, 3), "<f4", strides=(12, 4)), nbytes=48) == 0x2000
    with pytest.raises(CodingError, match="expected at least 52 bytes, got 48"):
        cuda_driver.device_pointer(_FakeCudaArray(0x2000, (4, 3), "<f4"), nbytes=52)
    with pytest.raises(CodingError, match="expected dtype float32, got float16"):
        cuda_driver.device_pointer(_FakeCudaArray(0x2000, (4, 3), "<f2"), dtype="float32")
    with pytest.raises(CodingError, match=r"C-contiguous array, got strides \(4, 16\)"):
        cuda_driver.device_pointer(_FakeCudaArray(0x2000, (4, 3), "<f4", strides=(4, 16)))
    with pytest.raises(CodingError, match="expected device memory, got ndarray"):
        cuda_driver.device_pointer(np.zeros(3))
    with pytest.raises(CodingError, match="null device pointer"):
        cuda_driver.device_pointer(0)
    with pytest.raises(CodingError, match="expected a device pointer"):
        cuda_driver.device_pointer("0x1000")


def test_device_pointer_rejects_cpu_tensors() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(CodingError, match="expected a CUDA tensor, got one on cpu"):
        cuda_driver.device_pointer(torch.zeros(3))


def test_every_driver_error_becomes_one_error_type(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDriverError(Exception):
        pass

    fake = types.ModuleType("pycuda.driver")
    fake.Error = FakeDriverError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake)

    def failing() -> None:
        raise FakeDriverError("cuModuleGetFunction failed: named symbol not found")

    with pytest.raises(CudaDecoderError, match="trying to find kernel x: cuModuleGetFunction failed") as info:
        cuda_driver.check("find kernel x", failing)
    assert (info.value.routine, info.value.status) == ("cuModuleGetFunction", "named symbol not found")
    assert cuda_driver.check("add", lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(KeyError):  # non-driver errors pass through untouched
        cuda_driver.check("look up", {}.__getitem__, "missing")


def test_missing_pycuda_names_the_gpu_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycuda", None)  # makes `import pycuda...` raise ImportError
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(CudaUnavailableError, match=r"install the `gpu` extra"):
        CudaKernels()


# ---- GPU: kernels vs kernels.reference ------------------------------------------------------


@pytest.fixture(scope="module")
def kernels() -> CudaKernels:
    return cuda_kernels.load_kernels()


def _torch():
    import torch

    return torch


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_TOL = {"float32": (1e-6, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}  # (rtol, atol per k)


def _to_host32(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _random(torch, count: int, n: int, dtype: str, offset: int = 0):
    """`count` device vectors of n elements, starting `offset` elements into their buffer."""
    base = torch.randn(count, n + offset, device="cuda").to(getattr(torch, dtype))
    return [base[i, offset:] for i in range(count)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("k", [2, 4, 10, 33])
def test_one_shot_decode_matches_reference(kernels: CudaKernels, dtype: str, k: int) -> None:
    torch = _torch()
    for n, offset in [(1, 0), (7, 0), (784, 0), (1001, 1), (65536 * 3 + 5, 0)]:
        vectors = _random(torch, k, n, dtype, offset)  # k-1 systematic results + a parity
        out = torch.empty(n + offset, device="cuda", dtype=getattr(torch, dtype))[offset:]
        kernels.one_shot_decode(vectors[:-1], vectors[-1], out, n, float(k), dtype=dtype)
        kernels.synchronize()
        host = [_to_host32(v) for v in vectors]
        expected = ref.one_shot_decode(host[:-1], host[-1], parity_scale=float(k))
        rtol, atol = _TOL[dtype]
        np.testing.assert_allclose(_to_host32(out), expected, rtol=rtol, atol=atol * k, err_msg=f"n={n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_online_update_matches_reference(kernels: CudaKernels, dtype: str) -> None:
    torch = _torch()
    for n, offset in [(5, 0), (4096 + 3, 0), (999, 1)]:
        x = _random(torch, 1, n, dtype, offset)[0]
        est = torch.full((n,), float("nan"), device="cuda")
        kernels.online_update(est, x, n, alpha=-1.5, beta=0.0, dtype=dtype)  # must not read est
        kernels.online_update(est, x, n, alpha=2.0, beta=1.0, dtype=dtype)
        copy = torch.empty_like(x)
        final = torch.empty_like(x)
        kernels.online_update(est, x, n, alpha=4.0, copy_out=copy, final_out=final, final_scale=0.25, dtype=dtype)
        kernels.synchronize()
        host_x = _to_host32(x)
        est_ref = np.zeros(n, dtype=np.float32)
        ref.online_update(est_ref, host_x, -1.5, beta=0.0)
        ref.online_update(est_ref, host_x, 2.0)
        final_ref = np.zeros(n, dtype=np.float32)
        ref.online_update(est_ref, host_x, 4.0, copy_out=None, final_out=final_ref, final_scale=0.25)
        rtol, atol = _TOL[dtype]
        np.testing.assert_allclose(_to_host32(est), est_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(_to_host32(copy), host_x)
        np.testing.assert_allclose(_to_host32(final), final_ref, rtol=rtol, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("rows", "inputs"), [(1, 1), (2, 5), (3, 4), (8, 64), (11, 13)])
def test_general_decode_matches_reference(kernels: CudaKernels, dtype: str, rows: int, inputs: int) -> None:
    torch = _torch()
    n = 3001
    coeffs = RNG.standard_normal((rows, inputs)).astype(np.float32)
    xs = _random(torch, inputs, n, dtype)
    outs = [torch.empty(n, device="cuda", dtype=getattr(torch, dtype)) for _ in range(rows)]
    kernels.general_decode(coeffs, xs, outs, n, dtype=dtype)
    kernels.synchronize()
    host = [_to_host32(x).astype(dtype) for x in xs]
    expected = ref.general_decode(coeffs, host).astype(np.float32)
    rtol, atol = _TOL[dtype]
    got = np.stack([_to_host32(o) for o in outs])
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "scheme",
    [
        CodingScheme.average(1),
        CodingScheme.average(4),
        CodingScheme.average(10),
        CodingScheme(n=4, k=3, coefficients=[[0.2, 0.5, 0.3]]),
        CodingScheme.paper_4_2(),
        CodingScheme.design(6, 4),
    ],
    ids=repr,
)
def test_online_decoder_matches_reference_for_every_erasure(
    kernels: CudaKernels, scheme: CodingScheme, dtype: str
) -> None:
    torch = _torch()
    shape = (3, 1, 28, 28)  # (B, C, H, W) MNIST-sized
    values = RNG.standard_normal((scheme.k, *shape)).astype(np.float32)
    host = np.concatenate([values, scheme.encode(values)]).astype(dtype)  # (n, *shape)
    device = torch.from_numpy(host.astype(np.float32)).to("cuda").to(getattr(torch, dtype))
    out = torch.empty((scheme.k, *shape), device="cuda", dtype=getattr(torch, dtype))
    decoder = cd.CudaOnlineDecoder(scheme, shape, out=out, dtype=dtype, kernels=kernels)
    expected_decoder = ref.ReferenceOnlineDecoder(scheme, shape, dtype=dtype)
    core = OnlineDecoder(scheme, shape)
    for subset in itertools.combinations(range(scheme.n), scheme.k):
        order = [int(i) for i in RNG.permutation(subset)]
        decoder.reset()
        expected_decoder.reset()
        core.reset()
        readies = [decoder.add(i, device[i]) for i in order]
        for i in order:
            expected_decoder.add(i, host[i])
            core.add(i, host[i].astype(np.float32))
        assert readies == [False] * (scheme.k - 1) + [True]
        assert decoder.add(order[0], device[order[0]]) is False  # late
        assert decoder.finalize() is out
        decoder.synchronize()
        got = _to_host32(out)
        rtol, atol = _TOL[dtype]
        np.testing.assert_allclose(
            got, expected_decoder.finalize().astype(np.float32), rtol=rtol, atol=atol * scheme.k, err_msg=str(order)
        )
        np.testing.assert_allclose(got, core.finalize(), rtol=rtol, atol=10 * atol * scheme.k, err_msg=str(order))


@pytest.mark.gpu
def test_online_decoder_owns_its_output_and_stream(kernels: CudaKernels) -> None:
    torch = _torch()
    scheme = CodingScheme.average(2)
    decoder = cd.CudaOnlineDecoder(scheme, (16,), kernels=kernels)
    assert decoder.stream_handle != 0
    f = torch.randn(3, 16, device="cuda")
    f[2] = (f[0] + f[1]) / 2
    torch.cuda.synchronize()
    decoder.add(2, f[2])
    assert decoder.add(1, f[1]) is True
    decoder.finalize()
    decoder.synchronize()
    result = torch.empty(2, 16, device="cuda")
    kernels.copy(result.data_ptr(), decoder.out_pointer, result.numel() * 4, decoder.stream)
    decoder.synchronize()
    np.testing.assert_allclose(_to_host32(result), _to_host32(f[:2]), rtol=0, atol=1e-5)
    with pytest.raises(CodingError, match="expected dtype float32, got float16"):
        decoder.add(0, f[0].half())


@pytest.mark.gpu
def test_cupy_arrays_are_accepted(kernels: CudaKernels) -> None:
    cupy = pytest.importorskip("cupy")
    xs = [cupy.asarray(RNG.standard_normal(1000).astype(np.float32)) for _ in range(3)]
    out = cupy.empty(1000, dtype=cupy.float32)
    cupy.cuda.Device().synchronize()
    kernels.one_shot_decode(xs[:2], xs[2], out, 1000, 3.0)
    kernels.synchronize()
    expected = ref.one_shot_decode([cupy.asnumpy(x) for x in xs[:2]], cupy.asnumpy(xs[2]), 3.0)
    np.testing.assert_allclose(cupy.asnumpy(out), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
def test_driver_errors_carry_the_cuda_status(kernels: CudaKernels) -> None:
    with pytest.raises(CudaDecoderError, match="find kernel ci_no_such_kernel") as info:
        kernels.function("ci_no_such_kernel", 8)
    assert info.value.routine == "cuModuleGetFunction"
    assert info.value.status


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
