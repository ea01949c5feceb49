"""`python -m experiments classifiers`: compare trained classifiers (f + g) side by side.

For each classifier checkpoint: the f it trained (blocks, widths), the flags that shaped it
(epochs, Mixup alpha, augmentation, threads), test accuracy and training wall time as the
trainer recorded them, plus accuracy on a fixed sample of the *training* split measured
here. Train vs test tells whether a recipe underfits (both low: more capacity, less
regularisation) or overfits (a gap: augmentation), which is how the cpu presets were chosen.

Writes classifiers.json and classifiers.md into --out-dir (default experiments/results/; the
markdown is rendered from the JSON only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from experiments.errors import ClassifiersError, ExperimentError
from kernels.configs import add_dataclass_flags, dataclass_values

logger = logging.getLogger(__name__)

@dataclass
class ClassifiersConfig:
    checkpoints: tuple[str, ...] = ()
    train_samples: int = 6000  # training examples scored per checkpoint (0 = skip)
    out_dir: str = "experiments/results"
    name: str = "classifiers"  # output file stem
    data_dir: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ClassifiersError("give at least one classifier checkpoint")
        if self.train_samples < 0:
            raise ClassifiersError(f"--train-samples must be >= 0, got {self.train_samples}")
        if self.threads < 1:
            raise ClassifiersError(f"--threads must be >= 1, got {self.threads}")


def train_split_accuracy(model, ckpt: dict, samples: int, data_dir: str | None) -> dict[str, float]:
    """Accuracy on the first `samples` examples of the train part of the checkpoint's own split."""
    from trainer.data import get_spec, load_split, train_val_split
    from trainer.evaluate import accuracy

    cfg = ckpt["train_config"]
    images, labels = load_split(ckpt["dataset"], "train", data_dir or cfg.get("data_dir"))
    train_idx, _ = train_val_split(len(labels), cfg["val_fraction"], cfg["seed"])
    idx = np.sort(train_idx)[:samples]
    return accuracy(model, images[idx], labels[idx], get_spec(ckpt["dataset"]))


def summarize(path: str, train_samples: int, data_dir: str | None) -> dict:
    """The recipe, timings and accuracies of one finished classifier checkpoint."""
    from trainer.checkpoint import load_classifier
    from trainer.errors import CheckpointError

    try:
        model, ckpt = load_classifier(path)
    except (CheckpointError, OSError) as exc:
        raise ClassifiersError(str(exc)) from exc
    f_cfg, cfg, metrics = ckpt["model_config"]["f"], ckpt["train_config"], ckpt["metrics"]
    if not metrics.get("final"):
        raise ClassifiersError(f"{path}: training has not finished (metrics are not final)")
    record = {
        "checkpoint": path,
        "dataset": ckpt["dataset"],
        "f_hash": ckpt["f_hash"],
        "blocks_per_stage": f_cfg["blocks_per_stage"],
        "hidden_channels": f_cfg["hidden_channels"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "preset": cfg["preset"],
        "epochs": cfg["epochs"],
        "lr": cfg["lr"],
        "mixup_alpha": cfg["mixup_alpha"],
        "augment_shift": cfg.get("augment_shift", 0),
        "threads": cfg["threads"],
        "seed": cfg["seed"],
        "train_wall_time_s": metrics["train_wall_time_s"],
        "test_accuracy": metrics["test_accuracy"],
        "command": ckpt.get("command"),
        "git_commit": ckpt.get("git_commit"),
    }
    if train_samples:
        record["train_accuracy"] = train_split_accuracy(model, ckpt, train_samples, data_dir)
        record["train_samples"] = train_samples
    return record


def render_markdown(result: dict) -> str:
    lines = [
        "# Classifier recipes (f + g)", "",
        f"Machine: {result['machine_label']}. Command: `{result['command']}`.",
        "Train accuracy: the first examples of each run's own train part (eval mode, no Mixup).",
        "Wall time: as the trainer recorded it, with the thread count it ran with.", "",
        "| dataset | blocks | hidden | epochs | peak lr | Mixup α | shift | seed | threads | "
        "train time | train acc | test acc | checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        primary = next(iter(r["test_accuracy"]))
        train = r.get("train_accuracy", {}).get(primary)
        lines.append(
            f"| {r['dataset']} | {'+'.join(map(str, r['blocks_per_stage']))} | "
            f"{'/'.join(map(str, r['hidden_channels']))} | {r['epochs']} | {r['lr']:g} | "
            f"{r['mixup_alpha']:g} | "
            f"{r['augment_shift']} | {r['seed']} | {r['threads']} | {r['train_wall_time_s'] / 60:.1f} min | "
            f"{'–' if train is None else f'{100 * train:.2f} %'} | "
            f"**{100 * r['test_accuracy'][primary]:.2f} %** | `{r['checkpoint']}` |"
        )
    return "\n".join(lines) + "\n"


def run(config: ClassifiersConfig, command: str) -> dict:
    import torch

    from bench.machine import machine_info, machine_label

    torch.set_num_threads(config.threads)
    runs = []
    for path in config.checkpoints:
        logger.info("scoring %s", path)
        runs.append(summarize(path, config.train_samples, config.data_dir))
    info = machine_info()
    result = {"config": asdict(config), "command": command, "machine": info,
              "machine_label": machine_label(info), "runs": runs}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{config.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{config.name}.md").write_text(render_markdown(result))
    logger.info("wrote %s/%s.{json,md}", out, config.name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments classifiers", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="classifier.pt files")
    add_dataclass_flags(parser, ClassifiersConfig, skip=("checkpoints",), unset_defaults=True, helps={
        "train_samples": "training examples scored per checkpoint (0 = skip)", "name": "output file stem"})
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = " ".join(["python -m experiments classifiers", *(sys.argv[1:] if argv is None else argv)])
    try:
        run(ClassifiersConfig(**dataclass_values(ClassifiersConfig, vars(args))), command)
    except ExperimentError as exc:
        logger.error("error: %s", exc)
        return 2
    return 0
