"""experiments codability: the served-accuracy model, the steps it runs, and what it refuses."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from experiments import codability
from experiments.codability import CodabilityConfig, served_accuracy
from experiments.errors import CodabilityError
from trainer.pipeline import COSINE
from trainer.runs import encoder_path


def _served_by_enumeration(clean: Fraction, degraded: Fraction, n: int, k: int) -> Fraction:
    """Expected accuracy over the k answers of a group when one of its n workers, uniformly at
    random, is lost: workers 0..k-1 carry the queries (their answer is rebuilt when lost), the
    rest parities (losing one rebuilds nothing)."""
    total = Fraction(0)
    for lost in range(n):  # each with probability 1/n
        answers = [degraded if query == lost else clean for query in range(k)]
        total += Fraction(1, n) * sum(answers, Fraction(0)) / k
    return total


@pytest.mark.parametrize(("n", "k"), [(5, 4), (3, 2), (6, 4), (11, 10)])
def test_one_lost_worker_per_group_matches_every_erasure_event(n: int, k: int) -> None:
    for clean, degraded in [(Fraction(99, 100), Fraction(9, 10)), (Fraction(1), Fraction(0)),
                            (Fraction(7, 10), Fraction(7, 10))]:
        expected = _served_by_enumeration(clean, degraded, n, k)
        assert served_accuracy(float(clean), float(degraded), n) == pytest.approx(float(expected), rel=1e-12)
    # limiting cases: perfect rebuilds serve clean accuracy; useless ones lose exactly 1/n of the answers
    assert served_accuracy(0.98, 0.98, n) == pytest.approx(0.98, rel=1e-12)
    assert served_accuracy(1.0, 0.0, n) == pytest.approx(1 - 1 / n, rel=1e-12)


@pytest.mark.mnist
def test_trains_the_encoder_on_a_copy_and_scores_it(tiny_classifier: Path, tmp_path: Path, monkeypatch) -> None:
    ran: list = []
    monkeypatch.setattr(codability, "run_steps", lambda label, steps, force, dry_run, f_hash: ran.append(
        (label, steps, f_hash)))
    degraded = {"Coded-InvNet": 0.8, "ApproxIFER": 0.5}

    def fake_accuracy(config, command):
        assert config.runs_dir == str(tmp_path / "runs") and config.settings == ["3,2"]
        rows = [{"method": m, "status": "ok", "acc_labels": a} for m, a in degraded.items()]
        return {"machine": {}, "machine_label": "test", "rows": [*rows, {"method": "ParM", "status": "not run"}]}

    monkeypatch.setattr("bench.accuracy.run", fake_accuracy)
    out = tmp_path / "result.json"
    config = CodabilityConfig(checkpoint=str(tiny_classifier), setting="3,2", encoder_steps=7,
                              runs_dir=str(tmp_path / "runs"), out=str(out))
    codability.run(config, "python -m experiments codability ...")

    ckpt = torch.load(tiny_classifier, weights_only=True)
    placed = tmp_path / "runs" / "mnist" / "classifier.pt"
    assert torch.load(placed, weights_only=True)["f_hash"] == ckpt["f_hash"]
    ((label, steps, f_hash),) = ran
    assert (label, f_hash) == ("mnist", ckpt["f_hash"])
    assert [s.name for s in steps] == ["ideal_k2", "encoder_k2"]
    assert steps[-1].output == encoder_path(tmp_path / "runs", "mnist", 3, 2)
    enc = steps[-1].argv
    assert enc[enc.index("--classifier") + 1] == str(placed)
    assert enc[enc.index("--steps") + 1] == "7" and all(flag in enc for flag in COSINE)

    result = json.loads(out.read_text())
    clean = ckpt["metrics"]["test_accuracy"]["digit"]
    assert result["clean_accuracy"] == clean
    assert result["degraded_accuracy"] == degraded  # rows that did not run are left out
    assert result["served_accuracy"]["Coded-InvNet"] == pytest.approx(2 / 3 * clean + 1 / 3 * 0.8)
    assert result["classifier"]["blocks_per_stage"] == [1, 1]


@pytest.mark.mnist
def test_an_encoder_of_another_budget_is_not_reused(tiny_classifier: Path, tmp_path: Path) -> None:
    enc = encoder_path(tmp_path, "mnist", 5, 4)
    enc.parent.mkdir(parents=True)
    torch.save({"train_config": {"steps": 500}}, enc)
    config = CodabilityConfig(checkpoint=str(tiny_classifier), encoder_steps=1500, runs_dir=str(tmp_path))
    with pytest.raises(CodabilityError, match="trained for 500 steps, not 1500; pass --force"):
        codability.run(config, "")


def test_bad_flags_exit_2_naming_the_problem(tmp_path: Path, caplog) -> None:
    assert codability.main([str(tmp_path / "absent.pt")]) == 2
    assert "no classifier checkpoint at" in caplog.text
    (tmp_path / "c.pt").write_bytes(b"")
    assert codability.main([str(tmp_path / "c.pt"), "--setting", "5-4"]) == 2
    assert "a setting is 'n,k'" in caplog.text
    assert codability.main([str(tmp_path / "c.pt"), "--encoder-steps", "0"]) == 2
    assert "--encoder-steps must be >= 1" in caplog.text
