"""`python -m trainer parm`: train the ParM parity-model baseline against a fixed base classifier.

The parity model (trainer.models.parm) sees the k queries of a group and is regressed (MSE)
onto sum_j logits(x_j) of the base model's primary head. With one erasure the decoder
subtracts the k-1 available logits. ParM has a single parity, so it handles n = k + 1 only.

Notation: B groups, k queries, C x H x W image, K classes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer import flags
from trainer.checkpoint import PARM_SCHEMA, load_classifier, save_checkpoint
from trainer.coded_eval import evaluate_parm, make_groups
from trainer.data import get_spec, load_split, normalize, train_val_split
from trainer.errors import ParMTrainError
from trainer.models import Classifier, ClassifierConfig, primary_logits_fn
from trainer.models.parm import INPUT_MODES, ParityModel, ParMConfig

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"steps": 20_000},
    "cpu": {"steps": 250, "batch_size": 32, "eval_every": 125, "val_groups": 500, "threads": 1},
}


@dataclass
class ParMTrainConfig:
    classifier: str
    out: str
    k: int
    input_mode: str = "mean"
    init: str = "base"  # base: start from the base model's weights; scratch: fresh weights
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 1e-3
    eval_every: int = 1000
    val_groups: int = 1000
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    threads: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ParMTrainError(f"k must be >= 2 (one parity for k queries), got {self.k}")
        if self.input_mode not in INPUT_MODES:
            raise ParMTrainError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.init not in ("base", "scratch"):
            raise ParMTrainError(f"init must be 'base' or 'scratch', got {self.init!r}")
        for name in ("steps", "batch_size", "eval_every", "val_groups"):
            if getattr(self, name) < 1:
                raise ParMTrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ParMTrainError(f"lr must be > 0, got {self.lr}")


def train(config: ParMTrainConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Train against the classifier's primary head, save the checkpoint; returns its metrics."""
    from tqdm import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model, ckpt = load_classifier(config.classifier)
    model.eval()
    base = primary_logits_fn(model)
    dataset = ckpt["dataset"]
    images_u8, labels_np = load_split(dataset, "train", config.data_dir)
    images = torch.from_numpy(normalize(images_u8, get_spec(dataset)))  # (N, C, H, W)
    labels = torch.from_numpy(labels_np)
    train_idx, val_idx = train_val_split(len(images), config.val_fraction, config.split_seed)
    val_groups = val_idx[make_groups(len(val_idx), config.k, config.val_groups, config.seed + 1)]

    parm_config = ParMConfig(k=config.k, classifier=model.config.to_dict(), input_mode=config.input_mode)
    body = Classifier(ClassifierConfig.from_dict(parm_config.classifier))
    if config.init == "base":
        body.load_state_dict(copy.deepcopy(model.state_dict()))
    parm = ParityModel(parm_config, body)
    opt = torch.optim.Adam(parm.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    logger.info("ParM k=%d on %s (init %s), %d val groups", config.k, dataset, config.init, len(val_groups))

    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=f"parm k={config.k}", unit="step", mininterval=5)
    for step in bar:
        parm.train()
        pick = torch.from_numpy(train_idx[rng.integers(0, len(train_idx), (config.batch_size, config.k))])
        x = images[pick]  # (B, k, C, H, W)
        with torch.no_grad():
            target = base(x.flatten(0, 1)).reshape(config.batch_size, config.k, -1).sum(1)  # (B, K)
        loss = F.mse_loss(parm(x), target)
        if not torch.isfinite(loss):
            raise ParMTrainError(f"non-finite ParM loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{float(loss.detach()):.3g}")
        if step % config.eval_every == 0 or step == config.steps:
            res = evaluate_parm(base, parm, images, labels, val_groups)
            history.append({"step": step, "loss_mse": float(loss.detach()), "val_acc_labels": res["acc_labels"],
                            "val_acc_base": res["acc_base"], "elapsed_s": time.perf_counter() - t0})
            logger.info("step %d: val degraded acc %.4f (labels) %.4f (base)", step, res["acc_labels"], res["acc_base"])
    train_time_s = time.perf_counter() - t0
    metrics = {"val_acc_labels": history[-1]["val_acc_labels"], "val_acc_base": history[-1]["val_acc_base"],
               "val_groups": len(val_groups), "train_time_s": train_time_s, "threads": torch.get_num_threads(),
               "history": history}
    parm.eval()
    if hasattr(parm.f, "refine_spectral"):
        parm.f.refine_spectral()
    save_checkpoint(
        config.out,
        schema=PARM_SCHEMA,
        model_config=parm_config.to_dict(),
        state_dict=parm.state_dict(),
        train_config=dataclasses.asdict(config),
        metrics=metrics,
        dataset=dataset,
        command=command,
        extra={"f_hash": ckpt["f_hash"]},
    )
    logger.info("saved %s (%.0f s)", config.out, train_time_s)
    return metrics


def _parser() -> argparse.ArgumentParser:
    p = flags.command_parser("parm", __doc__)
    p.add_argument("--classifier", required=True, help="base classifier checkpoint (.pt)")
    p.add_argument("--out", required=True, help="ParM checkpoint to write (under runs/)")
    p.add_argument("--k", type=int, required=True, help="queries per parity (n = k + 1)")
    return flags.add_preset_flags(p, ParMTrainConfig, PRESETS, skip=("classifier", "out", "k"))


def config_from_args(args: argparse.Namespace) -> ParMTrainConfig:
    return flags.config_from_args(ParMTrainConfig, PRESETS, args)


def main(argv: list[str] | None = None) -> int:
    return flags.run_command("parm", argv, _parser(), config_from_args, train)
