"""GPU engines: clear errors where they cannot run (the torch engine end to end on a GPU is
tests/runtime/test_gpu_serving.py, on the shipped bundle)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_harness import TinyModel

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
