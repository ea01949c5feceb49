"""Offline readers for MNIST / Fashion-MNIST (IDX .gz) and CIFAR-10 (`cifar-10-batches-py`).

Nothing here downloads: the files must already be on disk, by default under
`<repo>/../shared/data/<name>/` (see that directory's README). Every failure names the file
and the layout that was expected, so a user can fix the directory instead of guessing.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from trainer.errors import DatasetError

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT_ENV = "CODED_INVNET_DATA"  # a machine whose datasets are elsewhere (the GPU check's)
DEFAULT_DATA_ROOT = Path(os.environ.get(DATA_ROOT_ENV) or _REPO_ROOT.parent / "shared" / "data")

Split = Literal["train", "test"]


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset; mean/std are per channel, of the train split in [0, 1]."""

    name: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    layout: str  # human description of the files expected in the data dir

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_IDX_LAYOUT = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (standard IDX, gzip)"
)

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        image_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(d) for d in range(10)),
        layout=_IDX_LAYOUT,
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        image_shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        layout=_IDX_LAYOUT,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        image_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        layout="cifar-10-batches-py/{data_batch_1..5, test_batch} (python pickles), "
        "either directly in the data dir or in a cifar-10-batches-py/ subdirectory",
    ),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGE_MAGIC = 2051
_IDX_LABEL_MAGIC = 2049


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def resolve_data_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """`data_dir` if given, else `../shared/data/<name>` relative to the repository."""
    spec = get_spec(name)
    path = Path(data_dir) if data_dir is not None else DEFAULT_DATA_ROOT / name
    if not path.is_dir():
        raise DatasetError(
            f"{name} data directory {str(path)!r} does not exist; expected a directory holding "
            f"{spec.layout}. Pass --data-dir, or put the files under {DEFAULT_DATA_ROOT / name}. "
            "Nothing is downloaded at run time."
        )
    return path


def _read_gz(path: Path, layout: str) -> bytes:
    if not path.is_file():
        raise DatasetError(f"missing dataset file {str(path)!r}; expected {layout}")
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot decompress {str(path)!r} ({type(exc).__name__}: {exc}); the file is "
            f"truncated or corrupt. Expected {layout}; replace it with an intact copy."
        ) from exc


def _parse_idx(raw: bytes, path: Path, magic: int, ndim: int) -> np.ndarray:
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DatasetError(
            f"{str(path)!r} is too short for an IDX header ({len(raw)} bytes, need {header_bytes})"
        )
    got_magic = struct.unpack(">i", raw[:4])[0]
    if got_magic != magic:
        raise DatasetError(
            f"{str(path)!r} has IDX magic {got_magic}, expected {magic} "
            f"({'images' if magic == _IDX_IMAGE_MAGIC else 'labels'}); wrong or corrupt file"
        )
    dims = struct.unpack(">" + "i" * ndim, raw[4:header_bytes])
    expected = int(np.prod(dims)) + header_bytes
    if len(raw) != expected:
        raise DatasetError(
            f"{str(path)!r} holds {len(raw)} bytes after decompression but its header "
            f"{dims} implies {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims)


def _load_idx(spec: DatasetSpec, split: Split, root: Path) -> tuple[np.ndarray, np.ndarray]:
    image_name, label_name = _IDX_FILES[split]
    image_path, label_path = root / image_name, root / label_name
    images = _parse_idx(_read_gz(image_path, spec.layout), image_path, _IDX_IMAGE_MAGIC, 3)
    labels = _parse_idx(_read_gz(label_path, spec.layout), label_path, _IDX_LABEL_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{str(image_path)!r} has {images.shape[0]} images but {str(label_path)!r} has "
            f"{labels.shape[0]} labels; the files do not belong together"
        )
    if images.shape[1:] != spec.image_shape[1:]:
        raise DatasetError(
            f"{str(image_path)!r} holds images of {images.shape[1:]}, expected "
            f"{spec.image_shape[1:]} for {spec.name}"
        )
    if labels.size and int(labels.max()) >= spec.num_classes:
        raise DatasetError(
            f"{str(label_path)!r} has label {int(labels.max())}, expected < {spec.num_classes}"
        )
    return images[:, None, :, :].copy(), labels.astype(np.int64)  # (N, 1, H, W)


def _load_cifar(spec: DatasetSpec, split: Split, root: Path) -> tuple[np.ndarray, np.ndarray]:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise DatasetError(f"missing dataset file {str(path)!r}; expected {spec.layout}")
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise DatasetError(
                f"cannot read CIFAR-10 batch {str(path)!r} ({type(exc).__name__}: {exc}); "
                f"expected {spec.layout}"
            ) from exc
        if data.shape[0] != lab.shape[0]:
            raise DatasetError(f"{str(path)!r}: {data.shape[0]} images vs {lab.shape[0]} labels")
        images.append(data)
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def load_split(
    name: str, split: Split, data_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, C, H, W) and labels int64 (N,) of one split; never downloads."""
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    spec = get_spec(name)
    root = resolve_data_dir(name, data_dir)
    if name == "cifar10":
        images, labels = _load_cifar(spec, split, root)
    else:
        images, labels = _load_idx(spec, split, root)
    logger.info("loaded %s/%s from %s: %d examples", name, split, root, len(labels))
    return images, labels


def train_val_split(
    num_examples: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, reproducible permutation split: (train_idx, val_idx), both sorted int64."""
    if num_examples < 1:
        raise DatasetError(f"num_examples must be >= 1, got {num_examples}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(num_examples)
    num_val = int(round(num_examples * val_fraction))
    return np.sort(perm[num_val:]).astype(np.int64), np.sort(perm[:num_val]).astype(np.int64)


def normalize(images_uint8, spec: DatasetSpec):
    """(x/255 - mean) / std per channel, float32; numpy in -> numpy out, torch in -> torch out."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    if isinstance(images_uint8, np.ndarray):
        return ((images_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    import torch

    if isinstance(images_uint8, torch.Tensor):
        x = images_uint8.to(torch.float32) / 255.0
        return (x - torch.from_numpy(mean).to(x.device)) / torch.from_numpy(std).to(x.device)
    raise DatasetError(
        f"normalize expects a numpy array or torch tensor, got {type(images_uint8).__name__}"
    )
