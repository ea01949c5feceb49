"""experiments classifiers: one row per checkpoint, train accuracy measured, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.classifiers import main as classifiers_main
from trainer.checkpoint import load_classifier
from trainer.data import get_spec, load_split, train_val_split
from trainer.evaluate import accuracy

pytestmark = pytest.mark.mnist


def test_table_row_matches_the_checkpoint(tiny_classifier: Path, small_mnist_dir: Path, tmp_path: Path) -> None:
    rc = classifiers_main([str(tiny_classifier), "--train-samples", "50", "--out-dir", str(tmp_path),
                           "--name", "runs", "--data-dir", str(small_mnist_dir)])
    assert rc == 0
    result = json.loads((tmp_path / "runs.json").read_text())
    (row,) = result["runs"]
    model, ckpt = load_classifier(tiny_classifier)
    assert row["blocks_per_stage"] == [1, 1] and row["hidden_channels"] == [4, 8]
    assert row["augment_shift"] == 1 and row["mixup_alpha"] == 0.5 and row["epochs"] == 1
    assert row["lr"] == 0.003
    assert row["seed"] == ckpt["train_config"]["seed"] and row["threads"] == 1
    assert row["test_accuracy"] == ckpt["metrics"]["test_accuracy"]
    # The train accuracy is the model's own, on the first 50 examples of its train part.
    images, labels = load_split("mnist", "train", small_mnist_dir)
    train_idx, _ = train_val_split(len(labels), 0.1, 0)
    idx = np.sort(train_idx)[:50]
    assert row["train_accuracy"] == accuracy(model, images[idx], labels[idx], get_spec("mnist"))
    markdown = (tmp_path / "runs.md").read_text()
    assert "| mnist | 1+1 | 4/8 | 1 | 0.003 | 0.5 | 1 | 0 | 1 |" in markdown


def test_missing_or_wrong_files_and_bad_flags_are_refused(tiny_classifier: Path, tmp_path: Path) -> None:
    assert classifiers_main([str(tmp_path / "absent.pt"), "--out-dir", str(tmp_path)]) == 2
    last = tiny_classifier.parent / "last.pt"  # a train-state file, not a classifier
    assert classifiers_main([str(last), "--out-dir", str(tmp_path)]) == 2
    assert classifiers_main([str(tiny_classifier), "--train-samples", "-1", "--out-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "classifiers.json").exists()
