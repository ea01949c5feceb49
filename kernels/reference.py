"""numpy reference for the CUDA decoder kernels in kernels/decoder.cu: same inputs, same math.

Each function below has the semantics of one kernel, including its fp32 accumulation order
and its limits, so GPU tests can use it as the oracle and CPU code can call it instead:

  one_shot_decode   <-> ci_one_shot_decode_*   out = parity_scale * parity - sum_i inputs[i]
  online_update     <-> ci_online_update_*     est = beta*est + alpha*x (+ fused copy / finish)
  general_decode    <-> ci_general_decode_*    out[r] = sum_j coeffs[r, j] * inputs[j]

`OnlinePlanner` turns arrivals of a coding group into those kernel calls (the arrival rules of
kernels.coding.OnlineDecoder); `ReferenceOnlineDecoder` runs the plan with numpy and
`kernels.cuda_decoder.CudaOnlineDecoder` runs the same plan on the GPU, so the CPU tests of
the plan cover the GPU decoder's bookkeeping too.

Notation: n workers, k queries, worker i < k returns f_i, worker k + r returns parity
p_r = sum_j C[r, j] f_j. Vectors are flat (B*d elements); accumulation is fp32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kernels.coding import CodingScheme
from kernels.errors import CodingError

logger = logging.getLogger(__name__)

MAX_INPUTS = 64  # CI_MAX_INPUTS: pointers one launch can read
MAX_OUTPUTS = 8  # CI_MAX_OUTPUTS: rows one general-decode launch writes (more rows: more launches)
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(dtype: np.dtype | str) -> np.dtype:
    """The storage dtypes the kernels have (bfloat16 needs numpy to know it, e.g. ml_dtypes)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise CodingError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}") from exc
    if resolved.name not in SUPPORTED_DTYPES:
        raise CodingError(f"dtype must be one of {SUPPORTED_DTYPES}, got {resolved.name}")
    return resolved


def _same_shape(name: str, arrays: Sequence[np.ndarray], shape: tuple[int, ...]) -> None:
    for i, array in enumerate(arrays):
        if array.shape != shape:
            raise CodingError(f"{name}[{i}]: expected shape {shape}, got {array.shape}")


def one_shot_decode(
    inputs: Sequence[np.ndarray], parity: np.ndarray, parity_scale: float, out: np.ndarray | None = None
) -> np.ndarray:
    """out = parity_scale * parity - sum_i inputs[i] (fp32 accumulation, in input order).

    For the paper's n = k+1 code (C = 1/k) and missing query a: inputs are the k-1 received
    f_j, parity_scale = k, and out = f_a. Result dtype: parity's (or `out`'s).
    """
    parity = np.asarray(parity)
    check_dtype(parity.dtype)
    if len(inputs) > MAX_INPUTS:
        raise CodingError(f"one_shot_decode takes at most {MAX_INPUTS} inputs, got {len(inputs)}")
    arrays = [np.asarray(x) for x in inputs]
    _same_shape("inputs", arrays, parity.shape)
    acc = parity.astype(np.float32, copy=False) * np.float32(parity_scale)
    for x in arrays:
        acc -= x.astype(np.float32, copy=False)
    if out is None:
        return acc.astype(parity.dtype)
    out[...] = acc
    return out


def online_update(
    est: np.ndarray,
    x: np.ndarray,
    alpha: float,
    beta: float = 1.0,
    copy_out: np.ndarray | None = None,
    final_out: np.ndarray | None = None,
    final_scale: float = 1.0,
) -> None:
    """One arrival: acc = beta*est + alpha*x in fp32 (est is not read when beta == 0).

    Then copy_out[...] = x when given, and final_out[...] = final_scale * acc when given
    (est untouched), else est[...] = acc. O(n) whatever k is.
    """
    if est.dtype != np.float32:
        raise CodingError(f"online_update: the estimate must be float32, got {est.dtype}")
    x = np.asarray(x)
    check_dtype(x.dtype)
    if x.shape != est.shape:
        raise CodingError(f"online_update: x has shape {x.shape}, the estimate {est.shape}")
    acc = np.float32(alpha) * x.astype(np.float32, copy=False)
    if beta != 0.0:
        acc = np.float32(beta) * est + acc
    if copy_out is not None:
        copy_out[...] = x
    if final_out is not None:
        final_out[...] = acc * np.float32(final_scale)
    else:
        est[...] = acc


