"""`python -m export` argv handling: the default verb takes checkpoints, `verify` / `trt` are verbs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from export.cli import EXIT_TENSORRT_MISSING, main
from export.config import ExportConfig, TrtConfig
from export.errors import ExportConfigError
from runtime.manifest import Manifest

pytestmark = pytest.mark.mnist  # builds or reads bundles verified on real MNIST test images


def test_help_lists_the_verbs() -> None:
    result = subprocess.run([sys.executable, "-m", "export", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "CHECKPOINT [CHECKPOINT ...]" in result.stdout and "--out BUNDLE_DIR" in result.stdout
    assert "python -m export verify BUNDLE" in result.stdout and "python -m export trt BUNDLE" in result.stdout


def test_export_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["model.pt"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_missing_checkpoint_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b"), "--k", "2"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_export_verb_end_to_end(checkpoints: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-bundle"
    argv = [str(checkpoints["classifier"]), "--out", str(out), "--k", "3", "--exporter", "torchscript",
            "--verify-samples", "4", "--reference-samples", "2", "--no-torch-program", "--model-name", "tiny"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"wrote bundle {out}" in stdout and "coding n=4 k=3" in stdout and "f.onnx: max abs err" in stdout
    manifest = Manifest.load(out)
    assert manifest.model_name == "tiny" and manifest.torch == {}
    assert manifest.provenance["commands"][-1].startswith("python -m export ") and "--k 3" in manifest.provenance[
        "commands"][-1]
    assert main(["verify", str(out)]) == 0


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here: the missing-TensorRT path cannot be exercised")
def test_trt_without_tensorrt_exits_nonzero_with_a_message(
    bundle_copy: Callable[[], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    copy = bundle_copy()
    before = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*"))
    assert main(["trt", str(copy), "--workers", "2"]) == EXIT_TENSORRT_MISSING
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and "pip install -e '.[gpu]'" in err
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == before  # no fake engine


def test_trt_on_a_non_bundle_fails_before_importing_tensorrt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trt", str(tmp_path)]) == 1
    assert "no manifest" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 17}, "opset must be an integer >= 18"),
        ({"exporter": "magic"}, "exporter must be one of"),
        ({"verify_samples": 4, "reference_samples": 8}, r"reference_samples must be in \[1, verify_samples=4\]"),
        ({"k": 0}, "k must be a positive integer"),
        ({"atol": -1.0}, "atol must be >= 0"),
    ],
)
def test_export_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ExportConfigError, match=message):
        ExportConfig(checkpoints=("c.pt",), out="b", **kwargs)


def test_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ExportConfigError, match=r"unknown key\(s\) \['opsett'\]"):
        ExportConfig.from_dict({"checkpoints": ["c.pt"], "out": "b", "opsett": 18})
    with pytest.raises(ExportConfigError, match="min_batch <= opt_batch <= max_batch"):
        TrtConfig(bundle="b", opt_batch=128, max_batch=64)
