"""Fixtures for the export tests: tiny checkpoints and one shared bundle built from them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from export_fixtures import save_classifier, save_encoders, save_parm, tiny_classifier

from trainer.models import fingerprint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_classifier()
    f_hash = fingerprint(model.f)
    return {
        "classifier": save_classifier(root / "classifier.pt", model),
        "encoder": save_encoders(root / "encoder.pt", f_hash),
        "parm": save_parm(root / "parm.pt", model, f_hash),
    }


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    """classifier + encoder + ParM, TorchScript exporter (the dynamo run is in a slow test)."""
    from export.bundle import build_bundle
    from export.config import ExportConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(
        ExportConfig(checkpoints=tuple(str(p) for p in checkpoints.values()), out=str(out),
                     exporter="torchscript", verify_samples=16, reference_samples=4),
        command=["python", "-m", "export", "(test)"],
    )
    return out


@pytest.fixture
def bundle_copy(bundle: Path, tmp_path: Path) -> Callable[[], Path]:
    """A private copy of the shared bundle, for tests that tamper with it."""
    def make() -> Path:
        dst = tmp_path / "bundle"
        shutil.copytree(bundle, dst)
        return dst

    return make
