"""`python -m export verify`: checksums, schema and numerics against the stored references."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export.cli import main
from export.config import VerifyConfig
from export.errors import ExportVerificationError
from export.layout import reference_key
from export.verify import verify_bundle
from runtime.manifest import REFERENCE_FILE, sha256_file

pytestmark = pytest.mark.mnist  # builds or reads bundles verified on real MNIST test images


def _rehash(bundle: Path, rel: str) -> None:
    """Update the manifest's checksum for `rel`, as an attacker or a careless edit would."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["files"][rel] = sha256_file(bundle / rel)
    path.write_text(json.dumps(data))


def test_fresh_bundle_verifies(bundle: Path) -> None:
    report = verify_bundle(VerifyConfig(bundle=str(bundle)))
    checked = {c.file for c in report.checked}
    assert checked == {"f.onnx", "heads/digit.onnx", "heads/parity.onnx", "codes/n3k2/enc_0.onnx",
                       "codes/n3k2/parm.onnx", "torch/f.pt2"}
    assert report.codes == ["3,2"] and "codes (n,k) 3,2" in report.lines()[0]
    assert all(c.ok and c.max_abs_err <= 1e-5 for c in report.checked)


def test_cli_verify_exit_codes(bundle_copy: Callable[[], Path], capsys: pytest.CaptureFixture[str]) -> None:
    copy = bundle_copy()
    assert main(["verify", str(copy)]) == 0
    assert "f.onnx: max abs err" in capsys.readouterr().out
    with open(copy / "heads/digit.onnx", "ab") as fh:
        fh.write(b"\0")
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "heads/digit.onnx: sha256" in err and "does not match its manifest" in err


def test_tampered_file_fails_checksum(bundle_copy: Callable[[], Path]) -> None:
    copy = bundle_copy()
    (copy / "codes/n3k2/enc_0.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportVerificationError, match=r"codes/n3k2/enc_0\.onnx: sha256 .* != manifest"):
        verify_bundle(VerifyConfig(bundle=str(copy)))


def test_missing_file_is_reported(bundle_copy: Callable[[], Path]) -> None:
    copy = bundle_copy()
    (copy / "codes/n3k2/parm.onnx").unlink()
    with pytest.raises(ExportVerificationError, match=r"codes/n3k2/parm\.onnx: missing"):
        verify_bundle(VerifyConfig(bundle=str(copy), numerics=False))


def test_perturbed_reference_fails_numerics(bundle_copy: Callable[[], Path]) -> None:
    """Stored references shifted by 0.01 (checksum updated): verify measures exactly that shift."""
    copy = bundle_copy()
    ref_path = copy / REFERENCE_FILE
    with np.load(ref_path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays[reference_key("f.onnx", "output")] = arrays[reference_key("f.onnx", "output")] + 0.01
    np.savez_compressed(ref_path, **arrays)
    _rehash(copy, REFERENCE_FILE)
    with pytest.raises(ExportVerificationError, match=r"f\.onnx: max abs err 1\.0\d*e-02 >"):
        verify_bundle(VerifyConfig(bundle=str(copy)))


def test_other_weights_same_interface_fail_numerics(bundle_copy: Callable[[], Path]) -> None:
    """A valid ONNX with the right I/O names but other weights passes the checksum, not the numerics."""
    import onnx
    from onnx import numpy_helper

    copy = bundle_copy()
    model = onnx.load(str(copy / "f.onnx"))
    conv_weight = next(i for i in model.graph.initializer if len(i.dims) == 4)
    scaled = numpy_helper.to_array(conv_weight) * 1.5
    conv_weight.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), conv_weight.name))
    onnx.save(model, str(copy / "f.onnx"))
    _rehash(copy, "f.onnx")
    with pytest.raises(ExportVerificationError, match=r"outputs differ from the references.*f\.onnx"):
        verify_bundle(VerifyConfig(bundle=str(copy)))


def test_manifest_schema_error_is_reported(bundle_copy: Callable[[], Path]) -> None:
    copy = bundle_copy()
    data = json.loads((copy / "manifest.json").read_text())
    data["codes"][0]["k"] = 5
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportVerificationError, match=r"codes\[0\]: coding: need integers 1 <= k <= n, got n=3, k=5"):
        verify_bundle(VerifyConfig(bundle=str(copy)))


def test_verify_runs_without_torch(bundle: Path) -> None:
    """An edge box has onnx + onnxruntime but no torch: ONNX files are verified, f.pt2 is skipped."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from export.cli import main\n"
        f"sys.exit(main(['verify', {str(bundle)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "f.onnx: max abs err" in result.stdout and "codes/n3k2/parm.onnx: max abs err" in result.stdout
    assert "skipped torch/f.pt2: torch is not installed" in result.stdout
