"""Coded-InvNet parity encoders (an order-invariant Pix2Pix U-Net, or the lighter "squeezed"
encoder) and a PixelGAN discriminator.

Encoder r maps the k queries of a coding group to one image whose embedding approximates
sum_j C[r, j] f(x_j) (paper §4.1, Fig. 3). Both architectures (`EncoderConfig.arch`) run their
first layers on each query separately with shared weights and average those features over
the k axis, so the encoder is invariant to the order of the (query, coefficient) pairs and
everything after the average costs the same for any k:
- "unet" (`UNetEncoder`): the first `shared_levels` U-Net levels (skip connections too) per query;
- "squeezed" (`SqueezedEncoder`): a 1x1 lift of each space-to-depth-squeezed query, then a
  few 3x3 convs at 1/squeeze resolution; a small fraction of f's cost (see its docstring).

Notation: B batch, k queries per group, C image channels, H x W image size, c_l channels at
U-Net level l (level l has resolution H / 2**l).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.configs import strict_from_dict
from trainer.errors import EncoderConfigError, ModelInputError

logger = logging.getLogger(__name__)

ENCODER_ARCHS = ("unet", "squeezed")
SQUEEZE_FACTORS = (2, 4)


@dataclass
class EncoderConfig:
    """Architecture of a set of parity encoders (one encoder per parity row of the code).

    `arch` picks the encoder class; base_channels, depth and shared_levels shape only the
    "unet" encoder, squeeze, width, blocks and query_layers only the "squeezed" one (the
    other architecture's fields are kept but ignored). Checkpoints written before `arch`
    existed have none of the squeezed fields and load as "unet".
    """

    in_channels: int
    image_size: list[int]
    k: int
    coefficients: list[list[float]]  # (n-k) x k rows of the coding matrix C
    base_channels: int = 32
    depth: int = 2  # number of stride-2 downsamplings
    shared_levels: int = 2  # levels run per query with shared weights, then averaged over k
    residual: bool = True  # predict a correction to sum_j C[r, j] x_j instead of the image itself
    arch: str = "unet"  # one of ENCODER_ARCHS
    squeeze: int = 4  # squeezed: space-to-depth factor (2 or 4); H and W must be divisible by it
    width: int = 32  # squeezed: channels at H/squeeze x W/squeeze
    blocks: int = 3  # squeezed: residual 3x3 conv blocks after the mix over k
    query_layers: int = 1  # squeezed: per-query layers before the mean over k (1 = the 1x1 lift only)

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
        if self.arch not in ENCODER_ARCHS:
            raise EncoderConfigError(f"arch must be one of {list(ENCODER_ARCHS)}, got {self.arch!r}")
        if self.arch == "unet":
            self._check_unet()
        else:
            self._check_squeezed()

    def _check_unet(self) -> None:
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

    def _check_squeezed(self) -> None:
        if self.squeeze not in SQUEEZE_FACTORS:
            raise EncoderConfigError(f"squeeze must be one of {list(SQUEEZE_FACTORS)}, got {self.squeeze}")
        if any(s % self.squeeze for s in self.image_size):
            raise EncoderConfigError(
                f"image_size {self.image_size} must be divisible by squeeze = {self.squeeze}; lower --squeeze"
            )
        if self.width < 1 or self.query_layers < 1:
            raise EncoderConfigError(
                f"width and query_layers must be >= 1, got {self.width} and {self.query_layers}"
            )
        if self.blocks < 0:
            raise EncoderConfigError(f"blocks must be >= 0, got {self.blocks}")

    @property
    def n(self) -> int:
        return self.k + len(self.coefficients)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        return strict_from_dict(cls, data, EncoderConfigError)


def linear_mix(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j c_j x_j: coefficients (k,), x [B, k, C, H, W] -> [B, C, H, W] (a batched matmul:
    faster than Einsum in ONNX Runtime)."""
    B, k = x.shape[0], x.shape[1]
    coeff = coefficients.to(x.dtype).view(1, 1, k)
    return torch.matmul(coeff, x.reshape(B, k, -1)).reshape(B, *x.shape[2:])


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


class SqueezedEncoder(nn.Module):
    """One parity row, light: x [B, k, C, H, W] -> x_parity [B, C, H, W] (normalised image space).

    s = squeeze, h x w = H/s x W/s, c = C*s*s, d = width, m = sum_j c_j x_j (the linear mix):
    1. per query, shared weights: pixel_unshuffle(x_j) (c, h, w) and a constant channel c_j
       (the coefficient, for invariance to permuting the (query, coefficient) pairs)
       -> 1x1 conv to d + LeakyReLU, then query_layers - 1 x (3x3 conv d->d + LeakyReLU);
    2. mean over k, concat pixel_unshuffle(m) (c channels), 1x1 conv to d;
    3. `blocks` x (h = h + LeakyReLU(3x3 conv d->d (h)));
    4. 1x1 conv to c (zero-initialised), pixel_shuffle to (C, H, W), + m if residual,
       so the untrained encoder with residual=True is exactly the linear mix.
    Step 1 runs as its exact equivalent, cheaper in ONNX Runtime (no per-query transpose or
    concat): an s x s stride-s conv of x_j (`lift`: weight.view(d, c) are the 1x1 weights of
    the unshuffled channels) plus the constant channel's contribution c_j * `lift_coeff` as a
    per-query bias, all k queries in one grouped conv.

    Cost per group in MACs: k*C*H*W (the mix) + k*c*d*h*w (+ (query_layers - 1) * k*9*d^2*h*w)
    that grow with k, then (d + c)*d*h*w + blocks*9*d^2*h*w + d*c*h*w for any k: every layer runs at
    1/s^2 of the image's pixels, and with query_layers = 1 the 3x3 blocks dominate (9*d^2/s^2
    MACs per image pixel each). Defaults (d=32, s=4, 3 blocks) on 1x28x28: 30,416 parameters,
    1.51 M MACs per group at k=2, 1.56 M at k=4, 1.71 M at k=10 (the `--preset cpu` U-Net:
    16 M). Time per group is less flat than the MACs: the per-query input and lift output are
    memory traffic. No BatchNorm: nothing to fold at export; train and eval modes agree.
    """

    def __init__(self, config: EncoderConfig, row: int) -> None:
        super().__init__()
        if not 0 <= row < len(config.coefficients):
            raise EncoderConfigError(f"row must be in [0, {len(config.coefficients)}), got {row}")
        if config.arch != "squeezed":
            raise EncoderConfigError(f"SqueezedEncoder needs arch='squeezed', got {config.arch!r}")
        self.k = config.k
        self.squeeze = s = config.squeeze
        self.residual = config.residual
        self.register_buffer("coefficients", torch.tensor(config.coefficients[row], dtype=torch.float32))
        c, d = config.in_channels * s * s, config.width
        self.lift = nn.Conv2d(config.in_channels, d, s, stride=s)  # = pixel_unshuffle + 1x1 conv c -> d
        bound = 1 / math.sqrt(c + 1)  # PyTorch's default init of a 1x1 conv on c + 1 channels
        nn.init.uniform_(self.lift.weight, -bound, bound)
        nn.init.uniform_(self.lift.bias, -bound, bound)
        self.lift_coeff = nn.Parameter(torch.empty(d).uniform_(-bound, bound))  # weights of the c_j channel
        self.act = nn.LeakyReLU(0.2)
        layers: list[nn.Module] = []
        for _ in range(config.query_layers - 1):
            layers += [nn.Conv2d(d, d, 3, padding=1), nn.LeakyReLU(0.2)]
        self.per_query = nn.Sequential(*layers)
        self.fuse = nn.Conv2d(d + c, d, 1)
        self.blocks = nn.ModuleList([nn.Conv2d(d, d, 3, padding=1) for _ in range(config.blocks)])
        self.head = nn.Conv2d(d, c, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def linear_mix(self, x: torch.Tensor) -> torch.Tensor:
        return linear_mix(self.coefficients, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, C, H, W = x.shape
        k, s = self.k, self.squeeze  # Python ints: the conv's weight shape and groups stay static when traced
        coeff = self.coefficients.to(x.dtype)  # (k,)
        mix = self.linear_mix(x)  # (B, C, H, W)
        # step 1, all queries at once: group j of the conv is query j, with bias b + c_j * lift_coeff
        weight = self.lift.weight.repeat(k, 1, 1, 1)  # (k*d, C, s, s)
        bias = (self.lift.bias + coeff.view(k, 1) * self.lift_coeff).reshape(-1)  # (k*d,)
        feat = self.act(F.conv2d(x.reshape(B, k * C, H, W), weight, bias, stride=s, groups=k))  # (B, k*d, h, w)
        feat = feat.reshape(B * k, -1, H // s, W // s)  # (B*k, d, h, w)
        feat = self.per_query(feat)
        feat = feat.reshape(B, k, *feat.shape[1:]).mean(dim=1)  # (B, d, h, w)
        feat = self.fuse(torch.cat([feat, F.pixel_unshuffle(mix, s)], dim=1))  # (B, d, h, w)
        for conv in self.blocks:
            feat = feat + self.act(conv(feat))
        out = F.pixel_shuffle(self.head(feat), s)  # (B, C, H, W)
        if self.residual:
            out = out + mix
        return out


def make_encoder(config: EncoderConfig, row: int) -> nn.Module:
    """The encoder of parity row `row` of the architecture `config.arch` (the one place choosing it)."""
    cls = {"unet": UNetEncoder, "squeezed": SqueezedEncoder}[config.arch]
    return cls(config, row)


class ParityEncoders(nn.Module):
    """All n-k encoders of a coding scheme: x [B, k, C, H, W] -> [B, n-k, C, H, W].

    `encoders[r]` is the module exported as `encoders/enc_<r>.onnx`.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleList([make_encoder(config, r) for r in range(len(config.coefficients))])

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
