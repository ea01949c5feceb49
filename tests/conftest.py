"""Test tiers: the default tier runs on a 2-core CPU; `slow` needs --run-slow; `gpu` needs CUDA;
`mnist` needs the shipped MNIST files beside the checkout (../shared/data/mnist)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def _cuda_device_reason() -> str | None:
    """Why GPU tests cannot run here, or None when an NVIDIA GPU is usable."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return None
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() > 0:
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable GPU"
        return f"no CUDA GPU usable ({type(exc).__name__}: {exc})"
    return "no CUDA GPU on this machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    gpu_reason: str | None = None
    gpu_checked = False
    from trainer.data import DEFAULT_DATA_ROOT

    mnist_missing = not (DEFAULT_DATA_ROOT / "mnist").is_dir()
    for item in items:
        if "mnist" in item.keywords and mnist_missing:
            item.add_marker(pytest.mark.skip(reason=f"shipped MNIST not present at {DEFAULT_DATA_ROOT / 'mnist'}"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: pass --run-slow to run it"))
        if "gpu" in item.keywords:
            if not gpu_checked:
                gpu_reason, gpu_checked = _cuda_device_reason(), True
            if gpu_reason is not None:
                item.add_marker(pytest.mark.skip(reason=gpu_reason))


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-MNIST data dir cut down to 200 train / 100 test images (tests marked `mnist`)."""
    from trainer.data import load_split

    root = tmp_path_factory.mktemp("mnist-small")
    for split, prefix, n in (("train", "train", 200), ("test", "t10k", 100)):
        x, y = load_split("mnist", split)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x[:n, 0], 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y[:n], 2049)
    return root
