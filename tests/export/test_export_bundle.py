"""A tiny model exported end to end: files, manifest, ORT vs PyTorch, atomic writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.bundle import build_bundle
from export.config import ExportConfig
from export.errors import ExportError, ExportVerificationError
from export.numerics import run_ort
from export.sources import load_sources
from runtime.manifest import (
    F_FILE,
    REFERENCE_FILE,
    TORCH_F_FILE,
    Manifest,
    ManifestError,
    code_encoder_file,
    code_parm_file,
    head_file,
    sha256_file,
    verify_checksums,
)

pytestmark = pytest.mark.mnist  # builds or reads bundles verified on real MNIST test images

# ORT vs PyTorch on CPU in fp32: only reduction order differs (measured ~2e-7 here).
ATOL, RTOL = 1e-5, 1e-5


def test_bundle_layout_and_manifest(bundle: Path, checkpoints: dict[str, Path]) -> None:
    manifest = Manifest.load(bundle)
    verify_checksums(bundle, manifest)
    assert manifest.f == "f.onnx"
    assert [h.file for h in manifest.heads] == ["heads/digit.onnx", "heads/parity.onnx"]
    assert manifest.heads[0].classes == tuple(str(d) for d in range(10))
    assert manifest.heads[1].classes == ("even", "odd")
    assert manifest.schema_version == 2 and manifest.code_labels() == ["3,2"]
    assert [(e.row, e.file) for e in manifest.encoders] == [(0, "codes/n3k2/enc_0.onnx")]
    assert manifest.parm == "codes/n3k2/parm.onnx"
    assert manifest.torch == {"f": "torch/f.pt2"}
    assert (manifest.coding.n, manifest.coding.k, manifest.coding.coefficients) == (3, 2, ((0.5, 0.5),))
    assert manifest.input.shape == (1, 28, 28) and manifest.embedding_shape == (4, 14, 14)
    assert manifest.input.preprocessing.mean == (0.1307,) and manifest.input.preprocessing.std == (0.3081,)
    assert manifest.model_name == "mnist-iresnet"
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert on_disk == sorted([*manifest.files, "manifest.json"])
    assert REFERENCE_FILE in manifest.files
    assert all(manifest.files[rel] == sha256_file(bundle / rel) for rel in manifest.files)
    # every exported file was checked at export, on the requested number of real inputs
    for file in [*manifest.io_names(), TORCH_F_FILE]:
        entry = manifest.verification[file]
        assert entry["samples"] == 16 and entry["max_abs_err"] <= entry["atol"] + 1e-3
    prov = manifest.provenance
    assert prov["dataset"] == "mnist" and prov["f_hash"] == torch.load(
        checkpoints["classifier"], weights_only=True)["f_hash"]
    assert prov["metrics"]["classifier"] == {"test_acc": 0.1} and prov["metrics"]["parm"] == {"val_acc_labels": 0.3}
    assert prov["commands"][-1] == "python -m export '(test)'"
    assert len(prov["checkpoints"]) == 3


def test_onnx_files_have_contract_io_and_dynamic_batch(bundle: Path) -> None:
    manifest = Manifest.load(bundle)
    for file, (input_name, output_name) in manifest.io_names().items():
        model = onnx.load(str(bundle / file))
        assert [i.name for i in model.graph.input] == [input_name]
        assert [o.name for o in model.graph.output] == [output_name]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        # spectral norm folded: no power-iteration buffers or sigma ops left in the graph
        assert not any(init.name.endswith((".u", ".v")) for init in model.graph.initializer)


def test_ort_matches_pytorch_on_fresh_inputs(bundle: Path, checkpoints: dict[str, Path]) -> None:
    """Independent of the exporter's own check: other inputs, other batch sizes (1 and 5)."""
    sources = load_sources([str(p) for p in checkpoints.values()])
    gen = torch.Generator().manual_seed(123)
    clf = sources.classifier
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28, generator=gen)  # [B, 1, 28, 28]
        groups = torch.randn(batch, 2, 1, 28, 28, generator=gen)  # [B, k, 1, 28, 28]
        with torch.no_grad():
            z = clf.f(x)
            expected = {
                F_FILE: (x, z),
                head_file("digit"): (z, clf.heads["digit"](z)),
                head_file("parity"): (z, clf.heads["parity"](z)),
                code_encoder_file(3, 2, 0): (groups, sources.encoders.encoders[0](groups)),
                code_parm_file(3, 2): (groups, sources.parm(groups)),
            }
        names = Manifest.load(bundle).io_names()
        for file, (inp, out) in expected.items():
            actual = run_ort(bundle / file, inp.numpy(), input_name=names[file][0], output_name=names[file][1])
            np.testing.assert_allclose(actual, out.numpy(), atol=ATOL, rtol=RTOL, err_msg=file)


