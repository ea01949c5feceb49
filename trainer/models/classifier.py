"""Classifier = f (InvertibleNet) + heads g; its config; the fingerprint of f."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kernels.configs import strict_from_dict
from trainer.errors import ModelConfigError
from trainer.models.heads import Head, HeadConfig
from trainer.models.iresnet import InvertibleNet, IResNetConfig
from trainer.models.mixup import MixInfo, mix, sample_mix, soft_targets


@dataclass
class ClassifierConfig:
    f: IResNetConfig
    heads: list[HeadConfig]
    dataset: str

    def __post_init__(self) -> None:
        if isinstance(self.f, dict):
            self.f = IResNetConfig.from_dict(self.f)
        self.heads = [HeadConfig.from_dict(h) if isinstance(h, dict) else h for h in self.heads]
        if not self.heads:
            raise ModelConfigError("ClassifierConfig needs at least one head (the primary task)")
        tasks = [h.task for h in self.heads]
        if len(set(tasks)) != len(tasks):
            raise ModelConfigError(f"head tasks must be unique, got {tasks}")
        if self.heads[0].label_map is not None:
            raise ModelConfigError(f"the primary head {tasks[0]!r} must not have a label_map")
        for h in self.heads[1:]:
            if h.label_map is None or len(h.label_map) != self.heads[0].num_classes:
                raise ModelConfigError(
                    f"head {h.task!r} needs a label_map with one entry per primary class "
                    f"({self.heads[0].num_classes})"
                )

    def to_dict(self) -> dict:
        return {
            "f": self.f.to_dict(),
            "heads": [h.to_dict() for h in self.heads],
            "dataset": self.dataset,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        return strict_from_dict(cls, data, ModelConfigError)


class Classifier(nn.Module):
    """x (B, C, H, W) -> {task: logits (B, K_task)}; heads[first] is the primary task."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.f = InvertibleNet(config.f)
        emb = config.f.embedding_shape
        self.heads = nn.ModuleDict({h.task: Head(h, emb) for h in config.heads})
        for h in config.heads[1:]:
            self.register_buffer(f"label_map_{h.task}", torch.tensor(h.label_map))

    @property
    def primary_task(self) -> str:
        return self.config.heads[0].task

    def task_labels(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Primary labels (B,) -> {task: labels (B,)} through each coarse head's label_map."""
        out = {self.primary_task: labels}
        for h in self.config.heads[1:]:
            out[h.task] = getattr(self, f"label_map_{h.task}")[labels]
        return out

    def heads_forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {task: head(z) for task, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads_forward(self.f(x))

    def forward_mixup(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        alpha: float = 1.0,
        generator: torch.Generator | None = None,
        info: MixInfo | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], MixInfo]:
        """Manifold Mixup step: (logits per task, soft targets per task, what was mixed)."""
        if info is None:
            info = sample_mix(x.shape[0], self.f.num_mix_points, alpha, generator)
        z = self.f.forward_mix(x, info.mix_point, lambda h: mix(h, info))
        logits = self.heads_forward(z)
        targets = {
            task: soft_targets(lab, self.heads[task].config.num_classes, info)
            for task, lab in self.task_labels(labels).items()
        }
        return logits, targets, info


def primary_logits_fn(model: Classifier) -> nn.Module:
    """x -> primary-head logits of a Classifier, as one frozen eval-mode module (folded f):
    the base model that ParM is trained against and that the coded evaluations score."""

    class _Primary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = model.f.folded()
            self.head = model.heads[model.primary_task]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.f(x))  # (B, K)

    return _Primary().eval().requires_grad_(False)


def fingerprint(f: InvertibleNet) -> str:
    """sha256 over f's folded weights: state-dict tensors in sorted key order (name, shape,
    float32 little-endian bytes). Encoders/ParM/bundles record it to pin the f they match."""
    folded = f.folded() if any(k.endswith(".u") for k in f.state_dict()) else f
    state = folded.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(np.ascontiguousarray(t.numpy(), dtype="<f4").tobytes())
    return h.hexdigest()
