"""ApproxIFER (Soleymani et al., 2022): training-free coded inference by Berrut interpolation.

Notation: k queries x_0..x_{k-1} sit at the query points alpha_j (Chebyshev points of the
first kind); n workers sit at the worker points beta_i (Chebyshev points of the second kind).
Berrut's rational interpolant through nodes z_0 < ... (or >) z_{N-1} with values v_j is

    r(z) = sum_j w_j(z) v_j,   w_j(z) = ((-1)^j / (z - z_j)) / sum_l ((-1)^l / (z - z_l)),

which has no real poles for any monotone node order and satisfies sum_j w_j(z) = 1.
Encode: worker i gets u(beta_i) with u the interpolant through (alpha_j, x_j).
Decode: interpolate the received (beta_i, y_i) and evaluate at every alpha_j.

Accuracy (what decode can and cannot promise): the result is exact only for models that
commute with affine combinations (e.g. linear models) AND data the interpolant reproduces
(constants); in general it approximates the model's outputs. Berrut's interpolant
converges like O(h) in the node spacing h, so the error shrinks as more workers answer.
Any number >= 1 of received results decodes, but with fewer than ~k results the queries
are under-sampled and the decoded values are coarse (one result: every query gets it).

Everything is numpy only; computation runs in float64 and returns the input's float dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.coding import _check_int, _output_dtype, _real_array, check_worker_indices
from kernels.configs import strict_from_dict
from kernels.errors import CodingError

logger = logging.getLogger(__name__)


def chebyshev_first_kind(count: int) -> np.ndarray:
    """cos((2j + 1) pi / (2 count)), j = 0..count-1: decreasing, strictly inside (-1, 1)."""
    count = _check_int("count", count, 1)
    j = np.arange(count)
    return np.cos((2 * j + 1) * np.pi / (2 * count))


def chebyshev_second_kind(count: int) -> np.ndarray:
    """cos(i pi / (count - 1)), i = 0..count-1: decreasing from 1 to -1 (count >= 2)."""
    count = _check_int("count", count, 2)
    i = np.arange(count)
    return np.cos(i * np.pi / (count - 1))


def berrut_weights(points: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """(len(points), len(nodes)) Berrut weights w_j(z) for each evaluation point z.

    `nodes` must be strictly monotone (that is what keeps the interpolant pole-free).
    A point equal to a node (within 8 ulps of the largest magnitude) gets weight exactly 1
    on that node and 0 elsewhere.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1)  # (m,)
    nodes = np.asarray(nodes, dtype=np.float64).reshape(-1)  # (N,)
    if nodes.size == 0:
        raise CodingError("berrut_weights: need at least one node, got none")
    steps = np.diff(nodes)
    if nodes.size > 1 and not (np.all(steps > 0) or np.all(steps < 0)):
        raise CodingError(f"berrut_weights: nodes must be strictly monotone, got {nodes.tolist()}")
    diff = points[:, None] - nodes[None, :]  # (m, N)
    # Snap points within a few ulps of a node onto it: the same Chebyshev point computed
    # by two formulas (e.g. cos(3 pi / 18) vs cos(pi / 6)) can differ in the last bit.
    scale = max(float(np.abs(nodes).max()), float(np.abs(points).max(initial=0.0)), 1e-300)
    on_node = np.abs(diff) <= 8 * np.finfo(np.float64).eps * scale  # (m, N)
    hit = on_node.any(axis=1)  # (m,)
    signs = np.where(np.arange(nodes.size) % 2 == 0, 1.0, -1.0)  # (N,)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = signs[None, :] / diff  # (m, N); inf only on rows handled by `hit`
        weights = terms / terms.sum(axis=1, keepdims=True)
    weights[hit] = on_node[hit].astype(np.float64)
    return weights


@dataclass(frozen=True)
class BerrutCode:
    """ApproxIFER code for k queries over n workers (n >= 2, k >= 1)."""

    n: int
    k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _check_int("k", self.k, 1))
        object.__setattr__(self, "n", _check_int("n", self.n, 2))

    @property
    def query_points(self) -> np.ndarray:
        """alpha, shape (k,): Chebyshev points of the first kind."""
        return chebyshev_first_kind(self.k)

    @property
    def worker_points(self) -> np.ndarray:
        """beta, shape (n,): Chebyshev points of the second kind."""
        return chebyshev_second_kind(self.n)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BerrutCode:
        """Inverse of to_dict(); unknown or missing keys are errors."""
        return strict_from_dict(cls, data, CodingError, where="Berrut code")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k}

    def encoding_matrix(self) -> np.ndarray:
        """E, shape (n, k): worker i's input is sum_j E[i, j] x_j; every row sums to 1."""
        return berrut_weights(self.worker_points, self.query_points)

    def decoding_matrix(self, indices: Sequence[int]) -> np.ndarray:
        """D, shape (k, len(indices)): query j's estimate is sum_m D[j, m] y_{indices[m]}.

        Columns follow the given order; internally the received worker points are sorted
        (worker id order is monotone in beta) so the alternating signs stay pole-free.
        """
        checked = self._check_indices(indices)
        order = np.argsort(checked)  # monotone node order
        sorted_weights = berrut_weights(
            self.query_points, self.worker_points[np.asarray(checked)[order]]
        )  # (k, m) in sorted column order
        weights = np.empty_like(sorted_weights)
        weights[:, order] = sorted_weights
        return weights

    def encode(self, queries: np.ndarray) -> np.ndarray:
        """(k, ...) queries -> (n, ...) coded worker inputs u(beta_i)."""
        queries = _real_array("encode", queries)
        if queries.ndim < 1 or queries.shape[0] != self.k:
            raise CodingError(
                f"encode: expected queries of shape (k={self.k}, ...), got {queries.shape}"
            )
        flat = queries.reshape(self.k, -1).astype(np.float64, copy=False)  # (k, d)
        coded = self.encoding_matrix() @ flat  # (n, d)
        return coded.reshape((self.n, *queries.shape[1:])).astype(
            _output_dtype(queries.dtype), copy=False
        )

    def decode(self, indices: Sequence[int], outputs: np.ndarray) -> np.ndarray:
        """Approximate the k queries' outputs from any >= 1 received worker outputs.

        outputs[m] is worker indices[m]'s output, shape (len(indices), ...); returns (k, ...).
        See the module docstring for when this is exact and how accuracy scales.
        """
        checked = self._check_indices(indices)
        outputs = _real_array("decode", outputs)
        if outputs.ndim < 1 or outputs.shape[0] != len(checked):
            raise CodingError(
                f"decode: expected outputs of shape (len(indices)={len(checked)}, ...), "
                f"got {outputs.shape}"
            )
        flat = outputs.reshape(len(checked), -1).astype(np.float64, copy=False)  # (m, d)
        decoded = self.decoding_matrix(checked) @ flat  # (k, d)
        return decoded.reshape((self.k, *outputs.shape[1:])).astype(
            _output_dtype(outputs.dtype), copy=False
        )

    def _check_indices(self, indices: Sequence[int]) -> list[int]:
        checked = list(check_worker_indices(indices, self.n))
        if not checked:
            raise CodingError(f"decode needs at least 1 of the n={self.n} worker results, got 0")
        return checked
