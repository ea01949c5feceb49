"""The trainer's exceptions: one base, so `python -m trainer` maps every bad input to exit 2.

Library code raises these; only `trainer.flags.run_command` (each command's `main`) turns
them into a log line and an exit code. Every class is a `ValueError` through
`TrainerError`, so callers that predate the hierarchy and catch ValueError keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainer.models.iresnet import InverseReport


class TrainerError(ValueError):
    """A trainer command or library call cannot run as asked; the message names the fix."""


class DatasetError(TrainerError):
    """A dataset is missing, truncated, corrupt or unknown."""


class CheckpointError(TrainerError):
    """A checkpoint is missing, corrupt, of the wrong schema/version, or inconsistent."""


class ModelConfigError(TrainerError):
    """A model configuration (f, heads, classifier) is invalid or has unknown keys."""


class ModelInputError(TrainerError):
    """A model or one of its helpers was called with a tensor or argument it cannot take."""


class EncoderConfigError(ModelConfigError):
    """An encoder configuration is inconsistent or has unknown keys."""


class ParMConfigError(ModelConfigError):
    """A ParM configuration is inconsistent or has unknown keys."""


class ClassifierTrainError(TrainerError):
    """Bad flags of `python -m trainer classifier`, or a run directory of other flags."""


class IdealDataError(TrainerError):
    """Bad ideal-data configuration, or a cache that does not match the request."""


class EncoderTrainError(TrainerError):
    """Bad encoder-training configuration or inputs that do not belong together."""


class ParMTrainError(TrainerError):
    """Bad ParM training configuration."""


class EvaluateError(TrainerError):
    """Bad flags of `python -m trainer evaluate`."""


class CodedEvalError(TrainerError):
    """A coded evaluation was asked for an erasure set the code cannot decode."""


class SettingError(TrainerError):
    """An (n, k) setting that is not 'n,k' with n > k >= 2."""


class PipelineError(TrainerError):
    """Bad `python -m trainer train-all` configuration, or a step that failed."""


class InverseNotConverged(TrainerError, RuntimeError):
    """f.inverse did not reach the requested residual; `.report` and `.x` hold the attempt.

    Also a RuntimeError: it is a numerical outcome, not bad input, and callers written
    against the i-ResNet API catch it as one."""

    def __init__(self, message: str, report: InverseReport, x: torch.Tensor) -> None:
        super().__init__(message)
        self.report = report
        self.x = x
