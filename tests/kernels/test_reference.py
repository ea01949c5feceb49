"""kernels.reference (the oracle of the CUDA kernels) agrees with the coding core."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kernels import reference as ref
from kernels.coding import CodingScheme, OnlineDecoder
from kernels.errors import CodingError

RNG = np.random.default_rng(20260611)


def _values(k: int, shape: tuple[int, ...]) -> np.ndarray:
    return RNG.standard_normal((k, *shape)).astype(np.float32)  # (k, *shape)


def _tol(k: int) -> float:
    # fp32 accumulation of ~k terms of magnitude <= ~4 (k * parity is ~ sum of k values)
    return 4.0 * k * np.finfo(np.float32).eps * 8


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10, 32])
def test_one_shot_decode_matches_coding_decode_for_every_erasure(k: int) -> None:
    scheme = CodingScheme.average(k)
    shape = (int(RNG.integers(1, 5)), int(RNG.integers(1, 40)))  # (B, d), odd sizes on purpose
    values = _values(k, shape)
    parity = scheme.encode(values)[0]  # (B, d) float32
    for missing in range(k):
        received = [j for j in range(k) if j != missing]
        results = np.stack([values[j] for j in received] + [parity])
        expected = scheme.decode(received + [k], results)[missing]
        got = ref.one_shot_decode([values[j] for j in received], parity, parity_scale=k)
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=_tol(k))
        np.testing.assert_allclose(got, values[missing], rtol=0, atol=_tol(k))


def test_one_shot_decode_fp16_is_fp32_math_rounded_once() -> None:
    inputs = [RNG.standard_normal(37).astype(np.float16) for _ in range(3)]
    parity = RNG.standard_normal(37).astype(np.float16)
    got = ref.one_shot_decode(inputs, parity, parity_scale=4.0)
    acc = 4.0 * parity.astype(np.float32) - sum(x.astype(np.float32) for x in inputs)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, acc.astype(np.float16))


def test_general_decode_is_a_matrix_product() -> None:
    coeffs = RNG.standard_normal((3, 5)).astype(np.float32)  # (R, K)
    inputs = [RNG.standard_normal((2, 9)).astype(np.float32) for _ in range(5)]
    got = ref.general_decode(coeffs, inputs)  # (R, 2, 9)
    expected = np.einsum("rk,kbd->rbd", coeffs.astype(np.float64), np.stack(inputs).astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_online_update_semantics() -> None:
    x = RNG.standard_normal(10).astype(np.float32)
    est = np.full(10, np.nan, dtype=np.float32)  # beta = 0 must not read it
    ref.online_update(est, x, alpha=-2.0, beta=0.0)
    np.testing.assert_array_equal(est, -2.0 * x)
    copy = np.zeros(10, dtype=np.float32)
    final = np.zeros(10, dtype=np.float32)
    before = est.copy()
    ref.online_update(est, x, alpha=3.0, beta=1.0, copy_out=copy, final_out=final, final_scale=0.5)
    np.testing.assert_array_equal(est, before)  # finishing leaves est alone
    np.testing.assert_array_equal(copy, x)
    np.testing.assert_allclose(final, 0.5 * (before + 3.0 * x), rtol=1e-6)
    ref.scaled_accumulate(est, x, alpha=1.0)
    np.testing.assert_allclose(est, before + x, rtol=1e-6)


def _schemes() -> list[CodingScheme]:
    return [
        CodingScheme.average(1),
        CodingScheme.average(2),
        CodingScheme.average(4),
        CodingScheme.average(10),
        CodingScheme(n=4, k=3, coefficients=[[0.2, 0.5, 0.3]]),  # one parity, unequal weights
        CodingScheme.paper_4_2(),
        CodingScheme.design(6, 4),
        CodingScheme.design(5, 2),
        CodingScheme(n=3, k=3, coefficients=np.zeros((0, 3))),  # uncoded
    ]


@pytest.mark.parametrize("scheme", _schemes(), ids=repr)
def test_reference_online_decoder_matches_coding_online_decoder(scheme: CodingScheme) -> None:
    """Every k-subset of the n workers, arriving in a random order, with duplicates and late results."""
    shape = (3, 5)
    values = _values(scheme.k, shape)
    results = np.concatenate([values, scheme.encode(values)]) if scheme.n > scheme.k else values
    ours = ref.ReferenceOnlineDecoder(scheme, shape)
    theirs = OnlineDecoder(scheme, shape)
    for subset in itertools.combinations(range(scheme.n), scheme.k):
        order = list(RNG.permutation(subset))
        ours.reset()
        theirs.reset()
        readies = []
        for position, index in enumerate(order):
            readies.append(ours.add(index, results[index]))
            assert readies[-1] == theirs.add(index, results[index])
            if position == 0:  # a duplicate right after the first arrival is ignored
                assert ours.add(index, results[index]) is theirs.add(index, results[index]) is False
        late = next((i for i in range(scheme.n) if i not in subset), None)
        if late is not None:
            assert ours.add(late, results[late]) is theirs.add(late, results[late]) is False
        assert (ours.planner.late, ours.planner.duplicates) == (theirs.late, theirs.duplicates)
        assert ours.planner.late + ours.planner.duplicates == 1 + (late is not None)
        assert readies == [False] * (scheme.k - 1) + [True]
        got, expected = ours.finalize(), theirs.finalize()
        assert got.shape == (scheme.k, *shape) and got.dtype == np.float32
        cond = scheme.worst_condition_number() if scheme.n > scheme.k else 1.0
        np.testing.assert_allclose(got, expected, rtol=0, atol=_tol(scheme.k) * cond, err_msg=str(order))


def test_average_code_runs_the_fused_form() -> None:
    """For c = 1/k the plan is est -= f_j, est += k p, written straight into the missing row."""
    planner = ref.OnlinePlanner(CodingScheme.average(4))
    _, (first,) = planner.add(4)  # parity first
    assert (first.alpha, first.beta, first.copy_row, first.final_row) == (4.0, 0.0, None, None)
    _, (second,) = planner.add(0)
    assert (second.alpha, second.beta, second.copy_row) == (-1.0, 1.0, 0)
    planner.add(2)
    _, (last,) = planner.add(3)
    assert (last.final_row, last.final_scale, last.copy_row) == (1, 1.0, 3)


def test_errors_name_what_was_expected() -> None:
    x = np.zeros(4, dtype=np.float32)
    with pytest.raises(CodingError, match="at most 64 inputs"):
        ref.one_shot_decode([x] * 65, x, 1.0)
    with pytest.raises(CodingError, match=r"inputs\[1\]: expected shape \(4,\), got \(5,\)"):
        ref.one_shot_decode([x, np.zeros(5, np.float32)], x, 1.0)
    with pytest.raises(CodingError, match="dtype must be one of"):
        ref.one_shot_decode([x], x.astype(np.int32), 1.0)
    with pytest.raises(CodingError, match="estimate must be float32"):
        ref.online_update(x.astype(np.float16), x, 1.0)
    with pytest.raises(CodingError, match=r"coeffs must have shape \(R, K=2\)"):
        ref.general_decode(np.ones((1, 3)), [x, x])
    decoder = ref.ReferenceOnlineDecoder(CodingScheme.average(2), (4,))
    with pytest.raises(CodingError, match="worker index must be in 0..2"):
        decoder.add(3, x)
    with pytest.raises(CodingError, match=r"expected shape \(4,\), got \(5,\)"):
        decoder.add(0, np.zeros(5, np.float32))
    with pytest.raises(CodingError, match="finalize needs k=2 distinct results, got 0"):
        decoder.finalize()
    with pytest.raises(CodingError, match="supports k <= 64"):
        ref.OnlinePlanner(CodingScheme.average(65))
