"""The bundle contract: manifest.json validation and checksum verification."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from runtime.manifest import Manifest, ManifestError, sha256_file, verify_checksums


def _bundle(tmp_path: Path) -> dict:
    files = {}
    for rel in ("f.onnx", "heads/digit.onnx", "encoders/enc_0.onnx"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode())
        files[rel] = sha256_file(path)
    return {
        "schema_version": 1,
        "model_name": "toy",
        "input": {"name": "INPUT", "shape": [1, 4, 4], "accepted_dtypes": ["UINT8", "FP32"],
                  "preprocessing": {"mean": [0.5], "std": [0.25]}},
        "embedding_shape": [4, 2, 2],
        "f": "f.onnx",
        "heads": [{"task": "digit", "file": "heads/digit.onnx", "classes": ["a", "b"]}],
        "coding": {"n": 3, "k": 2, "coefficients": [[0.5, 0.5]]},
        "encoders": [{"row": 0, "file": "encoders/enc_0.onnx"}],
        "parm": None,
        "files": files,
    }


def test_round_trip_and_checksums(tmp_path: Path) -> None:
    data = _bundle(tmp_path)
    manifest = Manifest.from_dict(data)
    manifest.dump(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert loaded.to_dict()["coding"] == data["coding"]
    assert json.loads((tmp_path / "manifest.json").read_text())["heads"][0]["classes"] == ["a", "b"]
    verify_checksums(tmp_path, loaded)


def test_tampered_file_is_named(tmp_path: Path) -> None:
    manifest = Manifest.from_dict(_bundle(tmp_path))
    (tmp_path / "heads/digit.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"heads/digit.onnx: sha256"):
        verify_checksums(tmp_path, manifest)
    (tmp_path / "f.onnx").unlink()
    with pytest.raises(ManifestError, match=r"f.onnx: missing"):
        verify_checksums(tmp_path, manifest)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=2), "schema_version is 2"),
        (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda d: d.pop("coding"), r"missing required key\(s\) \['coding'\]"),
        (lambda d: d.update(embedding_shape=[4, 4, 4]), "as many elements"),
        (lambda d: d["coding"].update(coefficients=[[0.5]]), "must be 1 x 2"),
        (lambda d: d["coding"].update(k=4), "1 <= k <= n"),
        (lambda d: d["input"].update(accepted_dtypes=["INT8"]), "accepted_dtypes"),
        (lambda d: d["input"]["preprocessing"].update(std=[0.0]), "std must be finite and > 0"),
        (lambda d: d.update(f="../outside.onnx"), "inside the bundle"),
        (lambda d: d["files"].pop("f.onnx"), r"no sha256 recorded for \['f.onnx'\]"),
        (lambda d: d["encoders"][0].update(row=1), "one encoder per parity row"),
    ],
)
def test_invalid_manifests_are_refused(tmp_path: Path, mutate, message: str) -> None:
    data = copy.deepcopy(_bundle(tmp_path))
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data)


def test_missing_manifest_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="python -m export"):
        Manifest.load(tmp_path)
