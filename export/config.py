"""Validated configs for the three verbs: export (`ExportConfig`), `verify` and `trt`.

CLI flags map one-to-one onto these fields (export.cli); library callers build the same
dataclasses, so `build_bundle(ExportConfig(...))` and the CLI behave identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from export.errors import ExportConfigError
from export.layout import MIN_OPSET
from kernels.configs import strict_from_dict

EXPORTERS = ("dynamo", "torchscript")

# Pass criterion for every exported file: max|ort - torch| <= atol + rtol * max|torch|.
# FP32: both sides compute in fp32; differences are reduction order only (measured ~1e-6).
FP32_TOLERANCE = (1e-4, 1e-4)
# FP16: the ONNX holds fp16 weights and computes in fp16 (I/O stays FP32), compared with
# the fp32 PyTorch model, so the error includes fp16 rounding through every residual block.
FP16_TOLERANCE = (5e-2, 2e-2)


def default_tolerance(fp16: bool) -> tuple[float, float]:
    """(atol, rtol) used when the caller does not set them."""
    return FP16_TOLERANCE if fp16 else FP32_TOLERANCE


class _StrictConfig:
    """`from_dict`: unknown keys are ExportConfigError, never silently dropped."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return strict_from_dict(cls, data, ExportConfigError)


@dataclass(frozen=True)
class ExportConfig(_StrictConfig):
    """`python -m export CHECKPOINT... --out BUNDLE_DIR`."""

    checkpoints: tuple[str, ...]
    out: str
    opset: int = MIN_OPSET
    fp16: bool = False
    exporter: str = "dynamo"
    k: int | None = None  # group size when no encoder/ParM checkpoint fixes it (average code)
    model_name: str | None = None  # default: "<dataset>-iresnet"
    data_dir: str | None = None  # default: trainer.data's default data directory
    verify_samples: int = 64  # real test-split inputs compared ORT vs PyTorch per file
    reference_samples: int = 8  # of those, stored in verification/reference.npz for `verify`
    atol: float | None = None  # default: FP32_TOLERANCE / FP16_TOLERANCE
    rtol: float | None = None
    torch_program: bool = True  # also write torch/f.pt2 (torch.export) for `--engine torch`
    overwrite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.checkpoints, (str, bytes)) or not self.checkpoints:
            raise ExportConfigError(
                "checkpoints: expected one classifier checkpoint plus optional encoder/ParM "
                f"checkpoints, got {self.checkpoints!r}"
            )
        object.__setattr__(self, "checkpoints", tuple(str(c) for c in self.checkpoints))
        if not self.out:
            raise ExportConfigError("out: expected a bundle directory path (--out DIR)")
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise ExportConfigError(f"opset must be an integer >= {MIN_OPSET}, got {self.opset!r}")
        if self.exporter not in EXPORTERS:
            raise ExportConfigError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ExportConfigError(f"k must be a positive integer, got {self.k!r}")
        if self.verify_samples < 1:
            raise ExportConfigError(f"verify_samples must be >= 1, got {self.verify_samples}")
        if not 1 <= self.reference_samples <= self.verify_samples:
            raise ExportConfigError(
                f"reference_samples must be in [1, verify_samples={self.verify_samples}], "
                f"got {self.reference_samples}"
            )
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ExportConfigError(f"{name} must be >= 0, got {value!r}")
        if self.model_name is not None and not self.model_name.strip():
            raise ExportConfigError("model_name must be a non-empty string when given")

    @property
    def tolerance(self) -> tuple[float, float]:
        atol, rtol = default_tolerance(self.fp16)
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)


@dataclass(frozen=True)
class VerifyConfig(_StrictConfig):
    """`python -m export verify BUNDLE`."""

    bundle: str
    numerics: bool = True  # False: checksums + schema only (no onnxruntime needed)

    def __post_init__(self) -> None:
        if not self.bundle:
            raise ExportConfigError("bundle: expected a bundle directory path")


@dataclass(frozen=True)
class TrtConfig(_StrictConfig):
    """`python -m export trt BUNDLE`: TensorRT engines for the GPU this runs on."""

    bundle: str
    workers: int = 1  # concurrent execution contexts per engine: one optimisation profile each
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_bytes: int = 1 << 30
    timing_cache: str | None = None  # default: <bundle>/engines/<key>/timing.cache
    device: int = 0

    def __post_init__(self) -> None:
        if not self.bundle:
            raise ExportConfigError("bundle: expected a bundle directory path")
        if self.workers < 1:
            raise ExportConfigError(f"workers must be >= 1, got {self.workers}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportConfigError(
                "batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        if self.workspace_bytes < 1 << 20:
            raise ExportConfigError(f"workspace_bytes must be >= 1 MiB, got {self.workspace_bytes}")
        if self.device < 0:
            raise ExportConfigError(f"device must be >= 0, got {self.device}")
