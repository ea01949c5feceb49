"""Shared trainer fixtures: a cut-down real-MNIST data directory."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from trainer.data import load_split


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-MNIST data dir cut down to 200 train / 100 test images."""
    root = tmp_path_factory.mktemp("mnist-small")
    for split, prefix, n in (("train", "train", 200), ("test", "t10k", 100)):
        x, y = load_split("mnist", split)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x[:n, 0], 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y[:n], 2049)
    return root
