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
    # a half array is also too small for float32's byte count: the dtype is the error to name
    # (the GPU test of CudaOnlineDecoder.add with a .half() result relies on this order)
    with pytest.raises(CodingError, match="expected dtype float32, got float16"):
        cuda_driver.device_pointer(_FakeCudaArray(0x2000, (4, 3), "<f2"), nbytes=48, dtype="float32")
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
