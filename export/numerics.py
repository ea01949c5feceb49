"""ONNX Runtime (CPU) runs and the error statistics that decide whether an export passes.

Pass criterion, for every file: max|actual - reference| <= atol + rtol * max|reference|.
`max_rel_err` is max|actual - reference| / max|reference| (relative to the output's scale;
element-wise relative error is meaningless for outputs that cross zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportVerificationError

_TINY = 1e-12
_ORT_CHUNK = 64  # samples per ORT call: bounds memory, exercises the dynamic batch dim


@dataclass(frozen=True)
class ErrorStats:
    max_abs_err: float
    max_rel_err: float
    ref_max_abs: float
    samples: int

    def passes(self, atol: float, rtol: float) -> bool:
        return bool(np.isfinite(self.max_abs_err)) and self.max_abs_err <= atol + rtol * self.ref_max_abs

    def to_dict(self, atol: float, rtol: float) -> dict[str, Any]:
        return {
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "samples": self.samples,
            "atol": atol,
            "rtol": rtol,
        }


def error_stats(actual: np.ndarray, reference: np.ndarray, what: str = "output") -> ErrorStats:
    """Raises ExportVerificationError naming `what` when the shapes differ."""
    if actual.shape != reference.shape:
        raise ExportVerificationError(
            f"{what}: output shape {actual.shape} differs from reference shape {reference.shape}"
        )
    diff = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if diff.size and not np.all(np.isfinite(diff)):
        max_abs = float("inf")
    ref_max = float(np.abs(reference).max()) if reference.size else 0.0
    return ErrorStats(
        max_abs_err=max_abs,
        max_rel_err=max_abs / max(ref_max, _TINY),
        ref_max_abs=ref_max,
        samples=int(reference.shape[0]),
    )


def ort_session(path: str | Path) -> Any:
    import onnxruntime as ort  # lazy: `verify --no-numerics` works without it

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the export machine is shared; results do not depend on it
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_ort(path: str | Path, inputs: np.ndarray, *, input_name: str, output_name: str) -> np.ndarray:
    """Run one bundle file on `inputs` ([B, ...] FP32) in chunks; returns [B, ...] FP32."""
    session = ort_session(path)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    outputs = [
        session.run([output_name], {input_name: inputs[i : i + _ORT_CHUNK]})[0]
        for i in range(0, inputs.shape[0], _ORT_CHUNK)
    ]
    return np.concatenate(outputs, axis=0)
