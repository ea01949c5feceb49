"""One bundle, several codes: `serve --coding N,K` picks the served code once, at start; the
server then answers, and describes itself, with that code only."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from runtime_harness import TASKS, ServerThread, TinyModel, build_tiny_bundle, random_images, server_config

from runtime.config import ServerConfig
from runtime.engine import Engine
from runtime.errors import ConfigError
from runtime.manifest import Manifest, ManifestError, verify_checksums
from runtime.serve import config_from_args, main

LOGIT_ATOL = 1e-3  # float32 ONNX vs the float64 reference, plus the decode's rounding


@pytest.fixture(scope="module")
def two_codes(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Schema 2: (3,2) first (the default), then (4,3); an exact encoder and ParM for each."""
    return build_tiny_bundle(tmp_path_factory.mktemp("two-codes"), codes=[(3, 2), (4, 3)])


def _get(url: str) -> dict:
    with urllib.request.urlopen(f"http://{url}", timeout=30) as response:
        return json.loads(response.read())


def _infer(url: str, images: np.ndarray) -> triton.InferResult:
    inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    return triton.InferenceServerClient(url).infer("tiny", [inp])


def test_the_bundle_holds_both_codes(two_codes: TinyModel) -> None:
    manifest = Manifest.load(two_codes.bundle)
    assert manifest.schema_version == 2 and manifest.code_labels() == ["3,2", "4,3"]
    assert [e.file for e in manifest.select_code(4, 3).encoders] == ["codes/n4k3/enc_0.onnx"]


def test_without_coding_the_first_code_is_served(two_codes: TinyModel) -> None:
    with ServerThread(server_config(two_codes.bundle, metrics_port=-1, grpc_port=-1)) as srv:
        params = _get(f"{srv.url}/v2/models/tiny")["parameters"]
        assert (params["n"], params["k"], params["workers"]) == (3, 2, 3)
        assert params["codes"] == ["3,2", "4,3"]


def test_coding_picks_the_second_code(two_codes: TinyModel) -> None:
    """Coded mode with (4,3): groups of 3, one straggler per group rebuilt from the parity by
    the (4,3) code's encoder (exact for the linear f, so every answer is checkable)."""
    config = server_config(two_codes.bundle, coding="4,3", fault_straggler_per_group=True,
                           fault_delay_ms=1500.0, fault_seed=3, max_queue_delay_ms=50.0)
    assert config.code == (4, 3)
    with ServerThread(config) as srv:
        assert srv.server is not None and srv.server.engine.manifest.code_labels() == ["4,3", "3,2"]
        params = _get(f"{srv.url}/v2/models/tiny")["parameters"]
        assert (params["n"], params["k"], params["workers"]) == (4, 3, 4)
        assert params["codes"] == ["4,3", "3,2"]  # the served code first
        triton_config = _get(f"{srv.url}/v2/models/tiny/config")
        assert triton_config["dynamic_batching"]["preferred_batch_size"] == [3]
        coded = {key: value["string_value"] for key, value in triton_config["parameters"].items()}
        assert (coded["n"], coded["k"], json.loads(coded["codes"])) == ("4", "3", ["4,3", "3,2"])
        for i in range(2):
            images = random_images(3, seed=400 + i)  # one full group of k = 3
            result = _infer(srv.url, images)
            assert result.as_numpy("reconstructed").sum() == 1  # decoded, the straggler not waited for
            assert result.get_response()["parameters"]["mode"] == "coded"
            reference = two_codes.logits(images)
            for task in TASKS:
                np.testing.assert_allclose(result.as_numpy(f"{task}_logits"), reference[task],
                                           atol=LOGIT_ATOL, rtol=0)


