"""Spectral normalisation of a *convolution operator* (not of the reshaped weight matrix).

torch's `spectral_norm` bounds the norm of the weight reshaped to (C_out, C_in*k*k), which
for a 3x3 conv can leave the operator norm of x -> conv(x) near 2x the target. i-ResNet's
invertibility needs the operator norm itself, so we run power iteration through `conv2d`
(A) and `conv_transpose2d` (A^T) on the layer's actual input shape, keep the vectors u, v
as persistent buffers, and divide the weight by max(1, sigma / coeff).

Modes:
- training: `n_power_iterations` updates of (u, v) per forward, sigma differentiable in W;
- eval: no update, so the forward is a fixed deterministic function (needed by the
  fixed-point inverse and by export). Call `refine(n)` after training to tighten sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ModelConfigError


def _normalize(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return t / t.norm().clamp_min(eps)


def conv_operator_norm(
    weight: torch.Tensor,
    in_shape: tuple[int, int, int],
    padding: int,
    n_iter: int = 200,
    seed: int = 0,
) -> float:
    """Largest singular value of x -> conv2d(x, weight) on inputs of `in_shape` (C, H, W).

    Independent estimate (fresh random start, many iterations) used by tests and checks.
    """
    gen = torch.Generator().manual_seed(seed)
    w = weight.detach().to(torch.float64)
    v = _normalize(torch.randn((1, *in_shape), generator=gen, dtype=torch.float64))
    sigma = 0.0
    with torch.no_grad():
        for _ in range(n_iter):
            u = F.conv2d(v, w, padding=padding)  # (1, C_out, H, W)
            sigma = float(u.norm())
            v = _normalize(F.conv_transpose2d(u, w, padding=padding))  # (1, C_in, H, W)
    return sigma


class SpectralConv2d(nn.Module):
    """Stride-1 'same' conv whose operator norm on `in_shape` inputs is kept <= coeff."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        in_hw: tuple[int, int],
        coeff: float,
        n_power_iterations: int = 1,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ModelConfigError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.padding = kernel_size // 2
        self.coeff = float(coeff)
        self.n_power_iterations = int(n_power_iterations)
        self.in_shape = (in_channels, *in_hw)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        # u lives in the output space, v in the input space; both unit-norm.
        self.register_buffer("u", _normalize(torch.randn(1, out_channels, *in_hw)))
        self.register_buffer("v", _normalize(torch.randn(1, in_channels, *in_hw)))
        with torch.no_grad():
            self._power_iterate(10)

    def _power_iterate(self, n_iter: int) -> None:
        w = self.weight.detach()
        u, v = self.u, self.v
        for _ in range(n_iter):
            v = _normalize(F.conv_transpose2d(u, w, padding=self.padding))  # (1, C_in, H, W)
            u = _normalize(F.conv2d(v, w, padding=self.padding))  # (1, C_out, H, W)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def refine(self, n_iter: int = 100) -> None:
        """More power iterations on the current weight (do it before evaluation / folding)."""
        self._power_iterate(n_iter)

    def sigma(self) -> torch.Tensor:
        """Power-iteration estimate u^T A v of the operator norm (differentiable in W)."""
        return (self.u * F.conv2d(self.v, self.weight, padding=self.padding)).sum()

    def effective_weight(self) -> torch.Tensor:
        if self.training and self.n_power_iterations > 0:
            with torch.no_grad():
                self._power_iterate(self.n_power_iterations)
        # Only ever shrink: a conv already below coeff is left alone.
        factor = torch.clamp(self.sigma() / self.coeff, min=1.0)
        return self.weight / factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.padding)

    @torch.no_grad()
    def folded(self) -> nn.Conv2d:
        """A plain Conv2d with the current eval-mode scaling baked into its weight."""
        c_out, c_in, k, _ = self.weight.shape
        conv = nn.Conv2d(c_in, c_out, k, padding=self.padding)
        was_training = self.training
        self.eval()
        conv.weight.copy_(self.effective_weight())
        conv.bias.copy_(self.bias)
        self.train(was_training)
        return conv
