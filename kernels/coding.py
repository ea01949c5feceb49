"""Systematic linear erasure codes over embeddings: encode, batch decode, online decode.

Notation (used throughout): k queries x_1..x_k, n workers. Worker i < k returns the
systematic result f_i = f(x_i); worker k + r returns the parity p_r ~= sum_j C[r, j] f_j.
The generator is G = [I_k; C] of shape (n, k). A scheme is MDS when every k x k submatrix
of G is invertible, so that ANY k of the n results determine all k embeddings.

Decoding from systematic set S (received), missing set M (|M| = e) and e received parity
rows P:   f_M = C[P, M]^{-1} (p_P - C[P, S] f_S).

For the Coded-InvNet paper's scheme (n = k + 1, C = [1/k ... 1/k]) this is
f_a = k * p - sum_{j != a} f_j.

Everything here is numpy only; the runtime, trainer and CUDA reference import it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from kernels.configs import strict_from_dict
from kernels.errors import CodingError

logger = logging.getLogger(__name__)

# A square minor of C whose condition number exceeds this is treated as singular: solving
# with it would lose ~all float64 digits (and every float32 digit long before that).
SINGULAR_CONDITION = 1e10
# Upper bound on square minors / k-subsets we are willing to enumerate for a check.
MAX_ENUMERATED_SUBMATRICES = 2_000_000


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CodingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise CodingError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _output_dtype(dtype: np.dtype) -> np.dtype:
    """Results keep a floating input dtype; integer/bool inputs decode to float64."""
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _real_array(where: str, values: Any) -> np.ndarray:
    """np.asarray(values), refusing dtypes that cannot be cast to float64 without loss."""
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise CodingError(f"{where}: expected real numbers, got dtype {array.dtype}")
    return array


def _minor_index_sets(rows: int, cols: int) -> int:
    """Number of square minors of a rows x cols matrix (sizes 1..min(rows, cols))."""
    return sum(math.comb(rows, s) * math.comb(cols, s) for s in range(1, min(rows, cols) + 1))


def _check_all_minors(coefficients: np.ndarray) -> None:
    """Raise unless every square submatrix of C is well-conditioned (=> G = [I; C] is MDS).

    Why minors of C: a k x k submatrix of G keeps the systematic rows S and parity rows P
    with |P| = |M| = k - |S|; after permuting it is block-triangular [[I, 0], [C_PS, C_PM]],
    so its determinant is +-det C[P, M]. Every k x k submatrix of G is invertible iff every
    square submatrix of C is. Enumerating minors of the small C is far cheaper than
    enumerating C(n, k) submatrices of G (n = k + 1 only needs the k entries to be nonzero).
    """
    rows, cols = coefficients.shape
    total = _minor_index_sets(rows, cols)
    if total > MAX_ENUMERATED_SUBMATRICES:
        raise CodingError(
            f"cannot verify the MDS property of a {rows}x{cols} coefficient matrix: "
            f"{total} square minors exceed the limit {MAX_ENUMERATED_SUBMATRICES}; "
            "use fewer parity rows (n - k)"
        )
    for size in range(1, min(rows, cols) + 1):
        row_sets = np.array(list(itertools.combinations(range(rows), size)))  # (R, s)
        col_sets = np.array(list(itertools.combinations(range(cols), size)))  # (Q, s)
        for row_set in row_sets:
            # all minors with these rows at once: (Q, s, s)
            minors = coefficients[row_set][:, col_sets].transpose(1, 0, 2)
            if size == 1:
                cond = np.where(minors[:, 0, 0] != 0.0, 1.0, np.inf)
            else:
                cond = np.linalg.cond(minors)
            bad = np.flatnonzero(~(cond <= SINGULAR_CONDITION))
            if bad.size:
                cols_bad = col_sets[bad[0]].tolist()
                raise CodingError(
                    "coding scheme is not MDS: the submatrix of the coefficients with parity "
                    f"rows {row_set.tolist()} and columns {cols_bad} is singular "
                    f"(condition number {float(cond[bad[0]]):.3g} > {SINGULAR_CONDITION:.0e}), "
                    "so some set of k results cannot be decoded; use CodingScheme.design(n, k)"
                )


def check_worker_indices(indices: Sequence[int], n: int) -> tuple[int, ...]:
    """Worker ids as a tuple of ints; CodingError unless they are distinct integers in 0..n-1."""
    try:
        items = list(indices)
    except TypeError as exc:
        raise CodingError(f"indices must be a sequence of integers, got {indices!r}") from exc
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in items):
        raise CodingError(f"indices must be integers, got {items!r}")  # 1.5 must not truncate to 1
    checked = tuple(int(i) for i in items)
    out_of_range = [i for i in checked if not 0 <= i < n]
    if out_of_range:
        raise CodingError(f"worker indices must be in 0..{n - 1} for n={n}, got {out_of_range}")
    if len(set(checked)) != len(checked):
        duplicates = sorted({i for i in checked if checked.count(i) > 1})
        raise CodingError(f"duplicate worker indices {duplicates} in {list(checked)}")
    return checked


@dataclass(frozen=True, eq=False)
class CodingScheme:
    """A systematic (n, k) linear code: generator [I_k; coefficients], coefficients (n-k, k)."""

    n: int
    k: int
    coefficients: np.ndarray  # (n - k, k) float64, read-only

    def __post_init__(self) -> None:
        k = _check_int("k", self.k, 1)
        n = _check_int("n", self.n, k)
        try:
            coefficients = np.array(self.coefficients, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise CodingError(
                f"coefficients must be a real ({n - k}, {k}) matrix, got {self.coefficients!r}"
            ) from exc
        if n - k == 0 and coefficients.size == 0:
            coefficients = coefficients.reshape(0, k)
        if coefficients.shape != (n - k, k):
            raise CodingError(
                f"coefficients must have shape (n - k, k) = ({n - k}, {k}), "
                f"got {coefficients.shape}"
            )
        if not np.all(np.isfinite(coefficients)):
            raise CodingError(f"coefficients must be finite, got {coefficients.tolist()}")
        _check_all_minors(coefficients)
        coefficients.setflags(write=False)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "coefficients", coefficients)

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def average(cls, k: int) -> CodingScheme:
        """The paper's scheme: n = k + 1, one parity = mean of the k embeddings (c = 1/k)."""
        k = _check_int("k", k, 1)
        return cls(n=k + 1, k=k, coefficients=np.full((1, k), 1.0 / k))

    @classmethod
    def paper_4_2(cls) -> CodingScheme:
        """The paper's (n, k) = (4, 2) scheme: parity rows [1/2, 1/2] and [1/3, 2/3]."""
        return cls(n=4, k=2, coefficients=np.array([[1 / 2, 1 / 2], [1 / 3, 2 / 3]]))

    @classmethod
    def design(cls, n: int, k: int) -> CodingScheme:
        """An MDS scheme for any n >= k: rows C[r, j] = (j + 1)**r / sum_l (l + 1)**r.

        With positive nodes 1 < 2 < ... < k and exponents 0 < 1 < ... the Vandermonde matrix
        [(j + 1)**r] is strictly totally positive, so every square minor is nonzero;
        scaling rows by positive constants keeps that, hence every k x k submatrix of the
        generator is invertible (still verified numerically in __post_init__). Entries are
        positive and rows sum to 1, so each parity is a convex combination of embeddings
        and stays on the data scale. Row 0 is the paper's average (c = 1/k), so
        design(k + 1, k) == average(k), and design(4, 2) == paper_4_2().
        Integer nodes gave a smaller worst_condition_number() than Chebyshev or other
        equispaced nodes for every (n, k) we compared (e.g. (6, 4): 27.6 vs 39.2 for
        Chebyshev nodes in [1/2, 3/2]; (12, 10): 168 vs 562). Conditioning still grows
        quickly with n - k (Vandermonde): check worst_condition_number() before using
        more than a few parities.
        """
        k = _check_int("k", k, 1)
        n = _check_int("n", n, k)
        nodes = np.arange(1, k + 1, dtype=np.float64)  # (k,)
        powers = nodes[None, :] ** np.arange(n - k)[:, None]  # (n-k, k)
        coefficients = powers / powers.sum(axis=1, keepdims=True)
        return cls(n=n, k=k, coefficients=coefficients)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodingScheme:
        """Inverse of to_dict(); unknown or missing keys are errors."""
        return strict_from_dict(cls, data, CodingError, where="coding scheme")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe {"n", "k", "coefficients"} (coefficients as nested lists of floats)."""
        return {"n": self.n, "k": self.k, "coefficients": self.coefficients.tolist()}

    # -- properties --------------------------------------------------------------------

    @property
    def num_parities(self) -> int:
        return self.n - self.k

    @property
    def generator(self) -> np.ndarray:
        """G = [I_k; C], shape (n, k): worker i's result is sum_j G[i, j] f_j."""
        return np.vstack([np.eye(self.k), self.coefficients])  # (n, k)

    def worst_condition_number(self) -> float:
        """max over all C(n, k) k x k submatrices of the generator of their 2-norm condition.

        Bounds how much relative error in the received results (e.g. the encoders'
        approximation error) can be amplified in the decoded embeddings.
        """
        count = math.comb(self.n, self.k)
        if count > MAX_ENUMERATED_SUBMATRICES:
            raise CodingError(
                f"worst_condition_number: {count} submatrices of a ({self.n}, {self.k}) "
                f"generator exceed the limit {MAX_ENUMERATED_SUBMATRICES}"
            )
        generator = self.generator
        worst = 1.0
        for rows in itertools.combinations(range(self.n), self.k):
            worst = max(worst, float(np.linalg.cond(generator[list(rows)])))
        return worst

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CodingScheme):
            return NotImplemented
        return (
            self.n == other.n
            and self.k == other.k
            and np.array_equal(self.coefficients, other.coefficients)
        )

    def __hash__(self) -> int:
        return hash((self.n, self.k, self.coefficients.tobytes()))

    def __repr__(self) -> str:
        return f"CodingScheme(n={self.n}, k={self.k}, coefficients={self.coefficients.tolist()})"

    # -- encode / decode ---------------------------------------------------------------

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Exact parities p_r = sum_j C[r, j] values[j]: (k, ...) -> (n - k, ...).

        Computed in float64; a floating input dtype is kept, integer input gives float64.
        """
        values = _real_array("encode", values)
        if values.ndim < 1 or values.shape[0] != self.k:
            raise CodingError(
                f"encode: expected values of shape (k={self.k}, ...), got {values.shape}"
            )
        flat = values.reshape(self.k, -1).astype(np.float64, copy=False)  # (k, d)
        parities = self.coefficients @ flat  # (n-k, d)
        return parities.reshape((self.num_parities, *values.shape[1:])).astype(
            _output_dtype(values.dtype), copy=False
        )

    def check_indices(self, indices: Sequence[int]) -> tuple[int, ...]:
        """Validate worker ids (distinct, in 0..n-1) and return them as a tuple of ints."""
        return check_worker_indices(indices, self.n)

    def decode(self, indices: Sequence[int], results: np.ndarray) -> np.ndarray:
        """Recover all k systematic results from any k (or more) of the n results.

        indices[i] is the worker id (0..k-1 systematic, k..n-1 parity) of results[i];
        results has shape (len(indices), ...). With more than k results, every systematic
        one is used and parities are taken in the given order until k results are in hand.
        Returns (k, ...) in the input's floating dtype (float64 for integer input); the
        solve runs in float64. Cost O(k d + e^2 d + e^3) for e missing systematic results.
        Non-finite results are not checked: a NaN in a used result propagates.
        """
        indices = self.check_indices(indices)
        results = _real_array("decode", results)
        if results.ndim < 1 or results.shape[0] != len(indices):
            raise CodingError(
                f"decode: expected results of shape (len(indices)={len(indices)}, ...), "
                f"got {results.shape}"
            )
        if len(indices) < self.k:
            raise CodingError(
                f"decode needs at least k={self.k} results of the n={self.n} workers, "
                f"got {len(indices)} (indices {list(indices)})"
            )
        shape = results.shape[1:]
        flat = results.reshape(len(indices), -1).astype(np.float64, copy=False)  # (m, d)
        position = {worker: i for i, worker in enumerate(indices)}
        received = [j for j in range(self.k) if j in position]
        missing = [j for j in range(self.k) if j not in position]
        parities = [i for i in indices if i >= self.k][: len(missing)]
        out = np.empty((self.k, flat.shape[1]), dtype=np.float64)  # (k, d)
        out[received] = flat[[position[j] for j in received]]
        if missing:
            rows = [p - self.k for p in parities]
            parity_values = flat[[position[p] for p in parities]]  # (e, d)
            known = self.coefficients[np.ix_(rows, received)] @ out[received]  # (e, d)
            system = self.coefficients[np.ix_(rows, missing)]  # (e, e)
            out[missing] = np.linalg.solve(system, parity_values - known)
        return out.reshape((self.k, *shape)).astype(_output_dtype(results.dtype), copy=False)


class OnlineDecoder:
    """Incremental decoder for one coding group: feed results as they arrive, then finalize.

    Per parity row r it keeps s_r = sum over received systematic j of C[r, j] f_j, updated
    on each systematic arrival in O((n - k) d) — independent of k. For the paper's scheme
    this is the fused form `est -= f_j / k` per arrival and `f_a = k * (p - est)` at the end.
    finalize() solves the e missing systematic slots from the e received parities,
    f_M = C[P, M]^{-1} (p_P - s_P), in O(e^2 d + e^3); received systematic results are copied.
    Accumulation and the solve run in float64; finalize() returns `dtype`.

    Arrival rules: add() returns True exactly once, on the arrival that brings k distinct
    results. A repeated worker id before that is ignored (counted in `duplicates`); any
    result after the group is ready is ignored (counted in `late`). Both return False.
    Not thread-safe: use one decoder per group from one thread / event loop.
    """

    def __init__(
        self, scheme: CodingScheme, shape: tuple[int, ...], dtype: DTypeLike = np.float32
    ) -> None:
        if not isinstance(scheme, CodingScheme):
            raise CodingError(f"scheme must be a CodingScheme, got {type(scheme).__name__}")
        try:
            self.shape = tuple(_check_int("shape entry", s, 0) for s in shape)
        except TypeError as exc:
            raise CodingError(f"shape must be a tuple of integers, got {shape!r}") from exc
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise CodingError(f"dtype must be a floating type, got {self.dtype}")
        self.scheme = scheme
        self._size = math.prod(self.shape)
        self._systematic = np.empty((scheme.k, self._size), dtype=np.float64)  # (k, d)
        self._parities = np.empty((scheme.num_parities, self._size), dtype=np.float64)  # (n-k, d)
        self._accumulator = np.empty((scheme.num_parities, self._size), dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        """Forget every result so the buffers can serve the next coding group."""
        self._received: list[int] = []
        self._seen = [False] * self.scheme.n  # a list: read per arrival, cheaper than numpy
        self._accumulator.fill(0.0)
        self._result: np.ndarray | None = None
        self.duplicates = 0
        self.late = 0

    @property
    def ready(self) -> bool:
        return len(self._received) >= self.scheme.k

    @property
    def received(self) -> tuple[int, ...]:
        """Accepted worker ids, in arrival order."""
        return tuple(self._received)

    @property
    def missing(self) -> tuple[int, ...]:
        """Systematic slots (0..k-1) not received (yet)."""
        return tuple(j for j in range(self.scheme.k) if not self._seen[j])

    def add(self, index: int, value: np.ndarray) -> bool:
        """Accept worker `index`'s result; True when this arrival makes the group ready."""
        k, n = self.scheme.k, self.scheme.n
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise CodingError(f"worker index must be an integer in 0..{n - 1}, got {index!r}")
        if not 0 <= index < n:
            raise CodingError(f"worker index must be in 0..{n - 1} for n={n}, got {index}")
        value = _real_array(f"result of worker {index}", value)
        if value.shape != self.shape:
            raise CodingError(
                f"result of worker {index}: expected shape {self.shape}, got {value.shape}"
            )
        if self.ready:
            self.late += 1
            logger.debug("ignoring late result of worker %d (group already ready)", index)
            return False
        if self._seen[index]:
            self.duplicates += 1
            logger.debug("ignoring duplicate result of worker %d", index)
            return False
        flat = value.reshape(-1)  # (d,)
        if index < k:
            self._systematic[index] = flat
            # s_r += C[r, j] f_j for every parity row: O((n-k) d)
            self._accumulator += self.scheme.coefficients[:, index, None] * self._systematic[index]
        else:
            self._parities[index - k] = flat
        self._seen[int(index)] = True
        self._received.append(int(index))
        return self.ready

    def finalize(self) -> np.ndarray:
        """(k, *shape) in `dtype`: received systematic results copied, missing ones decoded."""
        if self._result is not None:
            return self._result
        k = self.scheme.k
        if not self.ready:
            raise CodingError(
                f"finalize needs k={k} distinct results, got {len(self._received)} "
                f"(workers {list(self._received)}); wait for more results"
            )
        missing = list(self.missing)
        out = self._systematic  # (k, d) float64; missing rows overwritten below
        if missing:
            rows = [i - k for i in self._received if i >= k]  # exactly len(missing) rows
            system = self.scheme.coefficients[np.ix_(rows, missing)]  # (e, e)
            rhs = self._parities[rows] - self._accumulator[rows]  # (e, d)
            if len(missing) == 1:
                out[missing[0]] = rhs[0] / system[0, 0]
            else:
                out[missing] = np.linalg.solve(system, rhs)
        self._result = out.reshape((k, *self.shape)).astype(self.dtype, copy=True)
        return self._result
