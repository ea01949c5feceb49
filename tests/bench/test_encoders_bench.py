"""`bench encoders`: the Pareto bookkeeping, and one end-to-end run on a tiny f (real MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.encoders import EncodersBenchError, EncodersConfig, knee, pareto_front
from bench.encoders import main as encoders_main


def _points(*rows: tuple[str, float, float]) -> list[dict]:
    return [{"label": label, "cost": cost, "acc": acc} for label, cost, acc in rows]


def test_pareto_front_keeps_exactly_the_undominated_designs() -> None:
    points = _points(("cheap", 0.05, 0.90), ("dominated", 0.5, 0.89), ("mid", 0.3, 0.95), ("big", 2.0, 0.97),
                     ("tie-cost-worse", 0.3, 0.93), ("same-as-mid", 0.3, 0.95))
    assert pareto_front(points, "cost", "acc") == ["cheap", "mid", "big", "same-as-mid"]
    assert knee(points, "cost", "acc", budget=0.35) == "mid"
    assert knee(points, "cost", "acc", budget=0.01) is None


def test_config_refuses_what_it_cannot_measure(tmp_path: Path) -> None:
    with pytest.raises(EncodersBenchError, match="not found"):
        EncodersConfig(classifier=str(tmp_path / "none.pt"))
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(EncodersBenchError, match="nothing to measure"):
        EncodersConfig(classifier=str(tmp_path / "c.pt"), linear_baseline=False)
    with pytest.raises(EncodersBenchError, match="labels"):
        EncodersConfig(classifier=str(tmp_path / "c.pt"), encoders=(str(tmp_path / "c.pt"),), labels=("a", "b"))


@pytest.mark.mnist
def test_end_to_end_on_a_tiny_f(small_mnist_dir: Path, tmp_path: Path) -> None:
    from trainer.ideal_data import main as ideal_main
    from trainer.train_classifier import main as classifier_main
    from trainer.train_encoder import main as encoder_main

    data = str(small_mnist_dir)
    assert classifier_main(["--dataset", "mnist", "--out", str(tmp_path / "f"), "--data-dir", data,
                            "--train-subset", "64", "--epochs", "1", "--batch-size", "32", "--threads", "1",
                            "--refine-iterations", "5", "--blocks-per-stage", "1", "1",
                            "--hidden-channels", "8", "8"]) == 0
    classifier = str(tmp_path / "f" / "classifier.pt")
    ideal = str(tmp_path / "ideal.npz")
    assert ideal_main(["--classifier", classifier, "--n", "3", "--k", "2", "--groups", "8", "--data-dir", data,
                       "--threads", "1", "--out", ideal]) == 0
    encoder = str(tmp_path / "sq.pt")
    assert encoder_main(["--classifier", classifier, "--ideal-data", ideal, "--out", encoder, "--data-dir", data,
                         "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--d-steps", "1",
                         "--disc-width", "8", "--val-groups", "5", "--threads", "1", "--arch", "squeezed",
                         "--width", "8", "--blocks", "1"]) == 0
    out = tmp_path / "results"
    assert encoders_main([classifier, encoder, "--labels", "squeezed", "--data-dir", data, "--batch-size", "8",
                          "--repeats", "1", "--warmup", "0", "--ks", "2,4", "--intra-op-threads", "1",
                          "--out-dir", str(out), "--tag", "t"]) == 0
    record = json.loads((out / "encoders-t.json").read_text())
    assert (out / "encoders-t.png").stat().st_size > 0 and (out / "encoders-t.md").is_file()
    labels = [p["label"] for p in record["points"]]
    assert labels == ["linear mix (no learned part)", "squeezed"]
    for p in record["points"]:
        assert p["n"] == 3 and p["k"] == 2 and p["groups"] == 50  # 100 test images in pairs
        assert 0.0 <= p["acc_labels"] <= 1.0 and 0.0 <= p["acc_base"] <= 1.0
        assert p["enc_over_f"] == round(p["enc_ms"] / p["f_ms"], 4)
        assert set(p["enc_over_f_by_k"]) == {"2", "4"}
    assert record["points"][1]["design"]["arch"] == "squeezed" and record["points"][1]["parameters"] > 0
    assert record["pareto_front"] == pareto_front(record["points"], "enc_over_f", "acc_labels")
    assert record["knee"] == knee(record["points"], "enc_over_f", "acc_labels", 0.10)
    assert record["command"][:2] == ["python -m bench encoders", classifier]
