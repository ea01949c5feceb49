"""f: an invertible residual network (i-ResNet, Behrmann et al. 2019) without injective padding.

Layout: for each stage, an invertible space-to-depth squeeze (C, H, W) -> (4C, H/2, W/2),
then residual blocks y = x + G(x) with G = conv3x3 -> ELU -> conv1x1 -> ELU -> conv3x3.
Every conv's *operator* norm is kept <= lipschitz_coeff (see spectral.py) and ELU is
1-Lipschitz, so Lip(G) <= coeff^3 < 1 and each block is a bijection whose inverse is the
Banach fixed point x = y - G(x). f maps R^d -> R^d (d = C*H*W): the embedding has exactly
the input's number of elements, so any point of R^d, including the off-manifold averages
sum_j f(x_j) / k that Coded-InvNet's encoders target, has a preimage.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from kernels.configs import strict_from_dict
from trainer.errors import InverseNotConverged, ModelConfigError, ModelInputError
from trainer.models.spectral import SpectralConv2d, conv_operator_norm

logger = logging.getLogger(__name__)


@dataclass
class IResNetConfig:
    in_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of the normalised input
    stages: int = 2  # each stage = squeeze + blocks
    blocks_per_stage: tuple[int, ...] = (4, 4)
    hidden_channels: tuple[int, ...] = (32, 64)
    lipschitz_coeff: float = 0.9  # operator-norm bound of every conv
    n_power_iterations: int = 1  # per training step, per conv
    kernel_size: int = 3

    def __post_init__(self) -> None:
        self.in_shape = tuple(int(s) for s in self.in_shape)
        self.blocks_per_stage = tuple(int(b) for b in self.blocks_per_stage)
        self.hidden_channels = tuple(int(h) for h in self.hidden_channels)
        if len(self.in_shape) != 3 or min(self.in_shape) < 1:
            raise ModelConfigError(f"in_shape must be (C, H, W) with positive sizes, got {self.in_shape}")
        if self.stages < 1:
            raise ModelConfigError(f"stages must be >= 1, got {self.stages}")
        if len(self.blocks_per_stage) != self.stages or len(self.hidden_channels) != self.stages:
            raise ModelConfigError(
                f"blocks_per_stage {self.blocks_per_stage} and hidden_channels "
                f"{self.hidden_channels} must each have one entry per stage ({self.stages})"
            )
        if min(self.blocks_per_stage) < 0 or min(self.hidden_channels) < 1:
            raise ModelConfigError("blocks_per_stage must be >= 0 and hidden_channels >= 1")
        _, h, w = self.in_shape
        if h % 2**self.stages or w % 2**self.stages:
            raise ModelConfigError(
                f"in_shape {self.in_shape}: H and W must be divisible by 2**stages = "
                f"{2**self.stages} so every squeeze is exact; use fewer stages"
            )
        if not 0.0 < self.lipschitz_coeff <= 0.9:
            raise ModelConfigError(
                f"lipschitz_coeff must be in (0, 0.9] for a contractive G, got {self.lipschitz_coeff}"
            )
        if self.n_power_iterations < 1:
            raise ModelConfigError(f"n_power_iterations must be >= 1, got {self.n_power_iterations}")
        if self.kernel_size < 1 or self.kernel_size % 2 != 1:
            raise ModelConfigError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        c, h, w = self.in_shape
        s = 2**self.stages
        return (c * s * s, h // s, w // s)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict) -> IResNetConfig:
        return strict_from_dict(cls, data, ModelConfigError)


@dataclass
class InverseReport:
    """Outcome of f.inverse: iterations used and the residual ||f(x_hat) - z|| / ||z||."""

    iterations: int  # max over blocks
    iterations_per_block: list[int] = field(default_factory=list)
    max_rel_residual: float = math.inf  # max over the batch
    converged: bool = False
    tol: float = 0.0


class Squeeze(nn.Module):
    """Invertible space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2), pixel_unshuffle order.

    Written with reshape/permute on static C, H, W so ONNX export keeps a dynamic batch.
    """

    def __init__(self, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.c, self.h, self.w = in_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.c, self.h, self.w
        x = x.reshape(-1, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
        return x.permute(0, 1, 3, 5, 2, 4).reshape(-1, c * 4, h // 2, w // 2)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        c, h, w = self.c, self.h, self.w
        y = y.reshape(-1, c, 2, 2, h // 2, w // 2)  # (B, C, 2, 2, H/2, W/2)
        return y.permute(0, 1, 4, 2, 5, 3).reshape(-1, c, h, w)


class ResidualBlock(nn.Module):
    """y = x + G(x); G is contractive, so x = y - G(x) is a Banach fixed point."""

    def __init__(
        self, shape: tuple[int, int, int], hidden: int, cfg: IResNetConfig
    ) -> None:
        super().__init__()
        c, h, w = shape
        k = cfg.kernel_size
        coeff, n_pi = cfg.lipschitz_coeff, cfg.n_power_iterations
        self.shape = shape
        self.G = nn.Sequential(
            SpectralConv2d(c, hidden, k, (h, w), coeff, n_pi),
            nn.ELU(),
            SpectralConv2d(hidden, hidden, 1, (h, w), coeff, n_pi),
            nn.ELU(),
            SpectralConv2d(hidden, c, k, (h, w), coeff, n_pi),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.G(x)

    @torch.no_grad()
    def inverse(
        self, y: torch.Tensor, tol: float, max_iter: int
    ) -> tuple[torch.Tensor, int, bool]:
        """Fixed point x_{t+1} = y - G(x_t) from x_0 = y.

        The step x_{t+1} - x_t equals -(F(x_t) - y), so the stopping test is the block's own
        residual, relative to ||y|| per sample, maximised over the batch.
        """
        y_norm = y.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
        x = y
        for it in range(1, max_iter + 1):
            x_next = y - self.G(x)
            step = (x_next - x).flatten(1).norm(dim=1) / y_norm  # (B,)
            x = x_next
            if float(step.max()) <= tol:
                return x, it, True
        return x, max_iter, False

    @torch.no_grad()
    def lipschitz_bound(self, n_iter: int = 200) -> float:
        """Product of the conv operator norms (fresh power iteration): an upper bound on Lip(G)."""
        bound = 1.0
        for m in self.G:
            if isinstance(m, SpectralConv2d):
                was_training = m.training
                m.eval()  # the eval-mode scaling is the function that gets inverted
                w = m.effective_weight()
                m.train(was_training)
                bound *= conv_operator_norm(w, m.in_shape, m.padding, n_iter=n_iter)
            elif isinstance(m, nn.Conv2d):
                in_shape = (m.in_channels, self.shape[1], self.shape[2])
                bound *= conv_operator_norm(m.weight, in_shape, m.padding[0], n_iter=n_iter)
        return bound


class InvertibleNet(nn.Module):
    """f: normalised input (B, C, H, W) -> embedding (B, *config.embedding_shape), bijective."""

    def __init__(self, config: IResNetConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        shape = config.in_shape
        for stage in range(config.stages):
            layers.append(Squeeze(shape))
            shape = (shape[0] * 4, shape[1] // 2, shape[2] // 2)
            for _ in range(config.blocks_per_stage[stage]):
                layers.append(ResidualBlock(shape, config.hidden_channels[stage], config))
        self.layers = nn.ModuleList(layers)

    @property
    def num_blocks(self) -> int:
        return sum(isinstance(m, ResidualBlock) for m in self.layers)

    @property
    def num_mix_points(self) -> int:
        """Manifold Mixup points: 0 = the input, i = the output of residual block i."""
        return 1 + self.num_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_mix(x)

    def forward_mix(
        self,
        x: torch.Tensor,
        mix_point: int | None = None,
        mix_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward, applying `mix_fn` to the hidden state at `mix_point` (see num_mix_points)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.config.in_shape:
            raise ModelInputError(
                f"f expects input (B, {', '.join(map(str, self.config.in_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if mix_point == 0:
            x = mix_fn(x)
        block = 0
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, ResidualBlock):
                block += 1
                if mix_point == block:
                    x = mix_fn(x)
        return x  # (B, *embedding_shape)

    @torch.no_grad()
    def inverse(
        self,
        z: torch.Tensor,
        tol: float = 1e-5,
        max_iter: int = 50,
        raise_on_failure: bool = True,
    ) -> tuple[torch.Tensor, InverseReport]:
        """x_hat with f(x_hat) ~= z, block by block from the last one back.

        Each block iterates until its own relative residual is <= tol / 4 (float32 cannot
        go much below ~1e-7); afterwards the end-to-end residual ||f(x_hat) - z|| / ||z|| is
        measured. `converged` means every block stopped within max_iter AND that residual is
        <= tol. Unless raise_on_failure=False, an unconverged result raises
        InverseNotConverged (carrying the report and x_hat) instead of being returned.
        """
        emb = self.config.embedding_shape
        if z.dim() != 4 or tuple(z.shape[1:]) != emb:
            raise ModelInputError(
                f"f.inverse expects z of shape (B, {', '.join(map(str, emb))}), got {tuple(z.shape)}"
            )
        if tol <= 0 or max_iter < 1:
            raise ModelInputError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
        was_training = self.training
        self.eval()  # no power-iteration updates: the function being inverted must stay fixed
        try:
            x = z
            iters: list[int] = []
            blocks_ok = True
            for layer in reversed(self.layers):
                if isinstance(layer, ResidualBlock):
                    x, it, ok = layer.inverse(x, tol / 4, max_iter)
                    iters.append(it)
                    blocks_ok &= ok
                else:
                    x = layer.inverse(x)
            iters.reverse()
            residual = (self.forward(x) - z).flatten(1).norm(dim=1) / z.flatten(1).norm(
                dim=1
            ).clamp_min(1e-12)  # (B,)
            max_res = float(residual.max()) if residual.numel() else 0.0
        finally:
            self.train(was_training)
        report = InverseReport(
            iterations=max(iters, default=0),
            iterations_per_block=iters,
            max_rel_residual=max_res,
            converged=bool(blocks_ok and max_res <= tol),
            tol=tol,
        )
        if not report.converged and raise_on_failure:
            raise InverseNotConverged(
                f"f.inverse did not converge: max relative residual {max_res:.3e} (tol {tol:.1e}), "
                f"iterations per block {iters} (max_iter {max_iter}). Raise max_iter, loosen tol, "
                "or pass raise_on_failure=False to inspect the attempt.",
                report,
                x,
            )
        return x, report

    @torch.no_grad()
    def refine_spectral(self, n_iter: int = 100) -> None:
        """Tighten every conv's sigma estimate (changes the eval function slightly: do it
        once after training, before the final evaluation, fingerprint and export)."""
        for m in self.modules():
            if isinstance(m, SpectralConv2d):
                m.refine(n_iter)

    @torch.no_grad()
    def lipschitz_bounds(self, n_iter: int = 200) -> list[float]:
        """Upper bound on Lip(G) of every block, from fresh power iterations."""
        return [m.lipschitz_bound(n_iter) for m in self.layers if isinstance(m, ResidualBlock)]

    @torch.no_grad()
    def folded(self) -> InvertibleNet:
        """Copy in eval mode with every SpectralConv2d replaced by a plain Conv2d holding the
        scaled weight: same eval forward, no power-iteration buffers (for ONNX export)."""
        out = copy.deepcopy(self)
        out.eval()
        for block in out.layers:
            if isinstance(block, ResidualBlock):
                for i, m in enumerate(block.G):
                    if isinstance(m, SpectralConv2d):
                        block.G[i] = m.folded()
        return out.eval()

    def lipschitz_summary(self) -> str:
        b = self.lipschitz_bounds(50)
        return f"Lip(G) bounds: min {min(b):.3f} max {max(b):.3f}" if b else "no blocks"
