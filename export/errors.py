"""The export package's exceptions: one base class, one subclass per way an export can fail.

Library code raises these; only `export.cli.main` turns them into messages and exit codes.
"""

from __future__ import annotations


class ExportError(Exception):
    """Base class: a bundle could not be exported, verified or compiled."""


class ExportConfigError(ExportError, ValueError):
    """A flag or config field is invalid."""


class CheckpointMismatchError(ExportError):
    """Checkpoints that must belong together do not (different f, different k, missing rows)."""


class ExportVerificationError(ExportError):
    """An exported file disagrees with PyTorch (at export) or with its stored reference (verify)."""


class TensorRTUnavailableError(ExportError):
    """The TensorRT builder (or CUDA) cannot be imported on this machine."""


class TensorRTBuildError(ExportError):
    """TensorRT refused the ONNX file or failed to build an engine."""
