"""`python -m trainer encoder`: train the Coded-InvNet parity encoders against a fixed f, g.

Pix2Pix recipe (paper §4.1): LSGAN with a PixelGAN (1x1) discriminator conditioned on the
linear mix sum_j C[r, j] x_j, plus l1_weight * |Enc_r(x) - t_r| to the cached ideal target
t_r = f^-1(sum_j C[r, j] f(x_j)). Two optional losses:
- latent: |f(Enc_r(x)) - sum_j C[r, j] f(x_j)|, the error the decoder actually sees;
- distill: cross-entropy of g(decoded embedding) against softmax(g(f(x_a))) for a random
  erasure set, i.e. the degraded-mode prediction itself.
f and g stay frozen (eval mode, no gradients into their weights).

Notation: B groups, k queries, R = n - k parity rows, C x H x W image, D = numel(f(x)).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import flags
from trainer.best import BestWeights
from trainer.checkpoint import ENCODER_SCHEMA, load_classifier, save_checkpoint
from trainer.coded_eval import decode_embeddings, erasure_patterns, evaluate_coded, make_groups
from trainer.data import get_spec, load_split, normalize, train_val_split
from trainer.errors import EncoderTrainError
from trainer.ideal_data import load_ideal_data
from trainer.models.encoder import (
    ENCODER_ARCHS,
    SQUEEZE_FACTORS,
    DiscriminatorConfig,
    EncoderConfig,
    ParityEncoders,
    PixelDiscriminator,
)

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"steps": 20_000},
    # sized for a shared, loaded 2-core CPU: ~4-5 s per step at k = 4 with one thread there
    "cpu": {"steps": 250, "batch_size": 32, "d_steps": 1, "base_channels": 16, "shared_levels": 1,
            "eval_every": 125, "val_groups": 500, "threads": 1},
}


@dataclass
class EncoderTrainConfig:
    classifier: str
    ideal_data: str
    out: str
    steps: int = 20_000  # generator steps
    batch_size: int = 64
    lr: float = 2e-4
    # cosine decay of both learning rates to lr * lr_final_factor at the last step; 1 = constant
    lr_final_factor: float = 1.0
    beta1: float = 0.0
    beta2: float = 0.9
    d_steps: int = 5  # discriminator steps per generator step
    gan_weight: float = 1.0
    l1_weight: float = 100.0
    latent_weight: float = 10.0
    distill_weight: float = 1.0
    arch: str = "unet"  # "unet" or "squeezed" (trainer.models.encoder.SqueezedEncoder)
    base_channels: int = 32  # unet only
    depth: int = 2  # unet only
    shared_levels: int = 2  # unet only
    squeeze: int = 4  # squeezed only: space-to-depth factor, 2 or 4
    width: int = 32  # squeezed only: channels at 1/squeeze resolution
    blocks: int = 3  # squeezed only: residual 3x3 conv blocks after the mean over k
    query_layers: int = 1  # squeezed only: per-query layers before the mean (1 = 1x1 lift only)
    disc_width: int = 64
    eval_every: int = 1000
    val_groups: int = 1000
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    threads: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "val_groups", "base_channels", "depth", "disc_width",
                     "width", "query_layers"):
            if getattr(self, name) < 1:
                raise EncoderTrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.arch not in ENCODER_ARCHS:
            raise EncoderTrainError(f"arch must be one of {list(ENCODER_ARCHS)}, got {self.arch!r}")
        if self.squeeze not in SQUEEZE_FACTORS:
            raise EncoderTrainError(f"squeeze must be one of {list(SQUEEZE_FACTORS)}, got {self.squeeze}")
        if self.blocks < 0:
            raise EncoderTrainError(f"blocks must be >= 0, got {self.blocks}")
        if self.d_steps < 0:
            raise EncoderTrainError(f"d_steps must be >= 0, got {self.d_steps}")
        for name in ("gan_weight", "l1_weight", "latent_weight", "distill_weight"):
            if getattr(self, name) < 0:
                raise EncoderTrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.lr > 0):
            raise EncoderTrainError(f"need lr > 0 and betas in [0, 1), got {self.lr}, {self.beta1}, {self.beta2}")
        if not 0 < self.lr_final_factor <= 1:
            raise EncoderTrainError(f"lr_final_factor must be in (0, 1], got {self.lr_final_factor}")


def cosine_factor(step: int, steps: int, final: float) -> float:
    """Learning-rate multiplier after `step` of `steps`: 1 at the start, `final` at the end."""
    progress = min(step, steps) / steps
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def _soft_xent(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train(config: EncoderTrainConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate on validation groups, save the checkpoint; returns its metrics."""
    from tqdm import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model, ckpt = load_classifier(config.classifier)
    f_hash = ckpt["f_hash"]
    f = model.f.folded().eval().requires_grad_(False)  # plain convs: same function, cheaper
    head = model.heads[model.primary_task].eval().requires_grad_(False)
    cache = load_ideal_data(config.ideal_data, f_hash=f_hash)
    meta = cache["meta"]
    n, k = int(meta["n"]), int(meta["k"])
    coeffs = torch.tensor(meta["coefficients"], dtype=torch.float32)  # (R, k)
    R = n - k
    dataset = ckpt["dataset"]
    spec = get_spec(dataset)
    images_u8, labels_np = load_split(dataset, "train", config.data_dir)
    images = torch.from_numpy(normalize(images_u8, spec))  # (N, C, H, W)
    labels = torch.from_numpy(labels_np)
    _, val_idx = train_val_split(len(images), config.val_fraction, config.split_seed)
    if np.intersect1d(cache["indices"].ravel(), val_idx).size:
        raise EncoderTrainError(
            "the ideal-data cache uses validation images; rebuild it with the same --val-fraction/--split-seed"
        )
    val_groups = val_idx[make_groups(len(val_idx), k, config.val_groups, config.seed + 1)]  # (G, k)
    group_idx = torch.from_numpy(cache["indices"])  # (G_train, k)
    targets = torch.from_numpy(cache["targets"])  # (G_train, R, C, H, W)
    C_img, H, W = spec.image_shape

    enc_config = EncoderConfig(
        in_channels=C_img, image_size=[H, W], k=k, coefficients=coeffs.tolist(),
        base_channels=config.base_channels, depth=config.depth, shared_levels=config.shared_levels,
        arch=config.arch, squeeze=config.squeeze, width=config.width, blocks=config.blocks,
        query_layers=config.query_layers,
    )
    encoders = ParityEncoders(enc_config)
    discs = nn.ModuleList([PixelDiscriminator(DiscriminatorConfig(C_img, config.disc_width)) for _ in range(R)])
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(encoders.parameters(), lr=config.lr, betas=betas)
    opt_d = torch.optim.Adam(discs.parameters(), lr=config.lr, betas=betas)
    lr_factor = functools.partial(cosine_factor, steps=config.steps, final=config.lr_final_factor)
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) for opt in (opt_g, opt_d)]
    patterns = erasure_patterns(n, k)
    logger.info("%s encoder (%d,%d) on %s: %d cached groups, %d val groups, f_hash %s…, %d params",
                config.arch, n, k, dataset, len(group_idx), len(val_groups), f_hash[:12],
                sum(p.numel() for p in encoders.parameters()))

    need_z = config.latent_weight > 0 or config.distill_weight > 0
    if need_z:
        # f(x) of every cached training image, once: the latent and distillation targets
        # then cost a gather instead of k forward passes per group and step
        used = np.unique(cache["indices"])
        with torch.no_grad():
            z_used = torch.cat([f(images[torch.from_numpy(used[i : i + 500])]) for i in range(0, len(used), 500)])
        emb = z_used.shape[1:]
        z_all = torch.zeros(len(images), z_used[0].numel())  # (N, D); rows outside `used` stay unused
        z_all[torch.from_numpy(used)] = z_used.flatten(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pick = torch.from_numpy(rng.integers(0, len(group_idx), config.batch_size))
        x = images[group_idx[pick]]  # (B, k, C, H, W)
        cond = torch.einsum("rk,bkchw->brchw", coeffs, x)  # (B, R, C, H, W)
        return x, targets[pick], cond, group_idx[pick]

    def d_step(real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor) -> None:
        loss = real.new_zeros(())
        for r, disc in enumerate(discs):  # LSGAN: real -> 1, fake -> 0
            real_term = (disc(cond[:, r], real[:, r]) - 1).pow(2).mean()
            loss = loss + 0.5 * (real_term + disc(cond[:, r], fake[:, r]).pow(2).mean())
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()

    history: list[dict[str, float]] = []
    # GAN training on a small budget is noisy (a k=10 run fell from 71 % to 53 % between its
    # two evaluations), so the checkpoint keeps the weights of the best *validation* score.
    best = BestWeights()
    t0 = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=f"encoder ({n},{k})", unit="step", mininterval=5)
    for step in bar:
        encoders.train()
        x, t, cond, gidx = batch()
        fake = encoders(x)  # (B, R, C, H, W)
        if config.gan_weight > 0 and config.d_steps > 0:
            # pix2pix order: D sees this step's fake (detached); extra D steps draw fresh groups
            d_step(t, fake.detach(), cond)
            for _ in range(config.d_steps - 1):
                x2, t2, cond2, _ = batch()
                with torch.no_grad():
                    fake2 = encoders(x2)
                d_step(t2, fake2, cond2)
        terms: dict[str, torch.Tensor] = {"l1": F.l1_loss(fake, t)}
        if config.gan_weight > 0:
            terms["gan"] = sum(0.5 * (d(cond[:, r], fake[:, r]) - 1).pow(2).mean() for r, d in enumerate(discs))
        if need_z:
            B = x.shape[0]
            z = z_all[gidx]  # (B, k, D)
            z_par = f(fake.flatten(0, 1)).reshape(B, R, -1)  # (B, R, D)
            if config.latent_weight > 0:
                terms["latent"] = F.l1_loss(z_par, torch.einsum("rk,bkd->brd", coeffs, z))
            if config.distill_weight > 0:
                pattern = patterns[int(rng.integers(len(patterns)))]
                missing, z_hat = decode_embeddings(coeffs, z, z_par, pattern)  # (B, e, D)
                with torch.no_grad():
                    target_logits = head(z[:, missing].reshape(-1, *emb))
                terms["distill"] = _soft_xent(head(z_hat.reshape(-1, *emb)), target_logits)
        weights = {"l1": config.l1_weight, "gan": config.gan_weight, "latent": config.latent_weight,
                   "distill": config.distill_weight}
        loss = sum(weights[name] * value for name, value in terms.items())
        if not torch.isfinite(loss):
            values = {name: float(v.detach()) for name, v in terms.items()}
            raise EncoderTrainError(f"non-finite generator loss at step {step}: {values}; lower --lr")
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        for sched in scheds:
            sched.step()
        if step % 50 == 0:
            bar.set_postfix({name: f"{float(v.detach()):.3g}" for name, v in terms.items()})
        if step % config.eval_every == 0 or step == config.steps:
            res = evaluate_coded(f, head, encoders, images, labels, val_groups)
            history.append({"step": step, "val_acc_labels": res.acc_labels, "val_acc_base": res.acc_base,
                            "elapsed_s": time.perf_counter() - t0,
                            **{f"loss_{name}": float(v.detach()) for name, v in terms.items()}})
            logger.info("step %d: val degraded acc %.4f (labels) %.4f (base)", step, res.acc_labels, res.acc_base)
            best.update(res.acc_labels, encoders, step=step, val_acc_base=res.acc_base)
    train_time_s = time.perf_counter() - t0
    metrics = {
        "val_acc_labels": best.score,
        "val_acc_base": best.info["val_acc_base"],
        "best_step": best.info["step"],
        "final_val_acc_labels": history[-1]["val_acc_labels"],
        "val_groups": len(val_groups),
        "train_time_s": train_time_s,
        "train_groups": len(group_idx),
        "ideal_dropped_fraction": meta["dropped_fraction"],
        "threads": torch.get_num_threads(),
        "history": history,
    }
    coding = {"n": n, "k": k, "coefficients": coeffs.tolist()}
    save_checkpoint(
        config.out,
        schema=ENCODER_SCHEMA,
        model_config=enc_config.to_dict(),
        state_dict=best.state_dict,
        train_config=dataclasses.asdict(config),
        metrics=metrics,
        dataset=dataset,
        command=command,
        extra={"f_hash": f_hash, "coding": coding},
    )
    logger.info("saved %s (%.0f s)", config.out, train_time_s)
    return metrics


def _parser() -> argparse.ArgumentParser:
    p = flags.command_parser("encoder", __doc__)
    p.add_argument("--classifier", required=True, help="classifier checkpoint (.pt)")
    p.add_argument("--ideal-data", required=True, help="cache from `python -m trainer ideal-data`")
    p.add_argument("--out", required=True, help="encoder checkpoint to write (under runs/)")
    return flags.add_preset_flags(p, EncoderTrainConfig, PRESETS, skip=("classifier", "ideal_data", "out"),
                                  choices={"arch": ENCODER_ARCHS, "squeeze": SQUEEZE_FACTORS})


def config_from_args(args: argparse.Namespace) -> EncoderTrainConfig:
    return flags.config_from_args(EncoderTrainConfig, PRESETS, args)


def main(argv: list[str] | None = None) -> int:
    return flags.run_command("encoder", argv, _parser(), config_from_args, train)
