"""g: light heads on the embedding z = f(x): norm -> ReLU -> average pool -> linear.

`pool_size` = 1 is global average pooling (the paper's head); a larger value keeps a
pool_size x pool_size grid, which matters when the embedding has few channels (MNIST's
(16, 7, 7) gives GAP only 16 features). It must divide the embedding's H and W so the
pool is a plain AvgPool (exports to ONNX without adaptive-pool quirks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.configs import strict_from_dict
from trainer.errors import ModelConfigError


@dataclass
class HeadConfig:
    task: str
    num_classes: int
    class_names: tuple[str, ...]
    pool_size: int = 1
    # label_map[primary_label] = this task's label; None for the primary task itself.
    label_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.class_names = tuple(str(c) for c in self.class_names)
        if self.label_map is not None:
            self.label_map = tuple(int(v) for v in self.label_map)
        if not self.task or not self.task.replace("_", "").replace("-", "").isalnum():
            raise ModelConfigError(f"head task must be a non-empty identifier, got {self.task!r}")
        if self.num_classes < 2:
            raise ModelConfigError(f"head {self.task!r}: num_classes must be >= 2, got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            raise ModelConfigError(
                f"head {self.task!r}: {len(self.class_names)} class_names for "
                f"{self.num_classes} classes"
            )
        if self.pool_size < 1:
            raise ModelConfigError(f"head {self.task!r}: pool_size must be >= 1, got {self.pool_size}")
        if self.label_map is not None and (
            min(self.label_map) < 0 or max(self.label_map) >= self.num_classes
        ):
            raise ModelConfigError(
                f"head {self.task!r}: label_map values must be in [0, {self.num_classes}), "
                f"got {self.label_map}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["label_map"] = None if self.label_map is None else list(self.label_map)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        return strict_from_dict(cls, data, ModelConfigError)


class Head(nn.Module):
    """(B, C, H, W) embedding -> (B, num_classes) logits."""

    def __init__(self, config: HeadConfig, embedding_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = embedding_shape
        p = config.pool_size
        if h % p or w % p:
            raise ModelConfigError(
                f"head {config.task!r}: pool_size {p} must divide the embedding's H, W = {h}, {w}"
            )
        self.config = config
        self.pool_kernel = (h // p, w // p)
        self.norm = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c * p * p, config.num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(z))  # (B, C, H, W)
        if self.pool_kernel != (1, 1):  # a 1x1 pool is the identity: skip its copy
            h = F.avg_pool2d(h, self.pool_kernel)  # (B, C, p, p)
        return self.linear(h.flatten(1))  # (B, num_classes)


def default_heads(dataset: str, class_names: tuple[str, ...], pool_size: int) -> list[HeadConfig]:
    """Primary fine-grained head plus one coarse task per dataset (multi-task, paper §4.6)."""
    if dataset == "mnist":
        primary, coarse = "digit", HeadConfig(
            "parity", 2, ("even", "odd"), pool_size, tuple(d % 2 for d in range(10))
        )
    elif dataset == "fashion-mnist":
        # clothing: T-shirt, Trouser, Pullover, Dress, Coat, Shirt; footwear: Sandal,
        # Sneaker, Ankle boot; bag: Bag.
        primary, coarse = "category", HeadConfig(
            "group", 3, ("clothing", "footwear", "bag"), pool_size,
            (0, 0, 0, 0, 0, 1, 0, 1, 2, 1),
        )
    elif dataset == "cifar10":
        primary, coarse = "category", HeadConfig(
            "kind", 2, ("vehicle", "animal"), pool_size, (0, 0, 1, 1, 1, 1, 1, 1, 0, 0)
        )
    else:
        raise ModelConfigError(f"no default heads for dataset {dataset!r}")
    return [HeadConfig(primary, len(class_names), class_names, pool_size), coarse]
