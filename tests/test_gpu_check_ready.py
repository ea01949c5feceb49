"""What bench/gpu_check.sh needs from a machine that has only torch, numpy, pytest and the
carried wheels: its test files collect without tritonclient, onnx or pytest-asyncio, and the
packaging names a TensorRT distribution that provides `import tensorrt`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TEST_FILES = ["tests/kernels", "tests/runtime/test_gpu_serving.py"]  # as gpu_check.sh runs them


def test_the_gpu_check_tests_collect_without_tritonclient_or_onnx(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for module in ("tritonclient", "onnx", "pytest_asyncio"):  # absent on the GPU image
        (blocked / f"{module}.py").write_text(f"raise ImportError('{module} is not on this machine')\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio",
         "-W", "ignore::pytest.PytestConfigWarning", *GPU_TEST_FILES],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": f"{blocked}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "test_coded_on_gpu_streams_survives_a_killed_worker_on_mnist" in result.stdout


def test_the_tensorrt_extra_installs_the_tensorrt_module() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    every = [spec for specs in extras.values() for spec in specs]
    # tensorrt-cuXX-bindings' module is `tensorrt_bindings`: `import tensorrt` would fail
    assert not [spec for spec in every if "-bindings" in spec]
    assert any(spec.startswith("tensorrt-cu") for spec in extras["tensorrt"])
    assert "https://pypi.nvidia.com" in (REPO / "pyproject.toml").read_text()
