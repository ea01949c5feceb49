"""decoder.cu's kernels on the CPU (kernels.host_twin) against kernels.reference, bit for bit.

Launches get the parameter bytes kernels.cuda_params packs for the GPU and pointers into
host buffers that carry guard bytes on both sides and a chosen misalignment, so each case
exercises the 16-byte vector path or the scalar path, the tails, grid-stride loops over
small grids, and the fp16 / bf16 conversions; every byte outside the outputs must stay as
it was. The general decode accumulates with fmaf, so its oracle rounds each step once
(exact in float64: a float32 product is exact there).
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

from kernels import reference as ref
from kernels.cuda_params import (
    GENERAL_PARAMS_SIZE,
    ONE_SHOT_PARAMS,
    ONLINE_UPDATE_PARAMS,
    pack_general,
    pack_one_shot,
    pack_online_update,
)
from kernels.errors import KernelBuildError, KernelsError

DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
GUARD = 64  # bytes of 0xA5 on each side of every buffer
FILL = 0xA5


@pytest.fixture(scope="module")
def twin():
    from kernels.host_twin import load_twin

    try:
        return load_twin()
    except KernelBuildError as exc:
        pytest.skip(f"no host twin here: {exc}")


@pytest.fixture(autouse=True)
def _overflow_is_expected():
    """Values reach fp16's overflow and subnormal range on purpose: numpy may not warn."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        yield


class Buffers:
    """Host buffers at chosen offsets from 16-byte alignment, each between guard bytes."""

    def __init__(self) -> None:
        self._raws: list[tuple[np.ndarray, int, int]] = []

    def place(self, values: np.ndarray, misalign: int = 0) -> tuple[int, np.ndarray]:
        values = np.ascontiguousarray(values)
        raw = np.full(values.nbytes + 2 * GUARD + 16, FILL, dtype=np.uint8)
        start = GUARD + (misalign - raw.ctypes.data - GUARD) % 16
        view = raw[start : start + values.nbytes].view(values.dtype).reshape(values.shape)
        view[...] = values
        assert (view.ctypes.data % 16) == misalign % 16
        self._raws.append((raw, start, values.nbytes))
        return view.ctypes.data, view

    def guards_intact(self) -> bool:
        return all(
            (raw[:start] == FILL).all() and (raw[start + nbytes :] == FILL).all() for raw, start, nbytes in self._raws
        )


def launch_shape(rng: np.random.Generator) -> tuple[int, int]:
    """(grid, block): one thread, odd sizes, the real 256-thread blocks, more threads than work."""
    return [(1, 1), (1, 7), (3, 32), (2, 256), (5, 256), (64, 256)][rng.integers(6)]


def values(rng: np.random.Generator, n: int, dtype: np.dtype, spread: float = 3.0) -> np.ndarray:
    """Random values over many binades (fp16 subnormals and overflow included for the 16-bit types)."""
    magnitude = 10.0 ** rng.uniform(-spread, spread / 2, n) if dtype != np.float32 else 1.0
    return (rng.standard_normal(n) * magnitude).astype(np.float32).astype(dtype)


