"""Coded-InvNet parity encoders: an order-invariant Pix2Pix U-Net and a PixelGAN discriminator.

Encoder r maps the k queries of a coding group to one image whose embedding approximates
sum_j C[r, j] f(x_j) (paper §4.1, Fig. 3). The first `shared_levels` levels of the U-Net run
on each query separately with shared weights, and their features (the skip connections too)
are averaged over the k axis, so the encoder is invariant to the order of the (query,
coefficient) pairs and everything after the average costs the same for any k.

Notation: B batch, k queries per group, C image channels, H x W image size, c_l channels at
U-Net level l (level l has resolution H / 2**l).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels.configs import strict_from_dict
from trainer.errors import EncoderConfigError, ModelInputError

logger = logging.getLogger(__name__)


@dataclass
class EncoderConfig:
    """Architecture of a set of parity encoders (one U-Net per parity row of the code)."""

    in_channels: int
    image_size: list[int]
    k: int
    coefficients: list[list[float]]  # (n-k) x k rows of the coding matrix C
    base_channels: int = 32
    depth: int = 2  # number of stride-2 downsamplings
    shared_levels: int = 2  # levels run per query with shared weights, then averaged over k
    residual: bool = True  # predict a correction to sum_j C[r, j] x_j instead of the image itself

    def __post_init__(self) -> None:
        self.image_size = [int(s) for s in self.image_size]
        self.coefficients = [[float(c) for c in row] for row in self.coefficients]
        if self.in_channels < 1:
            raise EncoderConfigError(f"in_channels must be >= 1, got {self.in_channels}")
        if len(self.image_size) != 2:
            raise EncoderConfigError(f"image_size must be [H, W], got {self.image_size}")
        if self.k < 1:
            raise EncoderConfigError(f"k must be >= 1, got {self.k}")
        if not self.coefficients:
            raise EncoderConfigError("coefficients must have at least one parity row (n - k >= 1)")
        for r, row in enumerate(self.coefficients):
            if len(row) != self.k:
                raise EncoderConfigError(
                    f"coefficient row {r} has {len(row)} entries, expected k={self.k}; "
                    "pass the (n-k) x k matrix C of the coding scheme"
                )
        if self.depth < 1:
            raise EncoderConfigError(f"depth must be >= 1, got {self.depth}")
        if not 1 <= self.shared_levels <= self.depth + 1:
            raise EncoderConfigError(
                f"shared_levels must be in [1, depth + 1] = [1, {self.depth + 1}], got {self.shared_levels}"
            )
        if self.base_channels < 1:
            raise EncoderConfigError(f"base_channels must be >= 1, got {self.base_channels}")
        scale = 2**self.depth
        if any(s % scale for s in self.image_size):
            raise EncoderConfigError(
                f"image_size {self.image_size} must be divisible by 2**depth = {scale}; lower --depth"
            )

    @property
    def n(self) -> int:
        return self.k + len(self.coefficients)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        return strict_from_dict(cls, data, EncoderConfigError)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def _fuse(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class UNetEncoder(nn.Module):
    """One parity row: x [B, k, C, H, W] -> x_parity [B, C, H, W] (normalised image space)."""

    def __init__(self, config: EncoderConfig, row: int) -> None:
        super().__init__()
        if not 0 <= row < len(config.coefficients):
            raise EncoderConfigError(f"row must be in [0, {len(config.coefficients)}), got {row}")
        self.k = config.k
        self.in_channels = config.in_channels
        self.shared_levels = config.shared_levels
        self.residual = config.residual
        self.register_buffer("coefficients", torch.tensor(config.coefficients[row], dtype=torch.float32))
        widths = [config.base_channels * 2**min(level, 3) for level in range(config.depth + 1)]
        # The query's coefficient enters as a constant extra channel, so a row with unequal
        # coefficients stays invariant to permuting (query, coefficient) pairs together.
        stem = nn.Sequential(nn.Conv2d(config.in_channels + 1, widths[0], 3, padding=1), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleList([stem] + [_down(widths[i], widths[i + 1]) for i in range(config.depth)])
        self.bottleneck = _fuse(widths[-1], widths[-1])
        self.ups = nn.ModuleList([_up(widths[i + 1], widths[i]) for i in reversed(range(config.depth))])
        self.fuses = nn.ModuleList([_fuse(2 * widths[i], widths[i]) for i in reversed(range(config.depth))])
        self.head = nn.Conv2d(widths[0], config.in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, k, C, H, W = x.shape
        coeff = self.coefficients.to(x.dtype)  # (k,)
        h = torch.cat([x, coeff.view(1, k, 1, 1, 1).expand(B, k, 1, H, W)], dim=2)  # (B, k, C+1, H, W)
        h = h.reshape(B * k, C + 1, H, W)
        skips: list[torch.Tensor] = []
        for level, down in enumerate(self.downs):
            h = down(h)
            if level < self.shared_levels:
                # average this level's per-query features over k: (B*k, c, h, w) -> (B, c, h, w)
                skips.append(h.reshape(B, k, *h.shape[1:]).mean(dim=1))
                if level == self.shared_levels - 1:
                    h = skips[-1]
            else:
                skips.append(h)
        h = self.bottleneck(h)  # (B, c_depth, H / 2**depth, W / 2**depth)
        for up, fuse, skip in zip(self.ups, self.fuses, reversed(skips[:-1]), strict=True):
            h = fuse(torch.cat([up(h), skip], dim=1))
        out = self.head(h)  # (B, C, H, W)
        if self.residual:
            out = out + torch.einsum("bkchw,k->bchw", x, coeff)
        return out


class ParityEncoders(nn.Module):
    """All n-k encoders of a coding scheme: x [B, k, C, H, W] -> [B, n-k, C, H, W].

    `encoders[r]` is the module exported as `encoders/enc_<r>.onnx`.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleList([UNetEncoder(config, r) for r in range(len(config.coefficients))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.config.k or x.shape[2] != self.config.in_channels:
            raise ModelInputError(
                f"encoder input must be [B, k={self.config.k}, C={self.config.in_channels}, H, W], "
                f"got {list(x.shape)}"
            )
        return torch.stack([enc(x) for enc in self.encoders], dim=1)  # (B, n-k, C, H, W)


@dataclass
class DiscriminatorConfig:
    """PixelGAN (1x1) discriminator: judges every pixel of (condition, image) independently."""

    in_channels: int
    width: int = 64

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.width < 1:
            raise EncoderConfigError(
                f"in_channels and width must be >= 1, got {self.in_channels} and {self.width}"
            )


class PixelDiscriminator(nn.Module):
    """(condition [B, C, H, W], image [B, C, H, W]) -> per-pixel LSGAN score [B, 1, H, W]."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        w = config.width
        self.net = nn.Sequential(
            nn.Conv2d(2 * config.in_channels, w, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 1, 1),
        )

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([condition, image], dim=1))


def build_encoders(model_config: dict[str, Any]) -> ParityEncoders:
    """Rebuild the encoder set from a checkpoint's `model_config` (the export path uses this)."""
    return ParityEncoders(EncoderConfig.from_dict(dict(model_config)))
