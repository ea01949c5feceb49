"""The bundle contract: manifest.json validation (schema 2: several codes; schema 1 still
read, as one code) and checksum verification."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from runtime.manifest import (
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    code_encoder_file,
    code_parm_file,
    parse_code_label,
    sha256_file,
    verify_checksums,
)


def _files(tmp_path: Path, rels: list[str]) -> dict[str, str]:
    files = {}
    for rel in rels:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode())
        files[rel] = sha256_file(path)
    return files


def _model() -> dict:
    """What both schemas share: one f and its heads (a fresh dict: tests edit it in place)."""
    return {
        "model_name": "toy",
        "input": {"name": "INPUT", "shape": [1, 4, 4], "accepted_dtypes": ["UINT8", "FP32"],
                  "preprocessing": {"mean": [0.5], "std": [0.25]}},
        "embedding_shape": [4, 2, 2],
        "f": "f.onnx",
        "heads": [{"task": "digit", "file": "heads/digit.onnx", "classes": ["a", "b"]}],
    }


def _bundle(tmp_path: Path) -> dict:
    """A schema-1 manifest: one code at the top level."""
    files = _files(tmp_path, ["f.onnx", "heads/digit.onnx", "encoders/enc_0.onnx"])
    return {
        "schema_version": 1,
        **_model(),
        "coding": {"n": 3, "k": 2, "coefficients": [[0.5, 0.5]]},
        "encoders": [{"row": 0, "file": "encoders/enc_0.onnx"}],
        "parm": None,
        "files": files,
    }


def _two_codes(tmp_path: Path) -> dict:
    """A schema-2 manifest of two codes, (5,4) with an encoder and ParM, then (4,2) with two."""
    rels = ["f.onnx", "heads/digit.onnx", code_encoder_file(5, 4, 0), code_parm_file(5, 4),
            code_encoder_file(4, 2, 0), code_encoder_file(4, 2, 1)]
    return {
        "schema_version": 2,
        **_model(),
        "codes": [
            {"n": 5, "k": 4, "coefficients": [[0.25] * 4],
             "encoders": [{"row": 0, "file": code_encoder_file(5, 4, 0)}], "parm": code_parm_file(5, 4)},
            {"n": 4, "k": 2, "coefficients": [[0.5, 0.5], [1.0, 2.0]],
             "encoders": [{"row": 0, "file": code_encoder_file(4, 2, 0)},
                          {"row": 1, "file": code_encoder_file(4, 2, 1)}], "parm": None},
        ],
        "files": _files(tmp_path, rels),
    }


def test_round_trip_and_checksums(tmp_path: Path) -> None:
    data = _bundle(tmp_path)
    manifest = Manifest.from_dict(data)
    manifest.dump(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert json.loads((tmp_path / "manifest.json").read_text())["heads"][0]["classes"] == ["a", "b"]
    verify_checksums(tmp_path, loaded)


def test_schema_1_reads_as_one_code_and_is_written_as_schema_2(tmp_path: Path) -> None:
    data = _bundle(tmp_path)
    manifest = Manifest.from_dict(data)
    assert SCHEMA_VERSION == 2 and manifest.schema_version == 2
    assert manifest.code_labels() == ["3,2"] and len(manifest.codes) == 1
    assert (manifest.coding.n, manifest.coding.k, manifest.coding.coefficients) == (3, 2, ((0.5, 0.5),))
    assert [(e.row, e.file) for e in manifest.encoders] == [(0, "encoders/enc_0.onnx")]  # its own paths
    assert manifest.parm is None and manifest.code is manifest.codes[0]
    written = manifest.to_dict()
    assert written["schema_version"] == 2 and not {"coding", "encoders", "parm"} & written.keys()
    assert written["codes"] == [{**data["coding"], "encoders": data["encoders"], "parm": None}]
    assert Manifest.from_dict(written) == manifest


def test_two_codes(tmp_path: Path) -> None:
    data = _two_codes(tmp_path)
    manifest = Manifest.from_dict(data)
    assert manifest.code_labels() == ["5,4", "4,2"]
    assert (manifest.coding.n, manifest.coding.k) == (5, 4)  # the first code is the selected one
    assert manifest.parm == "codes/n5k4/parm.onnx" and manifest.encoders[0].file == "codes/n5k4/enc_0.onnx"
    assert [c.parm for c in manifest.codes] == ["codes/n5k4/parm.onnx", None]
    assert set(manifest.model_files()) == set(data["files"])  # every code's files
    assert set(manifest.io_names()) == set(data["files"])
    assert manifest.to_dict()["codes"] == data["codes"]
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    manifest.dump(tmp_path)
    verify_checksums(tmp_path, Manifest.load(tmp_path))


def test_select_code(tmp_path: Path) -> None:
    manifest = Manifest.from_dict(_two_codes(tmp_path))
    second = manifest.select_code(4, 2)
    assert second.code_labels() == ["4,2", "5,4"] and manifest.code_labels() == ["5,4", "4,2"]
    assert (second.coding.n, second.coding.k, second.parm) == (4, 2, None)
    assert [e.file for e in second.encoders] == ["codes/n4k2/enc_0.onnx", "codes/n4k2/enc_1.onnx"]
    assert second.coding.coefficients == ((0.5, 0.5), (1.0, 2.0))
    assert second.files == manifest.files and second.model_files() != []
    assert Manifest.from_dict(second.to_dict()) == second  # what a Ray actor receives keeps the choice
    assert manifest.select_code(5, 4) == manifest
    with pytest.raises(ManifestError, match=r"no code n=6, k=4; its codes \(n,k\): 5,4, 4,2"):
        manifest.select_code(6, 4)


@pytest.mark.parametrize("text", ["5,4", " 5 , 4 "])
def test_code_labels_parse(text: str) -> None:
    assert parse_code_label(text) == (5, 4)


@pytest.mark.parametrize("text", ["5", "5,4,3", "4,5", "a,b", "5,0", ""])
def test_bad_code_labels_are_refused(text: str) -> None:
    with pytest.raises(ManifestError, match="N,K with integers N >= K >= 1"):
        parse_code_label(text)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["codes"].append(copy.deepcopy(d["codes"][0])), r"\(n, k\) 5,4 appear\(s\) more than once"),
        (lambda d: d["files"].pop("codes/n4k2/enc_1.onnx"),
         r"no sha256 recorded for \['codes/n4k2/enc_1.onnx'\]"),
        (lambda d: d["files"].pop("codes/n5k4/parm.onnx"), r"no sha256 recorded for \['codes/n5k4/parm.onnx'\]"),
        (lambda d: d["codes"][1]["encoders"].pop(),
         r"codes\[1\]: encoders: need exactly one encoder per parity row 0..1"),
        (lambda d: d["codes"][1].update(coefficients=[[0.5, 0.5]]), r"codes\[1\]: coding.coefficients must be 2 x 2"),
        (lambda d: d["codes"][0].update(colour="red"), r"codes\[0\]: unknown key\(s\) \['colour'\]"),
        (lambda d: d["codes"][0].pop("encoders"), r"codes\[0\]: missing required key\(s\) \['encoders'\]"),
        (lambda d: d["codes"].clear(), "a bundle needs at least one code"),
        (lambda d: d.update(coding={"n": 3, "k": 2, "coefficients": [[0.5, 0.5]]}),
         r"unknown key\(s\) \['coding'\]"),  # schema 2 has no top-level code
        (lambda d: d.update(codes={}), "codes: expected a list"),
        (lambda d: d.update(schema_version=3), "schema_version is 3, this runtime reads version"),
    ],
)
def test_invalid_two_code_manifests_are_refused(tmp_path: Path, mutate, message: str) -> None:
    data = _two_codes(tmp_path)
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data)


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
        (lambda d: d.update(schema_version=0), r"schema_version is 0, this runtime reads version\(s\) 1, 2"),
        (lambda d: d.update(schema_version=2), r"missing required key\(s\) \['codes'\]"),
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