def test_parm_mode_uses_the_chosen_codes_parm(two_codes: TinyModel) -> None:
    config = server_config(two_codes.bundle, coding="4,3", mode="parm", fault_straggler_per_group=True,
                           fault_delay_ms=1000.0, metrics_port=-1, grpc_port=-1, max_queue_delay_ms=50.0)
    images = random_images(3, seed=800)  # one full group of k = 3
    with ServerThread(config) as srv:
        assert _get(f"{srv.url}/v2/models/tiny")["parameters"]["workers"] == 4  # k + 1
        result = _infer(srv.url, images)
    assert result.as_numpy("reconstructed").sum() == 1
    np.testing.assert_allclose(result.as_numpy("digit_logits"), two_codes.logits(images)["digit"],
                               atol=LOGIT_ATOL, rtol=0)


def test_a_code_not_in_the_bundle_is_refused_at_start(two_codes: TinyModel, tiny: TinyModel,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"--coding 6,4: the bundle has no code n=6, k=4; its codes "
                                          r"\(n,k\): 3,2, 4,3"):
        Engine(server_config(two_codes.bundle, coding="6,4"))
    with pytest.raises(ConfigError, match=r"no code n=4, k=3; its codes \(n,k\): 3,2$"):
        Engine(server_config(tiny.bundle, coding="4,3"))  # a schema-1 bundle: its one code
    assert Engine(server_config(tiny.bundle, coding="3,2")).manifest.code_labels() == ["3,2"]
    argv = [str(two_codes.bundle), "--coding", "5,4", "--http-port", "0", "--metrics-port", "-1",
            "--grpc-port", "-1"]
    assert main(argv) == 1
    assert "no code n=5, k=4; its codes (n,k): 3,2, 4,3" in caplog.text


@pytest.mark.parametrize("value", ["5", "5;4", "4,5", "n,k"])
def test_a_malformed_coding_is_a_config_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"--coding: a code is named N,K with integers N >= K >= 1"):
        ServerConfig.from_dict({"bundle": "b", "coding": value})
    assert main(["b", "--coding", value]) == 2
    assert "--coding: a code is named N,K" in capsys.readouterr().err


def test_coding_flag_reaches_the_config() -> None:
    assert config_from_args(["b", "--coding", "6,4"]).code == (6, 4)
    assert config_from_args(["b"]).coding is None and config_from_args(["b"]).code is None


def test_serve_help_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--coding CODING" in capsys.readouterr().out


def test_a_schema_1_manifest_still_loads_as_one_code() -> None:
    """The shipped bundle's manifest before it was re-exported as schema 2 (tests/runtime/data)."""
    bundle = Path(__file__).resolve().parent / "data" / "schema1-bundle"
    assert json.loads((bundle / "manifest.json").read_text())["schema_version"] == 1
    manifest = Manifest.load(bundle)
    assert manifest.code_labels() == ["5,4"] and manifest.parm == "parm.onnx"
    assert [e.file for e in manifest.encoders] == ["encoders/enc_0.onnx"]


def test_only_the_served_codes_files_are_read(two_codes: TinyModel, tmp_path: Path) -> None:
    """A code not served costs nothing at start: its files are neither read nor checked (so a
    bundle missing one still serves the others), while `--coding` of that code, and the
    whole-bundle check `export verify` relies on, name the missing file."""
    bundle = tmp_path / "bundle"
    shutil.copytree(two_codes.bundle, bundle)
    (bundle / "codes/n4k3/enc_0.onnx").unlink()
    manifest = Manifest.load(bundle)
    assert "codes/n4k3/enc_0.onnx" not in manifest.served_files()
    assert "codes/n3k2/enc_0.onnx" in manifest.served_files()
    assert "codes/n4k3/enc_0.onnx" in manifest.select_code(4, 3).served_files()

    engine = Engine(server_config(bundle))
    engine.load_bundle()
    assert engine.models is not None
    assert "codes/n4k3/enc_0.onnx" not in engine.models.files
    assert set(engine.models.files) == set(manifest.served_files())
    with pytest.raises(ManifestError, match=r"codes/n4k3/enc_0.onnx: missing"):
        Engine(server_config(bundle, coding="4,3")).load_bundle()
    with pytest.raises(ManifestError, match=r"codes/n4k3/enc_0.onnx: missing"):
        verify_checksums(bundle, manifest)
