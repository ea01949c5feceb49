"""`python -m experiments codability CKPT`: how well one trained classifier's f codes.

Clean accuracy alone picks the wrong f for Coded-InvNet: a deeper f can be more accurate and
still rebuild erased answers far worse, because the encoder must learn f^-1(sum_j f(x_j) / k).
This command scores one classifier on both axes with one fixed encoder recipe:

    RUNS/<dataset>/classifier.pt  <- a copy of CKPT
    trainer ideal-data -> trainer encoder (--encoder-steps, cosine decay; the recipe of
    `trainer train-all`)  ->  bench accuracy --settings n,k  (whole test split, every erasure)

and writes one JSON (default experiments/results/codability/<dataset>_<stem>.json): the
classifier's recipe and clean accuracy, the degraded accuracy of Coded-InvNet and
ApproxIFER, and the accuracy *served* when every group of n workers loses one worker at
random: a fraction p = 1/n of all answers is then rebuilt, so
served = (1 - p) * clean + p * degraded. Steps already current for CKPT's f are skipped, so
an interrupted run resumes. It takes ~20 min on one thread of a 2-core CPU at (5, 4) with
1,500 encoder steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.accuracy import parse_setting
from bench.errors import BenchError
from experiments.errors import ClassifiersError, CodabilityError
from kernels.configs import add_dataclass_flags
from trainer.errors import TrainerError
from trainer.pipeline import COSINE, encoder_steps, recorded_f_hash, run_steps
from trainer.runs import classifier_path

logger = logging.getLogger(__name__)

RESULTS_DIR = Path("experiments/results/codability")


@dataclass
class CodabilityConfig:
    checkpoint: str
    setting: str = "5,4"  # "n,k"
    encoder_steps: int = 1500
    runs_dir: str | None = None  # default: runs/codability/<stem>
    out: str | None = None  # default: experiments/results/codability/<dataset>_<stem>.json
    threads: int = 1
    force: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        parse_setting(self.setting)  # a clear error for anything but 'n,k'
        if self.encoder_steps < 1:
            raise CodabilityError(f"--encoder-steps must be >= 1, got {self.encoder_steps}")
        if self.threads < 1:
            raise CodabilityError(f"--threads must be >= 1, got {self.threads}")
        if not Path(self.checkpoint).is_file():
            raise CodabilityError(f"no classifier checkpoint at {self.checkpoint}")

    @property
    def stem(self) -> str:
        """<checkpoint's directory name>_<n>-<k>_encoder-<steps>: one encoder recipe per name."""
        n, k = parse_setting(self.setting)
        return f"{Path(self.checkpoint).resolve().parent.name}_{n}-{k}_encoder-{self.encoder_steps}"


def served_accuracy(clean: float, degraded: float, n: int) -> float:
    """Accuracy of all answers when each group of n workers loses one, uniformly at random.

    The lost worker is systematic with probability k/n and then one of the group's k answers
    is rebuilt, so a fraction (k/n) / k = 1/n of all answers is rebuilt, whatever k is.
    """
    p = 1.0 / n
    return (1.0 - p) * clean + p * degraded


def _recorded_encoder_steps(path: Path) -> int | None:
    """The step budget an existing encoder checkpoint was trained with, else None."""
    if not path.is_file():
        return None
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["train_config"]["steps"])
    except Exception:  # noqa: BLE001 - unreadable: the f_hash check re-trains it
        return None


def run(config: CodabilityConfig, command: str) -> dict | None:
    """Train (or reuse) the encoder for CKPT's f, score it, write the JSON; None on a dry run."""
    from bench.accuracy import AccuracyConfig
    from bench.accuracy import run as run_accuracy
    from experiments.classifiers import summarize

    n, k = parse_setting(config.setting)
    try:
        recipe = summarize(config.checkpoint, 0, None)  # refuses an unfinished or unreadable file
    except ClassifiersError as exc:
        raise CodabilityError(str(exc)) from exc
    dataset, f_hash = recipe["dataset"], recipe["f_hash"]
    runs = Path(config.runs_dir or Path("runs/codability") / config.stem)
    placed = classifier_path(runs, dataset)
    steps = encoder_steps(runs, dataset, n, k, ("--steps", str(config.encoder_steps), *COSINE,
                                                "--threads", str(config.threads)))
    encoder = steps[-1].output
    trained_steps = _recorded_encoder_steps(encoder)
    if trained_steps not in (None, config.encoder_steps) and not config.force:
        raise CodabilityError(f"{encoder} was trained for {trained_steps} steps, not {config.encoder_steps}; "
                              "pass --force to re-train it or another --runs-dir")
    if recorded_f_hash(placed) != f_hash and not config.dry_run:
        placed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config.checkpoint, placed)
    run_steps(dataset, steps, config.force, config.dry_run, f_hash=f_hash)
    if config.dry_run:
        return None

    acc = run_accuracy(AccuracyConfig(datasets=[dataset], settings=[config.setting], runs_dir=str(runs),
                                      out_dir=str(runs / "acc"), threads=config.threads),
                       ["python", "-m", "bench", "accuracy", "--datasets", dataset, "--settings", config.setting,
                        "--runs-dir", str(runs), "--out-dir", str(runs / "acc"), "--threads", str(config.threads)])
    clean = next(iter(recipe["test_accuracy"].values()))  # the first head: the fine 10-class task
    degraded = {r["method"]: r["acc_labels"] for r in acc["rows"] if r["status"] == "ok"}
    if "Coded-InvNet" not in degraded:
        raise CodabilityError(f"the encoder at {encoder} was not scored; see {runs / 'acc'}")
    result = {
        "command": command,
        "config": asdict(config),
        "machine": acc["machine"],
        "machine_label": acc["machine_label"],
        "classifier": recipe,
        "n": n, "k": k,
        "encoder_steps": config.encoder_steps,
        "clean_accuracy": clean,
        "degraded_accuracy": degraded,
        "rebuilt_fraction": 1.0 / n,
        "served_accuracy": {m: served_accuracy(clean, d, n) for m, d in degraded.items()},
        "accuracy_rows": acc["rows"],
    }
    out = Path(config.out or RESULTS_DIR / f"{dataset}_{config.stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("%s (%s): clean %.2f %%, Coded-InvNet degraded %.2f %%, served %.2f %% at p = 1/%d; wrote %s",
                config.checkpoint, config.setting, 100 * clean, 100 * degraded["Coded-InvNet"],
                100 * result["served_accuracy"]["Coded-InvNet"], n, out)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments codability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a finished classifier.pt")
    add_dataclass_flags(p, CodabilityConfig, skip=("checkpoint",), helps={
        "setting": "'n,k'", "runs_dir": "where the copy, ideal data and encoder go (default runs/codability/<stem>)",
        "out": "the result JSON", "force": "re-train an encoder that is already current",
        "dry_run": "print the steps, run nothing"})
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = " ".join(["python -m experiments codability", *(sys.argv[1:] if argv is None else argv)])
    try:
        run(CodabilityConfig(**vars(args)), command)
    except (BenchError, TrainerError) as exc:  # bad flags or checkpoint, a failed training step
        logger.error("error: %s", exc)
        return 2
    return 0