def test_squeezed_encoder_bundle(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The light `--arch squeezed` encoder exports and verifies like the U-Net (no BatchNorm to fold)."""
    from export_fixtures import save_encoders

    from trainer.checkpoint import load_checkpoint

    f_hash = load_checkpoint(checkpoints["classifier"], "coded-invnet/classifier")["f_hash"]
    enc = save_encoders(tmp_path / "squeezed.pt", f_hash, arch="squeezed", width=4, blocks=1, query_layers=2)
    out = tmp_path / "bundle"
    manifest = build_bundle(ExportConfig(checkpoints=(str(checkpoints["classifier"]), str(enc)), out=str(out),
                                         exporter="torchscript", verify_samples=16, reference_samples=4))
    enc_file = code_encoder_file(3, 2, 0)
    assert manifest.verification[enc_file]["max_abs_err"] <= ATOL
    groups = torch.randn(5, 2, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = load_sources([str(checkpoints["classifier"]), str(enc)]).encoders.encoders[0](groups)
    names = manifest.io_names()[enc_file]
    actual = run_ort(out / enc_file, groups.numpy(), input_name=names[0], output_name=names[1])
    np.testing.assert_allclose(actual, expected.numpy(), atol=ATOL, rtol=RTOL)


def test_bundle_of_several_codes(checkpoints: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """One f, three codes: (3,2) with its encoder and ParM, (4,3) with an encoder only and the
    ParM-only average code (5,4); each code's files are exported, checked and verified."""
    from export_fixtures import save_encoders, save_parm, tiny_classifier

    from export.cli import main
    from export.config import VerifyConfig
    from export.verify import verify_bundle

    f_hash = torch.load(checkpoints["classifier"], weights_only=True)["f_hash"]
    enc43 = save_encoders(tmp_path / "enc_4_3.pt", f_hash, k=3)
    parm4 = save_parm(tmp_path / "parm_k4.pt", tiny_classifier(), f_hash, k=4)
    out = tmp_path / "codes"
    argv = [str(checkpoints["classifier"]), str(checkpoints["encoder"]), str(parm4), str(enc43),
            str(checkpoints["parm"]), "--out", str(out), "--exporter", "torchscript", "--verify-samples", "8",
            "--reference-samples", "2", "--no-torch-program"]
    assert main(argv) == 0
    assert "coding n=3 k=2 (the default), also n=4 k=3, also n=5 k=4" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.code_labels() == ["3,2", "4,3", "5,4"]
    assert [([e.file for e in c.encoders], c.parm) for c in manifest.codes] == [
        (["codes/n3k2/enc_0.onnx"], "codes/n3k2/parm.onnx"),
        (["codes/n4k3/enc_0.onnx"], None),
        ([], "codes/n5k4/parm.onnx"),
    ]
    code_files = ["codes/n3k2/enc_0.onnx", "codes/n3k2/parm.onnx", "codes/n4k3/enc_0.onnx", "codes/n5k4/parm.onnx"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted([*manifest.files, "manifest.json"]) and set(code_files) <= set(on_disk)
    assert all(manifest.verification[f]["samples"] == 8 for f in code_files)
    report = verify_bundle(VerifyConfig(bundle=str(out)))
    assert report.codes == ["3,2", "4,3", "5,4"] and set(code_files) <= {c.file for c in report.checked}
    assert all(c.ok for c in report.checked)
    assert {"encoder:" + str(checkpoints["encoder"]), "encoder:" + str(enc43), "parm:" + str(parm4)} <= set(
        manifest.provenance["metrics"])
    # the second code's encoder is the k = 3 checkpoint's, exactly
    second = manifest.select_code(4, 3)
    assert (second.coding.n, second.coding.k, second.parm) == (4, 3, None)
    groups = torch.randn(5, 3, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = load_sources([str(checkpoints["classifier"]), str(enc43)]).encoders.encoders[0](groups)
    (file,) = [e.file for e in second.encoders]
    names = second.io_names()[file]
    actual = run_ort(out / file, groups.numpy(), input_name=names[0], output_name=names[1])
    np.testing.assert_allclose(actual, expected.numpy(), atol=ATOL, rtol=RTOL)
    # a later code's file is verified like the first's
    (out / "codes/n5k4/parm.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportVerificationError, match=r"codes/n5k4/parm\.onnx: sha256"):
        verify_bundle(VerifyConfig(bundle=str(out)))


def test_failed_verification_leaves_nothing_behind(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "never"
    config = ExportConfig(checkpoints=(str(checkpoints["classifier"]),), out=str(out), k=2,
                          exporter="torchscript", verify_samples=4, reference_samples=2,
                          atol=0.0, rtol=0.0, torch_program=False)
    # atol = rtol = 0 demands bit-identical ORT output; a real conv graph never is (measured ~1e-7).
    with pytest.raises(ExportVerificationError, match=r"f\.onnx: ONNX Runtime disagrees with PyTorch"):
        build_bundle(config)
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_overwrite(bundle: Path, checkpoints: dict[str, Path]) -> None:
    config = ExportConfig(checkpoints=(str(checkpoints["classifier"]),), out=str(bundle), k=2)
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        build_bundle(config)


def test_overwrite_replaces_a_bundle_atomically(
    bundle_copy: Callable[[], Path], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = bundle_copy()  # tmp_path / "bundle": classifier + encoder + ParM, k = 2
    build_bundle(ExportConfig(checkpoints=(str(checkpoints["classifier"]),), out=str(out), k=3, overwrite=True,
                              exporter="torchscript", verify_samples=4, reference_samples=2, torch_program=False))
    manifest = Manifest.load(out)
    assert (manifest.coding.k, manifest.parm, manifest.encoders) == (3, None, ())
    assert not (out / "codes").exists() and not (out / "torch").exists()  # nothing of the old bundle left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .partial / .old leftovers


def test_overwrite_refuses_a_directory_that_is_not_a_bundle(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="is not a bundle"):
        build_bundle(ExportConfig(checkpoints=(str(checkpoints["classifier"]),), out=str(tmp_path), k=2,
                                  overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_fp16_bundle_holds_fp16_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    manifest = build_bundle(ExportConfig(
        checkpoints=(str(checkpoints["classifier"]),), out=str(out), k=2, fp16=True,
        exporter="torchscript", verify_samples=8, reference_samples=2, torch_program=False,
    ))
    model = onnx.load(str(out / "f.onnx"))
    kinds = {init.data_type for init in model.graph.initializer if len(init.dims) == 4}  # conv weights
    assert kinds == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 I/O
    entry = manifest.verification["f.onnx"]
    assert (entry["atol"], entry["rtol"]) == (5e-2, 2e-2)
    assert 0 < entry["max_abs_err"] <= entry["atol"] + entry["rtol"] * 10  # fp16 is not bit-exact
    assert json.loads((out / "manifest.json").read_text())["provenance"]["export"]["precision"] == "fp16"


def test_manifest_schema_rejects_what_export_must_not_write(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    Manifest.from_dict(data)  # the exported manifest itself is valid
    for mutate, message in [
        (lambda d: d.update(extra_key=1), r"unknown key\(s\) \['extra_key'\]"),
        (lambda d: d.update(schema_version=3), "schema_version is 3"),
        (lambda d: d["files"].pop("f.onnx"), r"no sha256 recorded for \['f.onnx'\]"),
        (lambda d: d.update(embedding_shape=[4, 14, 13]), "as many elements"),
        (lambda d: d["codes"][0]["encoders"].append({"row": 5, "file": "codes/n3k2/enc_5.onnx"}),
         "one encoder per parity row"),
        (lambda d: d["codes"].append(d["codes"][0]), r"\(n, k\) 3,2 appear\(s\) more than once"),
    ]:
        broken = json.loads(json.dumps(data))
        mutate(broken)
        with pytest.raises(ManifestError, match=message):
            Manifest.from_dict(broken)


@pytest.mark.slow
def test_dynamo_exporter_bundle(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The default exporter, end to end (about 30-40 s on a 2-core CPU)."""
    out = tmp_path / "dynamo"
    manifest = build_bundle(ExportConfig(checkpoints=tuple(str(p) for p in checkpoints.values()), out=str(out),
                                         verify_samples=16, reference_samples=4))
    for file, entry in manifest.verification.items():
        assert entry["max_abs_err"] <= 1e-4, file
    from export.config import VerifyConfig
    from export.verify import verify_bundle

    assert all(c.ok for c in verify_bundle(VerifyConfig(bundle=str(out))).checked)
