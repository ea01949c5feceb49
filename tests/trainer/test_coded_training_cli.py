"""The coded-training commands end to end on a tiny f: ideal-data -> encoder, and parm.

Budgets are a few steps on 200 real MNIST images: this checks the commands' contracts
(outputs, f_hash bookkeeping, metrics, refusals), not the accuracy they reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.checkpoint import load_classifier, load_encoders, load_parm
from trainer.ideal_data import load_ideal_data
from trainer.ideal_data import main as ideal_main
from trainer.train_classifier import main as classifier_main
from trainer.train_encoder import main as encoder_main
from trainer.train_parm import main as parm_main

pytestmark = pytest.mark.mnist  # trains on real MNIST images


def _classifier(data: Path, out: Path, seed: int) -> Path:
    argv = ["--dataset", "mnist", "--out", str(out), "--data-dir", str(data), "--train-subset", "64",
            "--epochs", "1", "--batch-size", "32", "--threads", "1", "--val-fraction", "0.1",
            "--refine-iterations", "5", "--blocks-per-stage", "1", "1", "--hidden-channels", "8", "8",
            "--seed", str(seed)]
    assert classifier_main(argv) == 0
    return out / "classifier.pt"


@pytest.fixture(scope="module")
def tiny_run(small_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coded-run")
    classifier = _classifier(small_mnist_dir, root / "f", seed=0)
    ideal = root / "ideal_k2.npz"
    assert ideal_main(["--classifier", str(classifier), "--n", "3", "--k", "2", "--groups", "12",
                       "--data-dir", str(small_mnist_dir), "--threads", "1", "--out", str(ideal)]) == 0
    return {"data": small_mnist_dir, "root": root, "classifier": classifier, "ideal": ideal}


def test_ideal_data_is_converged_and_bound_to_f(tiny_run: dict[str, Path]) -> None:
    _, ckpt = load_classifier(tiny_run["classifier"])
    cache = load_ideal_data(tiny_run["ideal"], f_hash=ckpt["f_hash"])
    assert cache["indices"].shape == (12, 2) and cache["targets"].shape == (12, 1, 1, 28, 28)
    assert cache["meta"]["dropped_fraction"] == 0.0
    assert cache["meta"]["command"][:4] == ["python", "-m", "trainer", "ideal-data"]
    assert ckpt["command"][:4] == ["python", "-m", "trainer", "classifier"]
    assert float(cache["residuals"].max()) <= cache["meta"]["config"]["max_residual"]


def test_encoder_cli_writes_best_weights_with_history(tiny_run: dict[str, Path]) -> None:
    out = tiny_run["root"] / "encoder_k2.pt"
    argv = ["--classifier", str(tiny_run["classifier"]), "--ideal-data", str(tiny_run["ideal"]),
            "--out", str(out), "--data-dir", str(tiny_run["data"]), "--steps", "4", "--eval-every", "2",
            "--batch-size", "4", "--d-steps", "1", "--base-channels", "4", "--disc-width", "8",
            "--val-groups", "5", "--lr-final-factor", "0.1", "--threads", "1"]
    assert encoder_main(argv) == 0
    encoders, ckpt = load_encoders(out)
    _, classifier = load_classifier(tiny_run["classifier"])
    assert ckpt["f_hash"] == classifier["f_hash"]
    assert ckpt["coding"]["n"] == 3 and ckpt["coding"]["k"] == 2
    history = ckpt["metrics"]["history"]
    assert [h["step"] for h in history] == [2, 4]
    best = max(history, key=lambda h: h["val_acc_labels"])
    assert ckpt["metrics"]["val_acc_labels"] == best["val_acc_labels"]
    assert ckpt["metrics"]["best_step"] == best["step"]
    assert ckpt["train_config"]["lr_final_factor"] == 0.1
    # provenance: the command as a user types it, never this machine's interpreter path
    assert ckpt["command"] == ["python", "-m", "trainer", "encoder", *argv]


def test_encoder_refuses_ideal_data_of_another_f(tiny_run: dict[str, Path], caplog) -> None:
    other = _classifier(tiny_run["data"], tiny_run["root"] / "other-f", seed=1)
    argv = ["--classifier", str(other), "--ideal-data", str(tiny_run["ideal"]),
            "--out", str(tiny_run["root"] / "never.pt"), "--data-dir", str(tiny_run["data"]), "--steps", "1"]
    assert encoder_main(argv) == 2
    assert "was built against f_hash" in caplog.text
    assert not (tiny_run["root"] / "never.pt").exists()


def test_parm_cli_regresses_the_sum_of_logits(tiny_run: dict[str, Path]) -> None:
    out = tiny_run["root"] / "parm_k2.pt"
    argv = ["--classifier", str(tiny_run["classifier"]), "--k", "2", "--out", str(out),
            "--data-dir", str(tiny_run["data"]), "--steps", "30", "--eval-every", "15", "--batch-size", "8",
            "--val-groups", "5", "--lr", "3e-3", "--threads", "1"]
    assert parm_main(argv) == 0
    parm, ckpt = load_parm(out)
    _, classifier = load_classifier(tiny_run["classifier"])
    assert ckpt["f_hash"] == classifier["f_hash"] and parm.config.k == 2
    history = ckpt["metrics"]["history"]
    assert [h["step"] for h in history] == [15, 30]
    assert np.isfinite([h["loss_mse"] for h in history]).all()


@pytest.mark.parametrize(("command", "argv", "message"), [
    (ideal_main, ["--n", "2", "--k", "2"], "need n > k >= 1"),
    (parm_main, ["--k", "1"], "k must be >= 2"),
    (encoder_main, ["--ideal-data", "missing.npz", "--lr-final-factor", "2"], "lr_final_factor must be in"),
])
def test_bad_flags_exit_2_naming_the_problem(tiny_run: dict[str, Path], caplog, command, argv, message) -> None:
    assert command(["--classifier", str(tiny_run["classifier"]), "--out", "x", *argv]) == 2
    assert message in caplog.text
