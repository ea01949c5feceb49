"""ParM baseline (Kosaian et al., SOSP 2019): a parity model with the base model's architecture.

The parity model reads the k queries of a group, combines them with a fixed linear encoder
(the mean, or the sum, of the k images) and runs an i-ResNet f' + primary head on the result.
It is trained so that its output approximates sum_j logits(x_j) of the base model's primary
head; with one erasure the decoder subtracts: logits_a ~= parm(x) - sum_{i != a} logits(x_i).

Notation: B batch, k queries per group, C x H x W image, K classes of the primary head.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels.configs import strict_from_dict
from trainer.errors import ModelInputError, ParMConfigError

logger = logging.getLogger(__name__)

INPUT_MODES = ("mean", "sum")


@dataclass
class ParMConfig:
    """A parity model: the base classifier's architecture (`classifier`) behind a k-query encoder."""

    k: int
    classifier: dict[str, Any]  # model_config of the base classifier; its architecture is reused
    input_mode: str = "mean"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ParMConfigError(f"k must be >= 1, got {self.k}")
        if self.input_mode not in INPUT_MODES:
            raise ParMConfigError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if not isinstance(self.classifier, dict):
            raise ParMConfigError(
                f"classifier must be the base classifier's model_config dict, got {type(self.classifier).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParMConfig:
        return strict_from_dict(cls, data, ParMConfigError)


class ParityModel(nn.Module):
    """x [B, k, C, H, W] -> logits_sum [B, K]: predicts sum_j logits(x_j) of the primary head."""

    def __init__(self, config: ParMConfig, body: nn.Module) -> None:
        super().__init__()
        if not hasattr(body, "f") or not hasattr(body, "heads") or len(body.heads) == 0:
            raise ParMConfigError("body must be a Classifier with `.f` and a non-empty `.heads` ModuleDict")
        self.config = config
        self.k = config.k
        self.f = body.f
        self.task = next(iter(body.heads))  # the first head is the primary head
        self.head = body.heads[self.task]
        # The parity model predicts a sum of k logit vectors: scale the output so that a
        # body initialised from the base model starts near the target instead of k times off.
        self.output_scale = float(config.k)

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed linear encoder: [B, k, C, H, W] -> [B, C, H, W]."""
        if x.dim() != 5 or x.shape[1] != self.k:
            raise ModelInputError(f"ParM input must be [B, k={self.k}, C, H, W], got {list(x.shape)}")
        return x.mean(dim=1) if self.config.input_mode == "mean" else x.sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.f(self.combine(x))  # (B, *embedding_shape)
        return self.output_scale * self.head(z)  # (B, K)


def parm_decode(parity_logits: torch.Tensor, available_logits: torch.Tensor) -> torch.Tensor:
    """The missing query's logits: parity [B, K] minus the sum of the k-1 available [B, k-1, K]."""
    return parity_logits - available_logits.sum(dim=1)


def build_parm(model_config: dict[str, Any]) -> ParityModel:
    """Rebuild a parity model from a checkpoint's `model_config` (weights loaded separately)."""
    config = ParMConfig.from_dict(dict(model_config))
    from trainer.models.classifier import Classifier, ClassifierConfig  # the base architecture

    return ParityModel(config, Classifier(ClassifierConfig.from_dict(config.classifier)))
