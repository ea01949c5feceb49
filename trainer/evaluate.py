"""`python -m trainer evaluate CKPT --out JSON`: accuracy per head and inverse convergence.

Inverse checks run on test embeddings z = f(x) and on the off-manifold averages
sum_j f(x_j) / k (k = 2, 4, 10 by default), which are exactly the points whose preimages
Coded-InvNet's encoders are trained to produce.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kernels.configs import add_dataclass_flags, dataclass_values
from trainer import flags
from trainer.data import DatasetSpec, get_spec, load_split, normalize
from trainer.errors import EvaluateError

logger = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(
    model, images_uint8: np.ndarray, labels: np.ndarray, spec: DatasetSpec, batch_size: int = 500
) -> dict[str, float]:
    """Fraction correct per head over the given examples (model switched to eval, restored)."""
    was_training = model.training
    model.eval()
    correct: dict[str, int] = {}
    try:
        for start in range(0, len(labels), batch_size):
            x = torch.from_numpy(normalize(images_uint8[start : start + batch_size], spec))
            y = torch.from_numpy(labels[start : start + batch_size])
            task_labels = model.task_labels(y)
            for task, logits in model(x).items():
                hits = int((logits.argmax(dim=1) == task_labels[task]).sum())
                correct[task] = correct.get(task, 0) + hits
    finally:
        model.train(was_training)
    return {task: c / max(len(labels), 1) for task, c in correct.items()}


def _inverse_stats(f, z: torch.Tensor, tol: float, max_iter: int, batch_size: int) -> dict:
    iters, per_block, residuals, converged = [], None, [], True
    t0 = time.perf_counter()
    xs = []
    for start in range(0, z.shape[0], batch_size):
        x_hat, rep = f.inverse(z[start : start + batch_size], tol, max_iter,
                               raise_on_failure=False)
        xs.append(x_hat)
        iters.append(rep.iterations)
        per_block = (rep.iterations_per_block if per_block is None
                     else [max(a, b) for a, b in zip(per_block, rep.iterations_per_block, strict=True)])
        residuals.append(rep.max_rel_residual)
        converged &= rep.converged
    wall_s = time.perf_counter() - t0
    return {
        "samples": int(z.shape[0]),
        "max_iterations": max(iters),
        "max_iterations_per_block": per_block,
        "max_rel_residual": max(residuals),
        "converged": bool(converged),
        "wall_time_s": round(wall_s, 3),
        "ms_per_sample": round(1e3 * wall_s / z.shape[0], 3),
        "_x_hat": torch.cat(xs),
    }


@dataclass
class EvalConfig:
    checkpoint: str
    out: str | None = None
    samples: int = 256
    ks: tuple[int, ...] = (2, 4, 10)
    tol: float = 1e-5
    max_iter: int = 50
    seed: int = 0
    threads: int = 2
    data_dir: str | None = None

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if self.samples < 1 or min(self.ks, default=2) < 2:
            raise EvaluateError(f"need --samples >= 1 and every k >= 2, got {self.samples}, {self.ks}")
        if self.tol <= 0 or self.max_iter < 1:
            raise EvaluateError(f"need --tol > 0 and --max-iter >= 1, got {self.tol}, {self.max_iter}")


def evaluate(cfg: EvalConfig, command: list[str] | None = None) -> dict:
    """Accuracy per head and inverse convergence of `cfg.checkpoint`; written to `cfg.out` if set."""
    from trainer.checkpoint import load_classifier

    torch.set_num_threads(cfg.threads)
    model, ckpt = load_classifier(cfg.checkpoint)
    spec = get_spec(ckpt["dataset"])
    images, labels = load_split(ckpt["dataset"], "test", cfg.data_dir)

    t0 = time.perf_counter()
    acc = accuracy(model, images, labels, spec)
    acc_wall_s = time.perf_counter() - t0

    rng = np.random.default_rng(cfg.seed)
    f = model.f.eval()
    idx = rng.choice(len(labels), size=cfg.samples, replace=False)
    x = torch.from_numpy(normalize(images[idx], spec))  # (S, C, H, W)
    with torch.no_grad():
        t0 = time.perf_counter()
        z = f(x)  # (S, *embedding_shape)
        fwd_ms = 1e3 * (time.perf_counter() - t0) / cfg.samples
    on = _inverse_stats(f, z, cfg.tol, cfg.max_iter, 64)
    x_hat = on.pop("_x_hat")
    on["max_rel_reconstruction_error"] = float(
        ((x_hat - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max()
    )
    off = {}
    for k in cfg.ks:
        groups = np.stack([rng.choice(len(labels), size=k, replace=False)
                           for _ in range(cfg.samples)])  # (S, k)
        xg = torch.from_numpy(normalize(images[groups.reshape(-1)], spec))  # (S*k, C, H, W)
        with torch.no_grad():
            zg = f(xg).reshape(cfg.samples, k, *f.config.embedding_shape).mean(dim=1)
        stats = _inverse_stats(f, zg, cfg.tol, cfg.max_iter, 64)
        stats.pop("_x_hat")
        off[f"k={k}"] = stats
    result = {
        "command": list(command or []),
        "checkpoint": str(cfg.checkpoint),
        "dataset": ckpt["dataset"],
        "f_hash": ckpt["f_hash"],
        "git_commit": ckpt["git_commit"],
        "test_examples": int(len(labels)),
        "test_accuracy": acc,
        "accuracy_wall_time_s": round(acc_wall_s, 2),
        "f_forward_ms_per_sample": round(fwd_ms, 3),
        "inverse_tol": cfg.tol,
        "inverse_max_iter": cfg.max_iter,
        "inverse_test_embeddings": on,
        "inverse_averaged_embeddings": off,
        "lipschitz_bounds": [round(b, 4) for b in f.lipschitz_bounds(100)],
        "train_metrics": {k: v for k, v in ckpt["metrics"].items() if k != "history"},
        "train_history": ckpt["metrics"].get("history", []),
        "model_config": ckpt["model_config"],
        "eval_config": {**asdict(EvalConfig(**asdict(cfg))), "ks": list(cfg.ks)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
        logger.info("wrote %s", cfg.out)
    return result


def _summary(result: dict) -> dict:
    keys = ("max_iterations", "max_rel_residual", "converged")
    return {
        "test_accuracy": result["test_accuracy"],
        "inverse_test": {k: result["inverse_test_embeddings"][k] for k in keys},
        "inverse_avg": {name: {k: v[k] for k in keys} for name, v in result["inverse_averaged_embeddings"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = flags.command_parser("evaluate", __doc__)
    p.add_argument("checkpoint", help="classifier checkpoint (classifier.pt)")
    add_dataclass_flags(p, EvalConfig, skip=("checkpoint",), helps={"out": "write the JSON report here"},
                        unset_defaults=True)
    return flags.run_command("evaluate", argv, p, lambda args: EvalConfig(**dataclass_values(EvalConfig, vars(args))),
                             evaluate, _summary)
