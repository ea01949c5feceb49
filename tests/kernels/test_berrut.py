"""BerrutCode (ApproxIFER): nodes, weights, and only the exactness that is mathematically true."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from kernels.berrut import (
    BerrutCode,
    berrut_weights,
    chebyshev_first_kind,
    chebyshev_second_kind,
)
from kernels.errors import CodingError

# Identities below hold up to float64 rounding of a k- or n-term weighted sum.
RTOL = 1e-12
ATOL = 1e-12


def test_chebyshev_nodes() -> None:
    np.testing.assert_allclose(chebyshev_first_kind(1), [0.0], atol=1e-16)
    np.testing.assert_allclose(
        chebyshev_first_kind(2), [np.sqrt(0.5), -np.sqrt(0.5)], rtol=1e-15
    )
    np.testing.assert_allclose(
        chebyshev_first_kind(3), [np.sqrt(3) / 2, 0.0, -np.sqrt(3) / 2], rtol=1e-15, atol=1e-16
    )
    np.testing.assert_allclose(chebyshev_second_kind(2), [1.0, -1.0], rtol=1e-15)
    np.testing.assert_allclose(chebyshev_second_kind(3), [1.0, 0.0, -1.0], rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(
        chebyshev_second_kind(5), [1.0, np.sqrt(0.5), 0.0, -np.sqrt(0.5), -1.0], atol=1e-15
    )
    # first-kind points are the roots of T_k, second-kind points the extrema of T_{n-1}
    for k in (4, 7):
        roots = chebyshev_first_kind(k)
        np.testing.assert_allclose(np.polynomial.chebyshev.chebval(roots, [0] * k + [1]), 0.0, atol=1e-13)
    code = BerrutCode(n=6, k=4)
    np.testing.assert_array_equal(code.query_points, chebyshev_first_kind(4))
    np.testing.assert_array_equal(code.worker_points, chebyshev_second_kind(6))


def test_weights_match_formula_and_sum_to_one() -> None:
    nodes = chebyshev_first_kind(5)
    z = np.array([0.33, -0.9, 0.999])
    weights = berrut_weights(z, nodes)
    for row, point in zip(weights, z, strict=True):
        terms = np.array([(-1) ** j / (point - node) for j, node in enumerate(nodes)])
        np.testing.assert_allclose(row, terms / terms.sum(), rtol=1e-13)
    rng = np.random.default_rng(3)
    dense = berrut_weights(rng.uniform(-1, 1, size=2000), nodes)
    assert np.all(np.isfinite(dense))  # no real poles
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-12)


def test_point_on_a_node_gets_exact_one_hot_weight() -> None:
    nodes = chebyshev_second_kind(7)
    weights = berrut_weights(nodes, nodes)
    np.testing.assert_array_equal(weights, np.eye(7))
    # a point a couple of ulps off a node (same point, different formula) is snapped on it
    near = np.nextafter(np.nextafter(nodes[2], 2.0), 2.0)
    np.testing.assert_array_equal(berrut_weights(np.array([near]), nodes)[0], np.eye(7)[2])
    # Chebyshev points of both kinds share 0 when k and n are odd: exact hit, not a NaN
    code = BerrutCode(n=5, k=3)
    encoding = code.encoding_matrix()
    np.testing.assert_array_equal(encoding[2], [0.0, 1.0, 0.0])
    decoding = code.decoding_matrix(range(5))
    np.testing.assert_array_equal(decoding[1], [0.0, 0.0, 1.0, 0.0, 0.0])


def test_identical_queries_are_reproduced() -> None:
    code = BerrutCode(n=7, k=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 5))
    encoded = code.encode(np.repeat(x, 4, axis=0))
    np.testing.assert_allclose(encoded, np.repeat(x, 7, axis=0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("n", "k"), [(3, 2), (5, 4), (11, 10), (12, 8), (4, 4)])
def test_decode_commutes_with_linear_model_for_every_subset(n: int, k: int) -> None:
    """decode(A encode(X)) == A decode(encode(X)) for a linear model A, any received subset."""
    code = BerrutCode(n=n, k=k)
    rng = np.random.default_rng(n * 100 + k)
    x = rng.normal(size=(k, 6))  # (k, d_in)
    model = rng.normal(size=(6, 3))  # linear model: y = x @ A
    coded = code.encode(x)  # (n, 6)
    for size in (1, k - 1, k, n):
        if size < 1:
            continue
        for received in itertools.islice(itertools.combinations(range(n), size), 20):
            order = list(received[::-1])
            outputs = coded[order] @ model  # (m, 3): workers run the linear model
            lhs = code.decode(order, outputs)
            rhs = code.decode(order, coded[order]) @ model
            np.testing.assert_allclose(lhs, rhs, rtol=RTOL, atol=ATOL)


def test_constant_data_is_reproduced_from_any_subset() -> None:
    code = BerrutCode(n=9, k=5)
    constant = np.full((9, 2, 2), 3.25)
    for size in (1, 3, 5, 9):
        received = list(range(9))[-size:]
        np.testing.assert_allclose(
            code.decode(received, constant[received]), np.full((5, 2, 2), 3.25), rtol=RTOL
        )


def test_decode_order_of_indices_does_not_matter() -> None:
    code = BerrutCode(n=8, k=5)
    rng = np.random.default_rng(9)
    outputs = rng.normal(size=(8, 4))
    received = [6, 1, 3, 0, 7]
    sorted_received = sorted(received)
    np.testing.assert_allclose(
        code.decode(received, outputs[received]),
        code.decode(sorted_received, outputs[sorted_received]),
        rtol=1e-14,
        atol=1e-14,
    )


def test_decode_error_shrinks_with_more_workers_for_a_smooth_model() -> None:
    """Not exact, but Berrut interpolation converges: a smooth model gets closer with n."""
    k = 4
    x = np.linspace(-1.0, 1.0, k)[:, None]  # (k, 1)

    def model(v: np.ndarray) -> np.ndarray:
        return np.sin(2.0 * v)

    errors = []
    for n in (8, 32, 128):
        code = BerrutCode(n=n, k=k)
        decoded = code.decode(range(n), model(code.encode(x)))
        errors.append(float(np.abs(decoded - model(x)).max()))
    assert errors[0] > errors[1] > errors[2], errors


def test_dtype_is_kept() -> None:
    code = BerrutCode(n=5, k=3)
    assert code.encode(np.zeros((3, 2), dtype=np.float32)).dtype == np.float32
    assert code.decode([0, 1], np.zeros((2, 2), dtype=np.float32)).dtype == np.float32
    assert code.encode(np.zeros((3, 2), dtype=np.uint8)).dtype == np.float64


def test_dict_round_trip() -> None:
    code = BerrutCode(n=11, k=10)
    assert BerrutCode.from_dict(json.loads(json.dumps(code.to_dict()))) == code


def test_errors() -> None:
    with pytest.raises(CodingError, match=r"n must be >= 2, got 1"):
        BerrutCode(n=1, k=1)
    with pytest.raises(CodingError, match=r"k must be >= 1, got 0"):
        BerrutCode(n=3, k=0)
    with pytest.raises(CodingError, match=r"unknown key\(s\) \['c'\]"):
        BerrutCode.from_dict({"n": 3, "k": 2, "c": 1})
    code = BerrutCode(n=5, k=3)
    with pytest.raises(CodingError, match=r"shape \(k=3, \.\.\.\), got \(2, 4\)"):
        code.encode(np.zeros((2, 4)))
    with pytest.raises(CodingError, match=r"at least 1 .* got 0"):
        code.decode([], np.zeros((0, 4)))
    with pytest.raises(CodingError, match=r"duplicate worker indices \[2\]"):
        code.decode([2, 2], np.zeros((2, 4)))
    with pytest.raises(CodingError, match=r"must be in 0\.\.4 for n=5, got \[5\]"):
        code.decode([0, 5], np.zeros((2, 4)))
    with pytest.raises(CodingError, match=r"outputs of shape \(len\(indices\)=2, \.\.\.\), got \(3, 4\)"):
        code.decode([0, 1], np.zeros((3, 4)))
    with pytest.raises(CodingError, match=r"strictly monotone"):
        berrut_weights(np.zeros(1), np.array([0.0, 1.0, 0.5]))
