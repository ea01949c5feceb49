"""Classifier training: the loss falls on a few hundred samples; CLI, resume and evaluate;
presets fill what the flags leave unset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint, load_classifier
from trainer.data import DATASETS, load_split, normalize
from trainer.errors import ClassifierTrainError, ModelConfigError
from trainer.evaluate import main as evaluate_main
from trainer.models import Classifier, ClassifierConfig, IResNetConfig, default_heads
from trainer.train_classifier import (
    PRESETS,
    TrainConfig,
    _same_flags,
    build_parser,
    config_from_args,
    preset_values,
    resolve,
    train_epoch,
)
from trainer.train_classifier import main as train_main

mnist = pytest.mark.mnist  # trains on real MNIST images
# TrainConfig fields that a preset fills when the flag is not given
PRESET_FILLED = ("epochs", "batch_size", "lr", "weight_decay", "mixup_alpha", "augment_shift", "pool_size")


def _cli(*argv: str) -> TrainConfig:
    """The TrainConfig that `python -m trainer classifier --out x ARGV` runs with."""
    return config_from_args(build_parser().parse_args(["--out", "x", *argv]))


@mnist
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


@mnist
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
    assert ckpt["command"] == ["python", "-m", "trainer", "classifier", *argv]  # as typed, no interpreter path
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
    with pytest.raises(ClassifierTrainError, match=r"--preset must be one of"):
        TrainConfig(dataset="mnist", out="x", preset="gpu")
    with pytest.raises(ClassifierTrainError, match=r"--dataset must be one of"):
        TrainConfig(dataset="svhn", out="x")
    with pytest.raises(ClassifierTrainError, match=r"--augment-shift must be >= 0"):
        TrainConfig(dataset="mnist", out="x", augment_shift=-1)
    model_cfg, cfg = resolve(TrainConfig(dataset="mnist", out="x", epochs=3))
    assert cfg.epochs == 3 and cfg.batch_size is not None
    assert cfg.augment_shift == preset_values("mnist", "cpu")[1]["augment_shift"]  # unset: the preset's
    assert resolve(TrainConfig(dataset="mnist", out="x", augment_shift=0))[1].augment_shift == 0  # 0 is a value
    assert 0 < cfg.mixup_alpha <= 1
    assert model_cfg.f.embedding_shape == (16, 7, 7)  # f is a bijection: 1 x 28 x 28 elements
    # the paper preset is the paper's recipe (Dinh & Lee: 7 blocks per stage, 200 epochs, alpha 1)
    paper, paper_cfg = resolve(TrainConfig(dataset="mnist", out="x", preset="paper"))
    assert paper.f.blocks_per_stage == (7, 7) and paper_cfg.epochs == 200
    assert paper_cfg.mixup_alpha == 1.0 and paper_cfg.augment_shift == 0
    other, _ = resolve(TrainConfig(dataset="mnist", out="x", blocks_per_stage=[2, 6]))
    assert other.f.blocks_per_stage == (2, 6) and other.f.hidden_channels == model_cfg.f.hidden_channels
    with pytest.raises(ModelConfigError, match=r"one entry per stage"):
        resolve(TrainConfig(dataset="mnist", out="x", hidden_channels=[8]))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_a_preset_on_the_command_line_resolves_to_its_values(dataset: str, preset: str) -> None:
    f_cfg, values = preset_values(dataset, preset)
    model_cfg, cfg = resolve(_cli("--dataset", dataset, "--preset", preset))
    assert model_cfg.f == f_cfg
    assert {key: getattr(cfg, key) for key in values} == values
    assert all(getattr(cfg, key) is not None for key in PRESET_FILLED)  # the preset leaves nothing unset
    assert {h.pool_size for h in model_cfg.heads} == {cfg.pool_size}
    Classifier(model_cfg)  # and it builds


def test_without_preset_flag_the_cpu_preset_is_used() -> None:
    assert resolve(_cli("--dataset", "mnist")) == resolve(_cli("--dataset", "mnist", "--preset", "cpu"))
    assert _cli("--dataset", "mnist") == TrainConfig(dataset="mnist", out="x")  # the dataclass defaults


def test_explicit_flags_win_over_the_preset() -> None:
    f_cfg, values = preset_values("mnist", "cpu")
    given = {"epochs": values["epochs"] + 1, "lr": values["lr"] * 2, "mixup_alpha": values["mixup_alpha"] / 2,
             "augment_shift": 0 if values["augment_shift"] else 1, "seed": 5, "threads": 1}
    argv = [item for key, value in given.items() for item in ("--" + key.replace("_", "-"), repr(value))]
    model_cfg, cfg = resolve(_cli("--dataset", "mnist", *argv, "--blocks-per-stage", "1", "3"))
    assert {key: getattr(cfg, key) for key in given} == given
    assert cfg.batch_size == values["batch_size"] and cfg.weight_decay == values["weight_decay"]  # not given
    assert model_cfg.f.blocks_per_stage == (1, 3) and model_cfg.f.hidden_channels == f_cfg.hidden_channels


def test_unknown_preset_or_bad_flag_value_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit):
        _cli("--dataset", "mnist", "--preset", "gpu")
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("--dataset", "mnist", "--epochs", "many")
    assert "invalid int value: 'many'" in capsys.readouterr().err
    assert train_main(["--dataset", "mnist", "--out", "x", "--augment-shift", "-1"]) == 2  # refused, not a traceback


def test_files_written_before_a_flag_existed_resume_as_its_old_behaviour() -> None:
    # A last.pt from before --augment-shift trained without augmentation.
    assert _same_flags({"lr": 0.1}, {"lr": 0.1, "augment_shift": 0})
    assert not _same_flags({"lr": 0.1}, {"lr": 0.1, "augment_shift": 2})
    assert not _same_flags({"lr": 0.1, "augment_shift": 0}, {"lr": 0.2, "augment_shift": 0})