def scaled_accumulate(est: np.ndarray, x: np.ndarray, alpha: float) -> None:
    """est += alpha * x (the plain online step: alpha = -c_j for f_j, +k for the parity)."""
    online_update(est, x, alpha, beta=1.0)


def general_decode(coeffs: np.ndarray, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """out[r] = sum_j coeffs[r, j] * inputs[j], fp32, j ascending: (R, K) x K arrays -> (R, ...)."""
    coeffs = np.asarray(coeffs, dtype=np.float32)
    if coeffs.ndim != 2 or coeffs.shape[1] != len(inputs):
        raise CodingError(f"general_decode: coeffs must have shape (R, K={len(inputs)}), got {coeffs.shape}")
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise CodingError(f"general_decode takes 1..{MAX_INPUTS} inputs, got {len(inputs)}")
    arrays = [np.asarray(x) for x in inputs]
    dtype = check_dtype(arrays[0].dtype)
    _same_shape("inputs", arrays, arrays[0].shape)
    out = np.empty((coeffs.shape[0], *arrays[0].shape), dtype=dtype)
    for r in range(coeffs.shape[0]):
        acc = np.zeros(arrays[0].shape, dtype=np.float32)
        for j, x in enumerate(arrays):
            acc += coeffs[r, j] * x.astype(np.float32, copy=False)
        out[r] = acc
    return out


# ---- the online decoding plan (shared by the numpy and CUDA decoders) ----------------------


@dataclass(frozen=True)
class UpdateOp:
    """online_update with x = worker `source`'s result; rows index the (k, ...) output."""

    source: int
    alpha: float
    beta: float
    copy_row: int | None
    final_row: int | None
    final_scale: float


@dataclass(frozen=True)
class CopyOp:
    source: int
    row: int


@dataclass(frozen=True)
class DecodeOp:
    """general_decode: output rows `rows` from the results of workers `sources`."""

    sources: tuple[int, ...]
    rows: tuple[int, ...]
    coeffs: np.ndarray  # (len(rows), len(sources)) float32


Op = UpdateOp | CopyOp | DecodeOp


class OnlinePlanner:
    """Arrival bookkeeping of one coding group -> the kernel calls that decode it.

    n = k + 1 (one parity, e.g. the paper's average code): every arrival is one fused O(d)
    update of a fp32 estimate est = (p - sum_j c_j f_j) / c_ref, normalised by c_ref (the
    largest |c_j|) so the average code runs exactly est -= f_j and est += k * p. A systematic
    arrival is copied into its output row in the same pass. The arrival that completes the
    group knows the missing slot a and writes f_a = (c_ref / c_a) * est straight into row a:
    nothing is left for finalize. If the k-th arrival is systematic and the parity never
    came, it is a plain copy.

    Other codes (n - k != 1): systematic arrivals are copied as they land; the k-th arrival
    issues one general decode f_M = D [f_S; p_P] with D = C[P,M]^-1 [-C[P,S], I] (float64,
    then fp32) for the missing slots M.

    Arrival rules are kernels.coding.OnlineDecoder's: add() is True exactly once, duplicates
    and late results are ignored (counted), bad indices raise CodingError.
    """

    def __init__(self, scheme: CodingScheme) -> None:
        if not isinstance(scheme, CodingScheme):
            raise CodingError(f"scheme must be a CodingScheme, got {type(scheme).__name__}")
        if scheme.k > MAX_INPUTS:
            raise CodingError(f"the CUDA decoder supports k <= {MAX_INPUTS}, got k={scheme.k}")
        self.scheme = scheme
        self.online = scheme.n == scheme.k + 1
        if self.online:
            c = scheme.coefficients[0]  # (k,)
            self._c = c
            self._c_ref = float(c[np.argmax(np.abs(c))])
        self.reset()

    def reset(self) -> None:
        self._received: list[int] = []
        self.duplicates = 0
        self.late = 0

    @property
    def ready(self) -> bool:
        return len(self._received) >= self.scheme.k

    @property
    def received(self) -> tuple[int, ...]:
        return tuple(self._received)

    def check_index(self, index: int) -> int:
        n = self.scheme.n
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise CodingError(f"worker index must be an integer in 0..{n - 1}, got {index!r}")
        if not 0 <= index < n:
            raise CodingError(f"worker index must be in 0..{n - 1} for n={n}, got {index}")
        return int(index)

    def add(self, index: int) -> tuple[bool, list[Op]]:
        """(accepted, ops) for worker `index`'s arrival; ops empty when it is ignored."""
        index = self.check_index(index)
        if self.ready:
            self.late += 1
            logger.debug("ignoring late result of worker %d (group already ready)", index)
            return False, []
        if index in self._received:
            self.duplicates += 1
            logger.debug("ignoring duplicate result of worker %d", index)
            return False, []
        self._received.append(index)
        return True, self._online_ops(index) if self.online else self._general_ops(index)

    def _online_ops(self, index: int) -> list[Op]:
        k = self.scheme.k
        first, last = len(self._received) == 1, len(self._received) == k
        parity_in = k in self._received
        if last and not parity_in:
            return [CopyOp(source=index, row=index)]  # all k systematic: nothing to decode
        if index < k:
            alpha, copy_row = -float(self._c[index]) / self._c_ref, index
        else:
            alpha, copy_row = 1.0 / self._c_ref, None
        final_row, final_scale = None, 1.0
        if last:
            (final_row,) = [j for j in range(k) if j not in self._received]
            c_missing = float(self._c[final_row])
            if c_missing == 0.0:  # unreachable for schemes that passed the MDS check
                raise CodingError(f"query {final_row} has coefficient 0 in the parity: undecodable")
            final_scale = self._c_ref / c_missing
        return [
            UpdateOp(
                source=index,
                alpha=alpha,
                beta=0.0 if first else 1.0,
                copy_row=copy_row,
                final_row=final_row,
                final_scale=final_scale,
            )
        ]

    def _general_ops(self, index: int) -> list[Op]:
        k = self.scheme.k
        ops: list[Op] = [CopyOp(source=index, row=index)] if index < k else []
        if len(self._received) < k:
            return ops
        missing = [j for j in range(k) if j not in self._received]
        if not missing:
            return ops
        received = [j for j in range(k) if j in self._received]
        parities = [i for i in self._received if i >= k]  # exactly len(missing) of them
        rows = [p - k for p in parities]
        coefficients = self.scheme.coefficients
        inverse = np.linalg.inv(coefficients[np.ix_(rows, missing)])  # (e, e) float64
        d_parity = inverse  # (e, e): weights of p_P
        d_systematic = -inverse @ coefficients[np.ix_(rows, received)]  # (e, |S|)
        coeffs = np.concatenate([d_systematic, d_parity], axis=1).astype(np.float32)
        ops.append(DecodeOp(sources=tuple(received + parities), rows=tuple(missing), coeffs=coeffs))
        return ops


class ReferenceOnlineDecoder:
    """kernels.coding.OnlineDecoder's interface, computed exactly as the CUDA decoder does."""

    def __init__(self, scheme: CodingScheme, shape: tuple[int, ...], dtype: np.dtype | str = np.float32):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = check_dtype(dtype)
        self.planner = OnlinePlanner(scheme)
        self.scheme = scheme
        size = math.prod(self.shape)
        self._est = np.empty(size, dtype=np.float32)  # (d,)
        self._out = np.empty((scheme.k, size), dtype=self.dtype)  # (k, d)
        self._results: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        self.planner.reset()
        self._results.clear()

    @property
    def ready(self) -> bool:
        return self.planner.ready

    def add(self, index: int, value: np.ndarray) -> bool:
        value = np.asarray(value)
        if value.shape != self.shape:
            raise CodingError(f"result of worker {index}: expected shape {self.shape}, got {value.shape}")
        accepted, ops = self.planner.add(index)
        if not accepted:
            return False
        self._results[int(index)] = value.reshape(-1).astype(self.dtype, copy=False)
        for op in ops:
            self._run(op)
        return self.planner.ready

    def _run(self, op: Op) -> None:
        if isinstance(op, UpdateOp):
            online_update(
                self._est,
                self._results[op.source],
                op.alpha,
                op.beta,
                copy_out=None if op.copy_row is None else self._out[op.copy_row],
                final_out=None if op.final_row is None else self._out[op.final_row],
                final_scale=op.final_scale,
            )
        elif isinstance(op, CopyOp):
            self._out[op.row] = self._results[op.source]
        else:
            decoded = general_decode(op.coeffs, [self._results[s] for s in op.sources])
            self._out[list(op.rows)] = decoded

    def finalize(self) -> np.ndarray:
        if not self.planner.ready:
            raise CodingError(f"finalize needs k={self.scheme.k} distinct results, got {len(self.planner.received)}")
        return self._out.reshape((self.scheme.k, *self.shape)).copy()
