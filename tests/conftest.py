"""Test tiers: the default tier runs on a 2-core CPU; `slow` needs --run-slow; `gpu` needs CUDA;
`mnist` needs the shipped MNIST files beside the checkout (../shared/data/mnist)."""

from __future__ import annotations

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
