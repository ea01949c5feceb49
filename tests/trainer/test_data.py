"""Dataset readers: shipped files, corrupted copies, seeded splits, normalisation."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    DatasetError,
    load_split,
    normalize,
    train_val_split,
)

# Per-class counts listed in /work/shared/data/README.md.
MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

needs_shipped = pytest.mark.skipif(
    not (DEFAULT_DATA_ROOT / "mnist").is_dir(),
    reason=f"shipped datasets not present at {DEFAULT_DATA_ROOT}",
)


def _pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Exact mean and std of pixel/255 from the 256-bin histogram (fast on 47M pixels)."""
    hist = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (hist * values).sum() / hist.sum()
    return mean, float(np.sqrt((hist * (values - mean) ** 2).sum() / hist.sum()))


@needs_shipped
def test_mnist_counts_and_histograms() -> None:
    x_train, y_train = load_split("mnist", "train")
    x_test, y_test = load_split("mnist", "test")
    assert x_train.shape == (60_000, 1, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10_000, 1, 28, 28)
    assert y_train.dtype == np.int64
    assert np.bincount(y_train, minlength=10).tolist() == MNIST_TRAIN_HIST
    assert np.bincount(y_test, minlength=10).tolist() == MNIST_TEST_HIST
    # README: mean pixel value train 33.318, test 33.791.
    np.testing.assert_allclose(_pixel_stats(x_train)[0] * 255, 33.318, atol=1e-3)
    np.testing.assert_allclose(_pixel_stats(x_test)[0] * 255, 33.791, atol=1e-3)
    # The spec's normalisation constants are the train split's statistics.
    spec = DATASETS["mnist"]
    mean01, std01 = _pixel_stats(x_train)
    np.testing.assert_allclose(mean01, spec.mean[0], atol=1e-4)
    np.testing.assert_allclose(std01, spec.std[0], atol=1e-4)


@needs_shipped
def test_fashion_mnist_counts_and_histograms() -> None:
    x_train, y_train = load_split("fashion-mnist", "train")
    x_test, y_test = load_split("fashion-mnist", "test")
    assert x_train.shape == (60_000, 1, 28, 28) and x_test.shape == (10_000, 1, 28, 28)
    assert np.bincount(y_train, minlength=10).tolist() == [6000] * 10
    assert np.bincount(y_test, minlength=10).tolist() == [1000] * 10
    spec = DATASETS["fashion-mnist"]
    mean01, std01 = _pixel_stats(x_train)
    np.testing.assert_allclose(mean01, spec.mean[0], atol=1e-4)
    np.testing.assert_allclose(std01, spec.std[0], atol=1e-4)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _tiny_idx_dir(root: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return root


def test_reads_tiny_idx_dir(tmp_path: Path) -> None:
    root = _tiny_idx_dir(tmp_path / "d")
    x, y = load_split("mnist", "test", root)
    assert x.shape == (20, 1, 28, 28)
    assert y.tolist() == [i % 10 for i in range(20)]


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    root = _tiny_idx_dir(tmp_path / "d")
    path = root / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz.*truncated or corrupt"):
        load_split("mnist", "train", root)


def test_truncated_shipped_copy_names_the_file(tmp_path: Path) -> None:
    src = DEFAULT_DATA_ROOT / "mnist" / "t10k-labels-idx1-ubyte.gz"
    if not src.is_file():
        pytest.skip(f"shipped dataset not present at {src}")
    root = _tiny_idx_dir(tmp_path / "d")
    (root / src.name).write_bytes(src.read_bytes()[:-100])  # cut the gzip trailer
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_split("mnist", "test", root)


def test_payload_shorter_than_header_says_so(tmp_path: Path) -> None:
    root = _tiny_idx_dir(tmp_path / "d")
    path = root / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as fh:  # valid gzip, IDX payload cut short
        fh.write(raw[:-28])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz.*header .* implies"):
        load_split("mnist", "test", root)


def test_wrong_magic_and_missing_file(tmp_path: Path) -> None:
    root = _tiny_idx_dir(tmp_path / "d")
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros((20, 28, 28)), 2051)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz.*magic 2051, expected 2049"):
        load_split("mnist", "test", root)
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing dataset file .*train-labels-idx1-ubyte\.gz"):
        load_split("mnist", "train", root)


def test_missing_dir_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist; expected a directory holding train-"):
        load_split("mnist", "train", tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"unknown dataset 'svhn'"):
        load_split("svhn", "train", tmp_path)
    with pytest.raises(DatasetError, match=r"split must be 'train' or 'test'"):
        load_split("mnist", "val", tmp_path)  # type: ignore[arg-type]


def test_cifar_reader_and_corrupt_batch(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": [0, 1, 2, 9]}
        (root / name).write_bytes(pickle.dumps(batch))
    x, y = load_split("cifar10", "train", tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.tolist() == [0, 1, 2, 9] * 5
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"test_batch"):
        load_split("cifar10", "test", tmp_path)


def test_train_val_split_is_seeded_and_disjoint() -> None:
    a_train, a_val = train_val_split(1000, 0.1, seed=3)
    b_train, b_val = train_val_split(1000, 0.1, seed=3)
    c_train, c_val = train_val_split(1000, 0.1, seed=4)
    np.testing.assert_array_equal(a_val, b_val)
    np.testing.assert_array_equal(a_train, b_train)
    assert not np.array_equal(a_val, c_val)
    assert len(a_val) == 100 and len(a_train) == 900
    assert np.intersect1d(a_train, a_val).size == 0
    np.testing.assert_array_equal(np.union1d(a_train, a_val), np.arange(1000))
    with pytest.raises(DatasetError, match=r"val_fraction must be in \[0, 1\)"):
        train_val_split(10, 1.0, seed=0)


def test_normalize_numpy_and_torch_agree() -> None:
    spec = DATASETS["cifar10"]
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    out_np = normalize(images, spec)
    out_t = normalize(torch.from_numpy(images), spec)
    assert out_np.dtype == np.float32 and out_t.dtype == torch.float32
    expected = (images / 255.0 - np.array(spec.mean)[:, None, None]) / np.array(spec.std)[:, None, None]
    np.testing.assert_allclose(out_np, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-6, atol=1e-6)


def test_shipped_dir_copy_is_readable(tmp_path: Path) -> None:
    """--data-dir pointing at a copy of the shipped test split works like the default."""
    src = DEFAULT_DATA_ROOT / "mnist"
    if not src.is_dir():
        pytest.skip(f"shipped dataset not present at {src}")
    dst = tmp_path / "mnist"
    dst.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(src / name, dst / name)
    x, y = load_split("mnist", "test", dst)
    assert x.shape == (10_000, 1, 28, 28) and len(y) == 10_000
