"""Classifier training: the loss falls on a few hundred samples; CLI, resume and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint, load_classifier
from trainer.data import DATASETS, load_split, normalize
from trainer.evaluate import main as evaluate_main
from trainer.models import Classifier, ClassifierConfig, ConfigError, IResNetConfig, default_heads
from trainer.train_classifier import CPU_RECIPES, TrainConfig, _same_flags, resolve, train_epoch
from trainer.train_classifier import main as train_main

pytestmark = pytest.mark.mnist  # trains on real MNIST images


def test_loss_falls_on_a_few_hundred_samples(small_mnist_dir: Path) -> None:
    torch.manual_seed(0)
    spec = DATASETS["mnist"]
    images, labels = load_split("mnist", "train", small_mnist_dir)
    x = torch.from_numpy(normalize(images, spec))  # (200, 1, 28, 28)
    y = torch.from_numpy(labels)
    cfg = ClassifierConfig(
        f=IResNetConfig(blocks_per_stage=(1, 2), hidden_channels=(8, 16)),
        heads=default_heads("mnist", spec.class_names, pool_size=7),
        dataset="mnist",
    )
    model = Classifier(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = [train_epoch(model, opt, None, x, y, 32, 1.0, gen) for _ in range(8)]
    assert all(np.isfinite(losses))
    # Mixup losses are noisy per step; compare epoch means, first vs the last two.
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
    model.eval()
    with torch.no_grad():
        train_acc = float((model(x)["digit"].argmax(1) == y).float().mean())
    assert train_acc > 0.5  # 10 classes: chance is 0.1


def test_cli_trains_resumes_and_evaluates(small_mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--dataset", "mnist", "--out", str(out), "--data-dir", str(small_mnist_dir),
            "--train-subset", "64", "--epochs", "1", "--batch-size", "32", "--threads", "1",
            "--val-fraction", "0.1", "--refine-iterations", "5"]
    assert train_main(argv) == 0
    model, ckpt = load_classifier(out / "classifier.pt")
    assert ckpt["metrics"]["final"] is True
    assert set(ckpt["metrics"]["test_accuracy"]) == {"digit", "parity"}
    assert ckpt["train_config"]["train_subset"] == 64 and ckpt["dataset"] == "mnist"
    assert list(model.heads) == ["digit", "parity"]
    state = load_checkpoint(out / "last.pt", "coded-invnet/train-state")
    assert state["epoch"] == 1 and len(state["history"]) == 1

    # Same flags: resumes from last.pt at the end, trains no further epoch.
    assert train_main(argv) == 0
    _, again = load_classifier(out / "classifier.pt")
    assert len(again["metrics"]["history"]) == 1
    # Different flags against the same directory: refused.
    assert train_main([*argv, "--lr", "0.1"]) == 2

    report = tmp_path / "eval.json"
    rc = evaluate_main([str(out / "classifier.pt"), "--out", str(report), "--samples", "8",
                        "--ks", "2", "4", "--data-dir", str(small_mnist_dir), "--threads", "1"])
    assert rc == 0
    result = json.loads(report.read_text())
    assert result["test_examples"] == 100
    assert set(result["inverse_averaged_embeddings"]) == {"k=2", "k=4"}
    on = result["inverse_test_embeddings"]
    assert on["converged"] and on["max_rel_residual"] <= 1e-5 and on["max_iterations"] <= 50
    assert on["max_rel_reconstruction_error"] < 1e-3
    np.testing.assert_allclose(result["test_accuracy"]["digit"],
                               ckpt["metrics"]["test_accuracy"]["digit"], atol=1e-12)


def test_train_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"--preset must be one of"):
        TrainConfig(dataset="mnist", out="x", preset="gpu")
    with pytest.raises(ConfigError, match=r"--dataset must be one of"):
        TrainConfig(dataset="svhn", out="x")
    with pytest.raises(ConfigError, match=r"--augment-shift must be >= 0"):
        TrainConfig(dataset="mnist", out="x", augment_shift=-1)
    model_cfg, cfg = resolve(TrainConfig(dataset="mnist", out="x", epochs=3))
    assert cfg.epochs == 3 and cfg.batch_size is not None
    assert cfg.augment_shift == CPU_RECIPES["mnist"][2]["augment_shift"]  # unset: the preset's
    assert resolve(TrainConfig(dataset="mnist", out="x", augment_shift=0))[1].augment_shift == 0  # 0 is a value
    assert 0 < cfg.mixup_alpha <= 1
    assert model_cfg.f.embedding_shape == (16, 7, 7)
    paper, paper_cfg = resolve(TrainConfig(dataset="mnist", out="x", preset="paper"))
    assert paper.f.blocks_per_stage == (7, 7) and paper_cfg.epochs == 200
    assert paper_cfg.mixup_alpha == 1.0 and paper_cfg.augment_shift == 0
    other, _ = resolve(TrainConfig(dataset="mnist", out="x", blocks_per_stage=[2, 6]))
    assert other.f.blocks_per_stage == (2, 6) and other.f.hidden_channels == model_cfg.f.hidden_channels
    with pytest.raises(ConfigError, match=r"one entry per stage"):
        resolve(TrainConfig(dataset="mnist", out="x", hidden_channels=[8]))


def test_files_written_before_a_flag_existed_resume_as_its_old_behaviour() -> None:
    # A last.pt from before --augment-shift trained without augmentation.
    assert _same_flags({"lr": 0.1}, {"lr": 0.1, "augment_shift": 0})
    assert not _same_flags({"lr": 0.1}, {"lr": 0.1, "augment_shift": 2})
    assert not _same_flags({"lr": 0.1, "augment_shift": 0}, {"lr": 0.2, "augment_shift": 0})


@pytest.mark.parametrize("dataset", sorted(CPU_RECIPES))
def test_every_cpu_preset_resolves_to_its_recipe(dataset: str) -> None:
    model_cfg, cfg = resolve(TrainConfig(dataset=dataset, out="x"))
    blocks, hidden, recipe = CPU_RECIPES[dataset]
    assert model_cfg.f.blocks_per_stage == blocks and model_cfg.f.hidden_channels == hidden
    assert {key: getattr(cfg, key) for key in recipe} == recipe
