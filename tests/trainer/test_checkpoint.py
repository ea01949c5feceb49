"""Checkpoint save/load, schema checks, and rebuilding a Classifier from the file alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    CLASSIFIER_SCHEMA,
    ENCODER_SCHEMA,
    CheckpointError,
    load_checkpoint,
    load_classifier,
    save_checkpoint,
)
from trainer.models import Classifier, ClassifierConfig, HeadConfig, IResNetConfig, fingerprint


def _classifier() -> Classifier:
    torch.manual_seed(0)
    cfg = ClassifierConfig(
        f=IResNetConfig(in_shape=(1, 8, 8), stages=2, blocks_per_stage=(1, 1), hidden_channels=(4, 8)),
        heads=[HeadConfig("digit", 10, tuple("0123456789")),
               HeadConfig("parity", 2, ("even", "odd"), label_map=tuple(d % 2 for d in range(10)))],
        dataset="mnist",
    )
    return Classifier(cfg).eval()


def _save(path: Path, model: Classifier, **overrides) -> None:
    kwargs = dict(
        schema=CLASSIFIER_SCHEMA, model_config=model.config.to_dict(),
        state_dict=model.state_dict(), train_config={"epochs": 1}, metrics={"acc": 0.5},
        dataset="mnist", extra={"f_hash": fingerprint(model.f)},
    )
    kwargs.update(overrides)
    save_checkpoint(path, **kwargs)


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    model = _classifier()
    path = tmp_path / "sub" / "classifier.pt"
    _save(path, model)
    assert [p.name for p in path.parent.iterdir()] == ["classifier.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["schema"] == CLASSIFIER_SCHEMA and raw["schema_version"] == 1
    assert isinstance(raw["git_commit"], str) and isinstance(raw["command"], list)
    loaded, ckpt = load_classifier(path)
    assert ckpt["metrics"] == {"acc": 0.5} and ckpt["f_hash"] == fingerprint(loaded.f)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for task in a:
        np.testing.assert_allclose(a[task].numpy(), b[task].numpy(), rtol=0, atol=0)


def test_wrong_schema_is_refused(tmp_path: Path) -> None:
    model = _classifier()
    path = tmp_path / "enc.pt"
    _save(path, model, schema=ENCODER_SCHEMA)
    with pytest.raises(CheckpointError, match=r"has schema 'coded-invnet/encoder', expected "
                                              r"'coded-invnet/classifier'"):
        load_classifier(path)


def test_wrong_version_corrupt_missing_and_tampered(tmp_path: Path) -> None:
    model = _classifier()
    path = tmp_path / "c.pt"
    _save(path, model)
    raw = torch.load(path, weights_only=True)
    raw["schema_version"] = 2
    torch.save(raw, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match=r"schema_version 2, this code reads version 1"):
        load_checkpoint(tmp_path / "v2.pt", CLASSIFIER_SCHEMA)
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*bad\.pt"):
        load_checkpoint(tmp_path / "bad.pt", CLASSIFIER_SCHEMA)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "none.pt", CLASSIFIER_SCHEMA)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"holds a list, expected a dict"):
        load_checkpoint(tmp_path / "list.pt", CLASSIFIER_SCHEMA)
    _save(tmp_path / "tampered.pt", model, extra={"f_hash": "0" * 64})
    with pytest.raises(CheckpointError, match=r"does not match the weights' fingerprint"):
        load_classifier(tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match=r"would overwrite a standard checkpoint key"):
        _save(tmp_path / "x.pt", model, extra={"dataset": "x"})
