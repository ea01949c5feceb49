"""Manifold Mixup (Verma et al. 2019): mix hidden states at a random layer, soft targets.

Mixing at one of {input, output of each residual block} of f trains g to behave linearly
between embeddings, which is what makes g tolerant of the approximate embeddings that
Coded-InvNet's decoder reconstructs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.errors import ModelInputError


@dataclass
class MixInfo:
    mix_point: int  # 0 = input, i = output of residual block i
    lam: float  # weight of the unpermuted batch
    perm: torch.Tensor  # (B,) partner index of every example


def sample_mix(
    batch_size: int, num_mix_points: int, alpha: float, generator: torch.Generator | None = None
) -> MixInfo:
    """Draw the layer uniformly, lam ~ Beta(alpha, alpha), and a random partner permutation."""
    if alpha <= 0:
        raise ModelInputError(f"mixup alpha must be > 0, got {alpha}")
    point = int(torch.randint(num_mix_points, (1,), generator=generator))
    # Beta(a, a) as G1 / (G1 + G2) with Gamma draws from the seeded generator.
    g = torch._standard_gamma(torch.full((2,), float(alpha)), generator=generator)
    lam = float(g[0] / g.sum())
    perm = torch.randperm(batch_size, generator=generator)
    return MixInfo(point, lam, perm)


def mix(h: torch.Tensor, info: MixInfo) -> torch.Tensor:
    return info.lam * h + (1.0 - info.lam) * h[info.perm]


def soft_targets(labels: torch.Tensor, num_classes: int, info: MixInfo) -> torch.Tensor:
    """(B,) int labels -> (B, num_classes) lam * onehot(y) + (1 - lam) * onehot(y[perm])."""
    onehot = F.one_hot(labels, num_classes).to(torch.float32)  # (B, K)
    return info.lam * onehot + (1.0 - info.lam) * onehot[info.perm]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
