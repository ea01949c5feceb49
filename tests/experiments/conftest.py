"""Fixtures of the experiments tests: a finished tiny classifier to score."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.train_classifier import main as train_main


@pytest.fixture(scope="module")
def tiny_classifier(small_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1 + 1 block classifier (shift 1, alpha 0.5, lr 3e-3) on 64 real MNIST images."""
    out = tmp_path_factory.mktemp("tiny-run")
    argv = ["--dataset", "mnist", "--out", str(out), "--data-dir", str(small_mnist_dir),
            "--train-subset", "64", "--epochs", "1", "--batch-size", "32", "--threads", "1",
            "--blocks-per-stage", "1", "1", "--hidden-channels", "4", "8", "--augment-shift", "1",
            "--mixup-alpha", "0.5", "--lr", "0.003", "--val-fraction", "0.1", "--refine-iterations", "5"]
    assert train_main(argv) == 0
    return out / "classifier.pt"
