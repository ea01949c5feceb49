"""The exporter refuses checkpoints that do not belong together, before exporting anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_fixtures import save_classifier, save_encoders, save_parm, tiny_classifier

from export.errors import CheckpointMismatchError, ExportError
from export.sources import load_sources
from trainer.models import fingerprint


def test_consistent_checkpoints_load(checkpoints: dict[str, Path]) -> None:
    sources = load_sources([str(p) for p in checkpoints.values()])
    assert sources.coding.k == 2 and sources.coding.n == 3
    assert sources.f_hash == fingerprint(sources.classifier.f)
    assert len(sources.encoders.encoders) == 1 and sources.parm is not None
    assert sources.dataset == "mnist"


def test_order_of_checkpoints_does_not_matter(checkpoints: dict[str, Path]) -> None:
    sources = load_sources([str(checkpoints["parm"]), str(checkpoints["encoder"]), str(checkpoints["classifier"])])
    assert sources.parm is not None and sources.encoders is not None


def test_encoder_trained_against_another_f_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    other_hash = fingerprint(tiny_classifier(seed=5).f)
    enc = save_encoders(tmp_path / "enc_other.pt", other_hash)
    with pytest.raises(CheckpointMismatchError, match="trained against f_hash"):
        load_sources([str(checkpoints["classifier"]), str(enc)])


def test_parm_trained_against_another_f_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    other = tiny_classifier(seed=6)
    parm = save_parm(tmp_path / "parm_other.pt", other, fingerprint(other.f))
    with pytest.raises(CheckpointMismatchError, match="trained against f_hash"):
        load_sources([str(checkpoints["classifier"]), str(parm)])


def test_k_mismatch_between_encoder_and_parm_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_classifier()
    parm3 = save_parm(tmp_path / "parm_k3.pt", model, fingerprint(model.f), k=3)
    with pytest.raises(CheckpointMismatchError, match=r"k mismatch: .*k=2.*k=3"):
        load_sources([str(checkpoints["classifier"]), str(checkpoints["encoder"]), str(parm3)])


def test_k_flag_must_match_the_encoders(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"--k has k=4"):
        load_sources([str(checkpoints["classifier"]), str(checkpoints["encoder"])], k=4)


def test_classifier_alone_needs_k(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ExportError, match="pass --k K"):
        load_sources([str(checkpoints["classifier"])])
    sources = load_sources([str(checkpoints["classifier"])], k=3)
    assert (sources.coding.n, sources.coding.k) == (4, 3)
    assert sources.coding.coefficients.tolist() == [[1 / 3, 1 / 3, 1 / 3]]


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        load_sources([str(tmp_path / "nope.pt")])


def test_corrupt_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(checkpoints["classifier"].read_bytes()[:200])
    with pytest.raises(ExportError, match="corrupt, truncated"):
        load_sources([str(bad)])


def test_wrong_schema_version(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data = torch.load(checkpoints["classifier"], weights_only=True)
    data["schema_version"] = 99
    path = tmp_path / "v99.pt"
    torch.save(data, path)
    with pytest.raises(ExportError, match="schema_version 99"):
        load_sources([str(path)], k=2)


def test_unknown_schema(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"schema": "someone/else", "state_dict": {}}, path)
    with pytest.raises(ExportError, match="has schema 'someone/else'"):
        load_sources([str(path)], k=2)


def test_classifier_weights_edited_after_training(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data = torch.load(checkpoints["classifier"], weights_only=True)
    key = next(k for k in data["state_dict"] if k.startswith("f.") and k.endswith("weight"))
    data["state_dict"][key] = data["state_dict"][key] * 0.5
    path = tmp_path / "edited.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointMismatchError, match="f_hash"):
        load_sources([str(path)], k=2)


def test_two_classifiers_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    second = save_classifier(tmp_path / "second.pt", tiny_classifier(seed=3))
    with pytest.raises(ExportError, match="exactly one classifier"):
        load_sources([str(checkpoints["classifier"]), str(second)], k=2)


def test_encoder_coding_must_match_its_coefficients(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data = torch.load(checkpoints["encoder"], weights_only=True)
    data["coding"] = {"n": 3, "k": 2, "coefficients": [[0.25, 0.75]]}
    path = tmp_path / "enc_bad_coding.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointMismatchError, match="disagrees with the coefficients"):
        load_sources([str(checkpoints["classifier"]), str(path)])
