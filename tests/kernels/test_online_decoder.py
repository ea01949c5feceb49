"""OnlineDecoder == batch decode for every arrival order, incl. duplicates and late results."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.coding import CodingScheme, OnlineDecoder
from kernels.errors import CodingError

SCHEMES = {
    "average_k2": CodingScheme.average(2),
    "average_k4": CodingScheme.average(4),
    "average_k10": CodingScheme.average(10),
    "paper_4_2": CodingScheme.paper_4_2(),
    "design_6_4": CodingScheme.design(6, 4),
    "design_12_10": CodingScheme.design(12, 10),
}
SHAPE = (2, 3, 3)
# float64 accumulation and solve vs the batch float64 solve: same math, different operation
# order, so agreement is to rounding (scaled by the design's condition number, <= ~600).
RTOL = 1e-10
ATOL = 1e-12


def _worker_results(scheme: CodingScheme, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(scheme.k, *SHAPE))  # (k, *SHAPE)
    return f, np.concatenate([f, scheme.encode(f)])  # (n, *SHAPE)


def _feed(decoder: OnlineDecoder, arrivals: list[int], results: np.ndarray) -> list[bool]:
    return [decoder.add(i, results[i]) for i in arrivals]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_online_equals_batch_for_any_arrival_sequence(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SCHEMES)), label="scheme")
    scheme = SCHEMES[name]
    order = data.draw(st.permutations(range(scheme.n)), label="order")
    # sprinkle repeats of already-sent ids (retries) anywhere after their first arrival
    arrivals = list(order)
    repeats = data.draw(st.lists(st.integers(0, scheme.n - 1), max_size=4), label="repeats")
    for worker in repeats:
        first = arrivals.index(worker)
        at = data.draw(st.integers(first + 1, len(arrivals)), label="repeat position")
        arrivals.insert(at, worker)
    f, results = _worker_results(scheme, seed=data.draw(st.integers(0, 2**16), label="seed"))

    decoder = OnlineDecoder(scheme, SHAPE, dtype=np.float64)
    returned = _feed(decoder, arrivals, results)

    first_k = list(dict.fromkeys(arrivals))[: scheme.k]  # first k distinct, in arrival order
    ready_at = next(i for i, _ in enumerate(arrivals) if len(set(arrivals[: i + 1])) == scheme.k)
    assert returned == [i == ready_at for i in range(len(arrivals))]
    assert decoder.ready
    assert decoder.received == tuple(first_k)
    assert decoder.missing == tuple(j for j in range(scheme.k) if j not in first_k)
    assert decoder.late == len(arrivals) - ready_at - 1
    assert decoder.duplicates == sum(
        1 for i in range(ready_at + 1) if arrivals[i] in arrivals[:i]
    )
    expected = scheme.decode(first_k, results[first_k])
    online = decoder.finalize()
    np.testing.assert_allclose(online, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(online, f, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["average_k4", "paper_4_2", "design_6_4"])
def test_every_arrival_order_exhaustively(name: str) -> None:
    scheme = SCHEMES[name]
    f, results = _worker_results(scheme, seed=5)
    decoder = OnlineDecoder(scheme, SHAPE, dtype=np.float64)
    for order in itertools.permutations(range(scheme.n)):
        decoder.reset()
        _feed(decoder, list(order), results)
        first_k = list(order[: scheme.k])
        np.testing.assert_allclose(
            decoder.finalize(), scheme.decode(first_k, results[first_k]), rtol=RTOL, atol=ATOL
        )


def test_parity_first_and_parity_last() -> None:
    scheme = CodingScheme.average(3)
    f, results = _worker_results(scheme, seed=11)
    for arrivals in ([3, 0, 2], [0, 2, 3], [3, 2, 1]):
        decoder = OnlineDecoder(scheme, SHAPE, dtype=np.float64)
        assert _feed(decoder, arrivals, results) == [False, False, True]
        np.testing.assert_allclose(decoder.finalize(), f, rtol=RTOL, atol=ATOL)
    # all systematic first: the parity arrives late and is ignored
    decoder = OnlineDecoder(scheme, SHAPE, dtype=np.float64)
    assert _feed(decoder, [0, 1, 2, 3], results) == [False, False, True, False]
    assert decoder.late == 1 and decoder.missing == ()
    np.testing.assert_array_equal(decoder.finalize(), f)  # straight copies, no arithmetic


def test_paper_fused_form_and_float32_output() -> None:
    """n = k + 1, c = 1/k: f_a = k * p - sum_{j != a} f_j, returned in float32."""
    k = 10
    scheme = CodingScheme.average(k)
    rng = np.random.default_rng(2)
    f = rng.normal(size=(k, 16, 7, 7)).astype(np.float32)
    parity = f.astype(np.float64).mean(axis=0).astype(np.float32)
    decoder = OnlineDecoder(scheme, (16, 7, 7))
    decoder.add(k, parity)
    for j in range(k):
        if j != 6:
            decoder.add(j, f[j])
    out = decoder.finalize()
    assert out.dtype == np.float32 and out.shape == (k, 16, 7, 7)
    expected = k * parity.astype(np.float64) - np.delete(f, 6, axis=0).astype(np.float64).sum(0)
    # float64 inside: only the float32 rounding of the inputs and of the output remains
    np.testing.assert_allclose(out[6], expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[6], f[6], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.delete(out, 6, axis=0), np.delete(f, 6, axis=0))


def test_reset_reuses_the_decoder() -> None:
    scheme = CodingScheme.design(6, 4)
    f1, r1 = _worker_results(scheme, seed=1)
    f2, r2 = _worker_results(scheme, seed=2)
    decoder = OnlineDecoder(scheme, SHAPE, dtype=np.float64)
    _feed(decoder, [5, 1, 4, 3], r1)
    np.testing.assert_allclose(decoder.finalize(), f1, rtol=RTOL, atol=ATOL)
    decoder.reset()
    assert not decoder.ready and decoder.received == () and decoder.late == 0
    _feed(decoder, [0, 4, 2, 5], r2)
    np.testing.assert_allclose(decoder.finalize(), f2, rtol=RTOL, atol=ATOL)


def test_finalize_is_idempotent_and_later_adds_are_late() -> None:
    scheme = CodingScheme.average(2)
    f, results = _worker_results(scheme, seed=3)
    decoder = OnlineDecoder(scheme, SHAPE, dtype=np.float64)
    _feed(decoder, [2, 1], results)
    first = decoder.finalize()
    assert decoder.add(0, results[0]) is False
    assert decoder.late == 1
    np.testing.assert_array_equal(decoder.finalize(), first)


def test_errors() -> None:
    scheme = CodingScheme.design(6, 4)
    decoder = OnlineDecoder(scheme, SHAPE)
    with pytest.raises(CodingError, match=r"must be in 0\.\.5 for n=6, got 6"):
        decoder.add(6, np.zeros(SHAPE))
    with pytest.raises(CodingError, match=r"must be in 0\.\.5 for n=6, got -1"):
        decoder.add(-1, np.zeros(SHAPE))
    with pytest.raises(CodingError, match=r"must be an integer in 0\.\.5, got 1\.0"):
        decoder.add(1.0, np.zeros(SHAPE))  # type: ignore[arg-type]
    with pytest.raises(CodingError, match=r"worker 2: expected shape \(2, 3, 3\), got \(2, 9\)"):
        decoder.add(2, np.zeros((2, 9)))
    with pytest.raises(CodingError, match=r"worker 3: expected real numbers, got dtype complex128"):
        decoder.add(3, np.zeros(SHAPE, dtype=np.complex128))
    assert decoder.received == ()  # rejected results leave no trace
    decoder.add(0, np.zeros(SHAPE))
    decoder.add(5, np.zeros(SHAPE))
    with pytest.raises(CodingError, match=r"needs k=4 distinct results, got 2 \(workers \[0, 5\]\)"):
        decoder.finalize()
    with pytest.raises(CodingError, match=r"dtype must be a floating type, got int32"):
        OnlineDecoder(scheme, SHAPE, dtype=np.int32)
    with pytest.raises(CodingError, match=r"scheme must be a CodingScheme, got dict"):
        OnlineDecoder(scheme.to_dict(), SHAPE)  # type: ignore[arg-type]
    with pytest.raises(CodingError, match=r"shape entry must be >= 0, got -3"):
        OnlineDecoder(scheme, (2, -3))
