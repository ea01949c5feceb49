"""CUDA decoder host logic (pointers, packing, plans, streams) on an emulated pycuda driver, on CPU."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import fake_pycuda
import numpy as np
import pytest
from fake_pycuda import FakeDriver

from kernels import cuda_decoder as cd
from kernels import cuda_kernels
from kernels import reference as ref
from kernels.coding import CodingScheme
from kernels.cuda_kernels import CudaKernels
from kernels.errors import CudaDecoderError

RNG = np.random.default_rng(7)

# ---- CPU: the host side of CudaKernels / CudaOnlineDecoder on an emulated driver -------------
# tests/fake_pycuda.py: launches run decoder.cu's kernels through their host twin on a numpy
# heap, and every driver call needs a context current on the calling thread, as on a real
# GPU. It checks the host logic (pointers, row offsets, packing, plan execution, stream use,
# threads) with the real kernels, without a GPU.


def assert_like_reference(got: np.ndarray, want: np.ndarray, fused: bool, err_msg: str = "") -> None:
    """The one-shot and online kernels compute exactly what kernels.reference does; the general
    decode accumulates with fmaf (one rounding per step, the reference two): a few ulp apart."""
    if not fused:
        np.testing.assert_array_equal(got, want, err_msg=err_msg)
    else:
        tol = 1e-6 if got.dtype == np.float32 else 2e-3
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol, err_msg=err_msg)


@pytest.fixture
def fake_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path) -> tuple[CudaKernels, FakeDriver]:
    driver = fake_pycuda.install(monkeypatch)
    return CudaKernels(fatbin=fake_pycuda.write_fake_fatbin(tmp_path / "fake.fatbin")), driver


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
        assert_like_reference(got, expected.finalize(), fused=not decoder.planner.online, err_msg=str(order))
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
    assert_like_reference(got, ref.general_decode(coeffs, xs), fused=True)
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
    fatbin = fake_pycuda.write_fake_fatbin(tmp_path / "prebuilt.fatbin")
    monkeypatch.setenv(cuda_kernels.FATBIN_ENV, str(fatbin))
    monkeypatch.setattr(cuda_kernels.build, "build", lambda *a, **k: pytest.fail("must not compile"))
    cuda_kernels.load_kernels.cache_clear()
    try:
        assert cuda_kernels.load_kernels().device_name == "Fake GPU"
    finally:
        cuda_kernels.load_kernels.cache_clear()


def test_the_emulated_driver_refuses_a_thread_without_a_context(fake_kernels) -> None:
    _, driver = fake_kernels
    with ThreadPoolExecutor(1) as pool:  # raw driver calls: no context on that thread
        with pytest.raises(driver.Error, match="invalid device context"):
            pool.submit(driver.Stream).result()
        with pytest.raises(driver.Error, match="invalid device context"):
            pool.submit(driver.mem_alloc, 64).result()


def test_the_decoder_works_from_threads_other_than_the_importing_one(fake_kernels) -> None:
    """pycuda's context is per thread and autoprimaryctx pushed it on the importing thread
    only: every call through kernels.cuda_driver.check() makes it current where it runs."""
    kernels, driver = fake_kernels
    scheme = CodingScheme.average(3)
    values = RNG.standard_normal((3, 2, 5)).astype(np.float32)
    host = np.concatenate([values, scheme.encode(values)])
    pointers = [driver.put(row) for row in host]  # the "worker results", made here

    def decode() -> np.ndarray:  # built, fed and read on a fresh thread
        decoder = cd.CudaOnlineDecoder(scheme, (2, 5), kernels=kernels)
        for i in (3, 0, 2):
            decoder.add(i, pointers[i])
        decoder.synchronize()
        return driver.view(decoder.out_pointer, values.size, np.float32).reshape(values.shape).copy()

    with ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in [pool.submit(decode) for _ in range(4)]]
    for got in results:
        np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-5)
    assert len(driver.stack()) == 1  # this thread's stack is untouched
