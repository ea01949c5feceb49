"""`python -m trainer ideal-data`: cached ideal-encoding targets t_r = f^-1(sum_j C[r, j] f(x_j)).

For random k-tuples of training inputs (the train part of the classifier's train/val split,
so validation images never leak into encoder training) we push the k images through f,
mix the embeddings with every parity row of the coding matrix C, and invert f by its
fixed-point iteration. The inverse is only approximate, so each target is checked by a
separate forward pass: residual = ||f(t_r) - z_r|| / ||z_r||, z_r = sum_j C[r, j] f(x_j). Groups whose residual
exceeds `max_residual` in any row are dropped, and the fraction dropped is reported.

Output: one .npz with indices (G, k) int64 into the train split, targets (G, n-k, C, H, W)
float32 (normalised image space), residuals (G, n-k) float32, coefficients, f_hash, dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import flags
from trainer.errors import IdealDataError

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"groups": 50_000},
    "cpu": {"groups": 6_000},
}


@dataclass
class IdealDataConfig:
    classifier: str
    out: str
    n: int
    k: int
    scheme: str = "auto"  # auto | average | paper | design (see coding_matrix)
    groups: int = 50_000
    batch_size: int = 256
    inverse_tol: float = 1e-5
    inverse_max_iter: int = 100
    max_residual: float = 1e-3
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    data_dir: str | None = None
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        if self.k < 1 or self.n <= self.k:
            raise IdealDataError(f"need n > k >= 1, got n={self.n}, k={self.k}")
        if self.scheme not in ("auto", "average", "paper", "design"):
            raise IdealDataError(f"scheme must be auto, average, paper or design, got {self.scheme!r}")
        for name in ("groups", "batch_size", "inverse_max_iter"):
            if getattr(self, name) < 1:
                raise IdealDataError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_residual <= 0 or self.inverse_tol <= 0:
            raise IdealDataError("max_residual and inverse_tol must be > 0")


def coding_matrix(n: int, k: int, scheme: str = "auto") -> np.ndarray:
    """The (n-k) x k parity coefficients C of the coding scheme used for (n, k).

    auto: the paper's average code (c = 1/k) for one parity, the paper's (4,2) code for
    (4, 2), else `CodingScheme.design(n, k)`.
    """
    from kernels.coding import CodingScheme

    if scheme == "auto":
        scheme = "average" if n == k + 1 else ("paper" if (n, k) == (4, 2) else "design")
    if scheme == "average":
        if n != k + 1:
            raise IdealDataError(f"the average code has one parity row (n = k + 1), got n={n}, k={k}")
        code = CodingScheme.average(k)
    elif scheme == "paper":
        if (n, k) != (4, 2):
            raise IdealDataError(f"the paper's explicit code is (4, 2), got ({n}, {k}); use design")
        code = CodingScheme.paper_4_2()
    else:
        code = CodingScheme.design(n, k)
    coeffs = np.array(code.coefficients, dtype=np.float64).reshape(n - k, k)  # writable copy
    return coeffs


def inverse_residual(f: nn.Module, x: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """Per-sample relative residual ||f(x) - z|| / ||z|| (as InverseReport): [B, ...] -> [B]."""
    err = (f(x) - z_target).flatten(1).norm(dim=1)
    return err / z_target.flatten(1).norm(dim=1).clamp_min(1e-12)


@torch.no_grad()
def ideal_targets(
    f: nn.Module,
    groups_x: torch.Tensor,
    coefficients: torch.Tensor,
    inverse_tol: float,
    inverse_max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """groups_x [G, k, C, H, W] -> (targets [G, n-k, C, H, W], residuals [G, n-k]).

    `coefficients` is C, (n-k, k); f must be in eval mode (a fixed function).
    """
    G, k, C, H, W = groups_x.shape
    z = f(groups_x.reshape(G * k, C, H, W))  # (G*k, *emb)
    emb_shape = z.shape[1:]
    z_par = torch.einsum("rk,gkd->grd", coefficients.to(z.dtype), z.reshape(G, k, -1))  # (G, n-k, D)
    R = coefficients.shape[0]
    z_par_flat = z_par.reshape(G * R, *emb_shape)  # (G*R, *emb)
    # unconverged samples are kept here and filtered by their own residual afterwards
    targets, _ = f.inverse(z_par_flat, tol=inverse_tol, max_iter=inverse_max_iter, raise_on_failure=False)
    residual = inverse_residual(f, targets, z_par_flat)  # (G*R,)
    return targets.reshape(G, R, C, H, W), residual.reshape(G, R)


def sample_groups(rng: np.random.Generator, pool: np.ndarray, groups: int, k: int) -> np.ndarray:
    """`groups` rows of k distinct entries of `pool`: (groups, k) int64."""
    if len(pool) < k:
        raise IdealDataError(f"need at least k={k} images to form a group, the pool has {len(pool)}")
    picks = rng.integers(0, len(pool), size=(groups, k))
    for _ in range(1000):  # redraw rows holding a repeated image; a few rounds suffice
        sorted_picks = np.sort(picks, axis=1)
        bad = np.any(sorted_picks[:, 1:] == sorted_picks[:, :-1], axis=1)
        if not bad.any():
            break
        picks[bad] = rng.integers(0, len(pool), size=(int(bad.sum()), k))
    else:
        raise IdealDataError(f"could not draw {k} distinct images from a pool of {len(pool)}")
    return np.asarray(pool, dtype=np.int64)[picks]


def build_ideal_data(
    f: nn.Module,
    images: torch.Tensor,
    pool: np.ndarray,
    coefficients: np.ndarray,
    groups: int,
    batch_size: int,
    inverse_tol: float,
    inverse_max_iter: int,
    max_residual: float,
    seed: int,
    progress: bool = False,
) -> dict[str, np.ndarray | float]:
    """Sample `groups` k-tuples from `pool` (indices into normalised `images` [N, C, H, W]).

    Returns indices, targets, residuals of the kept (converged) groups and `dropped_fraction`.
    """
    R, k = coefficients.shape
    rng = np.random.default_rng(seed)
    indices = sample_groups(rng, pool, groups, k)  # (G, k)
    coeff_t = torch.as_tensor(coefficients, dtype=torch.float32)
    targets, residuals = [], []
    starts = range(0, groups, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="ideal targets", unit="batch")
    for start in starts:
        idx = torch.as_tensor(indices[start : start + batch_size])  # (b, k)
        t, r = ideal_targets(f, images[idx], coeff_t, inverse_tol, inverse_max_iter)
        targets.append(t.numpy())
        residuals.append(r.numpy())
    all_targets = np.concatenate(targets).astype(np.float32)  # (G, R, C, H, W)
    all_res = np.concatenate(residuals).astype(np.float32)  # (G, R)
    keep = np.all(np.isfinite(all_res) & (all_res <= max_residual), axis=1)  # (G,)
    dropped = 1.0 - float(keep.mean())
    return {
        "indices": indices[keep].astype(np.int64),
        "targets": all_targets[keep],
        "residuals": all_res[keep],
        "dropped_fraction": dropped,
        "residual_max_all": float(np.nanmax(all_res)) if np.isfinite(all_res).any() else float("inf"),
    }


def load_ideal_data(path: str | Path, f_hash: str | None = None) -> dict[str, Any]:
    """Read a cache; if `f_hash` is given it must match the f the cache was built with."""
    path = Path(path)
    if not path.is_file():
        raise IdealDataError(f"ideal-data cache {str(path)!r} not found; build it with `python -m trainer ideal-data`")
    with np.load(path, allow_pickle=False) as npz:
        data = {name: npz[name] for name in npz.files}
    meta = json.loads(str(data.pop("meta_json")))
    if f_hash is not None and meta["f_hash"] != f_hash:
        raise IdealDataError(
            f"{str(path)!r} was built against f_hash {meta['f_hash'][:12]}…, but the classifier has "
            f"{f_hash[:12]}…; rebuild it with `python -m trainer ideal-data --classifier ...`"
        )
    data["meta"] = meta
    return data


def run(config: IdealDataConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Build the cache for `config` and write it; returns its metadata."""
    from trainer.checkpoint import load_classifier
    from trainer.data import get_spec, load_split, normalize, train_val_split

    if config.threads:
        torch.set_num_threads(config.threads)
    model, ckpt = load_classifier(config.classifier)
    f = model.f.eval()
    dataset = ckpt["dataset"]
    images_u8, _ = load_split(dataset, "train", config.data_dir)
    train_idx, _ = train_val_split(len(images_u8), config.val_fraction, config.split_seed)
    images = torch.from_numpy(normalize(images_u8, get_spec(dataset)))  # (N, C, H, W)
    coeffs = coding_matrix(config.n, config.k, config.scheme)
    t0 = time.perf_counter()
    data = build_ideal_data(
        f, images, train_idx, coeffs, config.groups, config.batch_size, config.inverse_tol,
        config.inverse_max_iter, config.max_residual, config.seed, progress=True,
    )
    elapsed_s = time.perf_counter() - t0
    meta = {
        "f_hash": ckpt["f_hash"],
        "dataset": dataset,
        "n": config.n,
        "k": config.k,
        "coefficients": coeffs.tolist(),
        "config": dataclasses.asdict(config),
        "groups_requested": config.groups,
        "groups_kept": int(len(data["indices"])),
        "dropped_fraction": data["dropped_fraction"],
        "residual_max_all": data["residual_max_all"],
        "elapsed_s": elapsed_s,
        "command": command or [],
    }
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out, indices=data["indices"], targets=data["targets"], residuals=data["residuals"],
        coefficients=coeffs, meta_json=np.array(json.dumps(meta)),
    )
    logger.info(
        "ideal data %s: kept %d / %d groups (dropped %.2f %%), %.1f s",
        out, meta["groups_kept"], config.groups, 100 * meta["dropped_fraction"], elapsed_s,
    )
    return meta


def _parser() -> argparse.ArgumentParser:
    p = flags.command_parser("ideal-data", __doc__)
    p.add_argument("--classifier", required=True, help="classifier checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output .npz (under runs/)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    return flags.add_preset_flags(p, IdealDataConfig, PRESETS, skip=("classifier", "out", "n", "k"))


def config_from_args(args: argparse.Namespace) -> IdealDataConfig:
    return flags.config_from_args(IdealDataConfig, PRESETS, args)


def main(argv: list[str] | None = None) -> int:
    keys = ("groups_kept", "dropped_fraction", "residual_max_all", "elapsed_s")
    return flags.run_command("ideal-data", argv, _parser(), config_from_args, run,
                             lambda meta: {key: meta[key] for key in keys})
