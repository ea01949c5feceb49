"""GPU engines: clear errors where they cannot run; the torch engine end to end on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from runtime_harness import CHW, EMB, ServerThread, TinyModel, build_tiny_bundle, random_images, server_config

from runtime.manifest import sha256_file
from runtime.serve import main


def test_tensorrt_engine_without_tensorrt_fails_clearly(tiny: TinyModel,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here; the error path cannot be exercised")
    code = main([str(tiny.bundle), "--engine", "tensorrt", "--device", "cuda",
                 "--http-port", "0", "--metrics-port", "-1"])
    assert code == 1
    assert "--engine tensorrt needs" in caplog.text


def test_torch_engine_without_program_fails_clearly(tiny: TinyModel,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    code = main([str(tiny.bundle), "--engine", "torch", "--device", "cuda",
                 "--http-port", "0", "--metrics-port", "-1"])
    assert code == 1
    assert "--engine torch needs" in caplog.text


def _add_torch_program(bundle: Path, A: np.ndarray) -> None:
    """torch/f.pt2 computing the same linear f as f.onnx, with a dynamic batch dim."""
    torch = pytest.importorskip("torch")

    class LinearF(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("A", torch.tensor(A, dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.reshape(x.shape[0], -1) @ self.A).reshape(x.shape[0], *EMB)

    example = torch.zeros(2, *CHW)
    program = torch.export.export(LinearF().eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = bundle / "torch" / "f.pt2"
    path.parent.mkdir(exist_ok=True)
    torch.export.save(program, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["torch"] = {"f": "torch/f.pt2"}
    manifest["files"]["torch/f.pt2"] = sha256_file(path)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.gpu
def test_torch_engine_on_cuda_serves_exact_labels(tmp_path: Path) -> None:
    tiny = build_tiny_bundle(tmp_path)
    _add_torch_program(tmp_path, tiny.A)
    images = random_images(6, seed=9)
    config = server_config(tmp_path, engine="torch", device="cuda", metrics_port=-1)
    with ServerThread(config, ready_timeout_s=180) as srv:
        client = triton.InferenceServerClient(srv.url)
        inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        result = client.infer("tiny", [inp])
    reference = tiny.logits(images)["digit"]
    np.testing.assert_allclose(result.as_numpy("digit_logits"), reference, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(result.as_numpy("digit_class"), reference.argmax(axis=1))


def test_gpu_decoding_falls_back_to_the_host_where_cuda_is_missing(
        caplog: pytest.LogCaptureFixture) -> None:
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pycuda is installed here; the fallback path cannot be exercised")
    from kernels.coding import CodingScheme
    from runtime.gpu_decode import make_device_decoders, to_host

    assert make_device_decoders(CodingScheme.average(2)) is None
    assert "decoding on the host instead" in caplog.text
    array = np.ones(3, np.float32)
    assert to_host(array) is array