def misalignment(rng: np.random.Generator, dtype: np.dtype) -> int:
    """Mostly aligned (the vector path); sometimes one element off (the scalar path)."""
    return 0 if rng.random() < 0.6 else int(dtype.itemsize * rng.integers(1, 16 // dtype.itemsize))


CASES = range(36)


def test_struct_sizes_are_those_cuda_params_packs(twin) -> None:
    for suffix in DTYPES:
        assert twin.param_bytes(f"ci_one_shot_decode_{suffix}") == ONE_SHOT_PARAMS.size == 544
        assert twin.param_bytes(f"ci_online_update_{suffix}") == ONLINE_UPDATE_PARAMS.size == 56
        for r in (1, 2, 4, 8):
            assert twin.param_bytes(f"ci_general_decode_{suffix}_r{r}") == GENERAL_PARAMS_SIZE == 2640
    assert twin.param_bytes("ci_spin_wait") == -1  # device-only
    with pytest.raises(KernelsError, match="no kernel named 'ci_nothing'"):
        twin.launch("ci_nothing", 1, 1, b"")
    with pytest.raises(KernelsError, match="55 parameter bytes, its struct has 56"):
        twin.launch("ci_online_update_f32", 1, 1, bytes(55))
    with pytest.raises(KernelsError, match="grid >= 1"):
        twin.launch("ci_online_update_f32", 0, 1, bytes(56))


@pytest.mark.parametrize("case", CASES)
def test_one_shot_decode_matches_the_reference(twin, case: int) -> None:
    rng = np.random.default_rng(1000 + case)
    suffix = list(DTYPES)[case % 3]
    dtype = DTYPES[suffix]
    n = int(rng.choice([1, 3, 7, 8, 9, 16, 17, 255, 1003, 4101]))
    m = int(rng.choice([0, 1, 3, 7, 8, 9, 16, 17, 63, 64]))
    scale = float(rng.choice([1.0, m + 1.0, 0.37, 3.1e4]))
    buffers = Buffers()
    inputs = [values(rng, n, dtype) for _ in range(m)]
    parity = values(rng, n, dtype)
    pointers = [buffers.place(x, misalignment(rng, dtype))[0] for x in inputs]
    parity_pointer = buffers.place(parity, misalignment(rng, dtype))[0]
    out_pointer, out = buffers.place(np.zeros(n, dtype), misalignment(rng, dtype))
    grid, block = launch_shape(rng)
    params = pack_one_shot(pointers, parity_pointer, out_pointer, n, scale)
    twin.launch(f"ci_one_shot_decode_{suffix}", grid, block, params)
    np.testing.assert_array_equal(out, ref.one_shot_decode(inputs, parity, scale), err_msg=f"n={n} m={m}")
    assert buffers.guards_intact()


@pytest.mark.parametrize("case", CASES)
def test_online_update_matches_the_reference(twin, case: int) -> None:
    rng = np.random.default_rng(2000 + case)
    suffix = list(DTYPES)[case % 3]
    dtype = DTYPES[suffix]
    n = int(rng.choice([1, 4, 5, 8, 9, 31, 1003, 4101]))
    alpha, beta = float(rng.choice([-1.0, 4.0, 0.3])), float(rng.choice([0.0, 1.0, -0.25]))
    copy, finish = bool(rng.integers(2)), bool(rng.integers(2))
    final_scale = float(rng.choice([1.0, 0.25, 5.0]))
    buffers = Buffers()
    x = values(rng, n, dtype)
    est0 = rng.standard_normal(n).astype(np.float32)
    if beta == 0.0:
        est0[:] = np.nan  # beta == 0 must not read the estimate
    est_pointer, est = buffers.place(est0, int(rng.choice([0, 0, 4, 8])))
    x_pointer = buffers.place(x, misalignment(rng, dtype))[0]
    copy_pointer, copied = buffers.place(np.zeros(n, dtype), misalignment(rng, dtype)) if copy else (0, None)
    final_pointer, final = buffers.place(np.zeros(n, dtype), misalignment(rng, dtype)) if finish else (0, None)
    grid, block = launch_shape(rng)
    params = pack_online_update(est_pointer, x_pointer, n, alpha, beta, copy_pointer, final_pointer, final_scale)
    twin.launch(f"ci_online_update_{suffix}", grid, block, params)

    want_est, want_copy, want_final = est0.copy(), np.zeros(n, dtype), np.zeros(n, dtype)
    ref.online_update(
        want_est, x, alpha, beta, copy_out=want_copy if copy else None,
        final_out=want_final if finish else None, final_scale=final_scale,
    )
    np.testing.assert_array_equal(est, want_est)  # untouched when finishing
    if copy:
        np.testing.assert_array_equal(copied, want_copy)
    if finish:
        np.testing.assert_array_equal(final, want_final)
        assert not np.isnan(final.astype(np.float32)).any() or beta != 0.0
    assert buffers.guards_intact()


def fma_general_decode(coeffs: np.ndarray, inputs: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """decoder.cu's general decode: acc = fmaf(c, x, acc) per input, j ascending, one rounding each."""
    out = []
    for row in coeffs.astype(np.float32):
        acc = np.zeros(inputs[0].shape, np.float32)
        for c, x in zip(row, inputs, strict=True):
            acc = (np.float64(c) * x.astype(np.float32).astype(np.float64) + acc.astype(np.float64)).astype(np.float32)
        out.append(acc.astype(dtype))
    return np.stack(out)


@pytest.mark.parametrize("case", CASES)
def test_general_decode_matches_an_fma_reference(twin, case: int) -> None:
    rng = np.random.default_rng(3000 + case)
    suffix = list(DTYPES)[case % 3]
    dtype = DTYPES[suffix]
    n = int(rng.choice([1, 3, 8, 9, 17, 1003, 2051]))
    k = int(rng.choice([1, 2, 4, 5, 9, 17, 64]))
    rows = int(rng.integers(1, 9))
    r_max = next(r for r in (1, 2, 4, 8) if r >= rows)
    coeffs = rng.standard_normal((rows, k)).astype(np.float32)
    buffers = Buffers()
    inputs = [values(rng, n, dtype, spread=2.0) for _ in range(k)]
    in_pointers = [buffers.place(x, misalignment(rng, dtype))[0] for x in inputs]
    outs = [buffers.place(np.zeros(n, dtype), misalignment(rng, dtype)) for _ in range(rows)]
    grid, block = launch_shape(rng)
    params = pack_general(coeffs, in_pointers, [p for p, _ in outs], n)
    twin.launch(f"ci_general_decode_{suffix}_r{r_max}", grid, block, params)
    got = np.stack([view for _, view in outs])
    np.testing.assert_array_equal(got, fma_general_decode(coeffs, inputs, dtype), err_msg=f"n={n} k={k} R={rows}")
    assert buffers.guards_intact()


def ties_and_edges(dtype: np.dtype) -> np.ndarray:
    """float32 values that probe float32 -> dtype rounding: every representable value of the
    16-bit type, the midpoints between neighbours (ties to even), just either side of them,
    the overflow threshold, NaN and both infinities."""
    grid16 = np.arange(0x10000, dtype=np.uint16).view(dtype).astype(np.float32)
    finite = np.sort(np.unique(grid16[np.isfinite(grid16)]))
    mid = (finite[:-1].astype(np.float64) + finite[1:].astype(np.float64)) / 2
    mid32 = mid.astype(np.float32)
    exact = mid32[mid32.astype(np.float64) == mid]  # midpoints float32 holds exactly: true ties
    probes = [grid16, exact, np.nextafter(exact, np.float32(np.inf)), np.nextafter(exact, np.float32(-np.inf))]
    top = np.float32(finite[-1])
    probes.append(np.array([np.nan, np.inf, -np.inf, top * 1.001, -top * 1.001, 1e-30, -1e-30, 0.0, -0.0], np.float32))
    return np.concatenate(probes).astype(np.float32)


@pytest.mark.parametrize("suffix", ["f16", "bf16"])
def test_float32_to_16_bit_rounding_matches_numpy_everywhere(twin, suffix: str) -> None:
    """Through the finishing online update (alpha = 0, beta = 1: out = T(est)), so the kernel's
    own store path rounds arbitrary float32 values; numpy / ml_dtypes round to nearest even."""
    dtype = DTYPES[suffix]
    est_values = ties_and_edges(dtype)
    n = est_values.size
    buffers = Buffers()
    est_pointer, _ = buffers.place(est_values)
    x_pointer, _ = buffers.place(np.zeros(n, dtype))
    out_pointer, out = buffers.place(np.zeros(n, dtype))
    params = pack_online_update(est_pointer, x_pointer, n, 0.0, 1.0, 0, out_pointer, 1.0)
    twin.launch(f"ci_online_update_{suffix}", 8, 256, params)
    want = (est_values * np.float32(1.0) + np.float32(0.0)).astype(dtype)  # the kernel's arithmetic
    got_bits, want_bits = out.view(np.uint16), want.view(np.uint16)
    nan = np.isnan(want.astype(np.float32))
    assert np.isnan(out.astype(np.float32)[nan]).all()
    mismatch = np.flatnonzero((got_bits != want_bits) & ~nan)
    assert mismatch.size == 0, f"{mismatch.size} values round differently, e.g. {est_values[mismatch[:5]]}"
    assert buffers.guards_intact()


def test_launches_from_several_threads_at_once(twin) -> None:
    """Launch indices are per thread in the twin (ctypes releases the GIL: launches overlap)."""
    rng = np.random.default_rng(5)
    n, errors = 200_003, []
    jobs = []
    for _ in range(4):
        buffers = Buffers()
        xs = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
        pointers = [buffers.place(x)[0] for x in xs]
        out_pointer, out = buffers.place(np.zeros(n, np.float32))
        params = pack_one_shot(pointers[:2], pointers[2], out_pointer, n, 3.0)
        jobs.append((params, out, ref.one_shot_decode(xs[:2], xs[2], 3.0), buffers))

    def run(params: bytes, out: np.ndarray, want: np.ndarray) -> None:
        for _ in range(5):
            out[:] = 0
            twin.launch("ci_one_shot_decode_f32", 7, 256, params)
            if not np.array_equal(out, want):
                errors.append("wrong result")

    threads = [threading.Thread(target=run, args=job[:3]) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(job[3].guards_intact() for job in jobs)


def test_twin_is_cached_by_source_and_rebuilt_when_the_kernel_changes(tmp_path, monkeypatch) -> None:
    from kernels import host_twin

    try:
        compiler = host_twin.find_compiler()
    except KernelBuildError as exc:
        pytest.skip(str(exc))
    first = host_twin.build_twin(cache_dir=tmp_path)
    assert first.parent == tmp_path and host_twin.build_twin(cache_dir=tmp_path) == first
    edited = tmp_path / "decoder.cu"
    edited.write_text(host_twin.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(host_twin, "TWIN_SOURCES", (edited, *host_twin.TWIN_SOURCES[1:]))
    assert host_twin.twin_path(compiler, tmp_path) != first  # a kernel edit gets a new library
    with pytest.raises(KernelBuildError, match=r"no C\+\+ compiler"):
        host_twin.find_compiler("no-such-compiler-here")
