"""The bundle contract, in one place: `manifest.json`'s schema, the bundle's file layout,
the ONNX tensor names, the TensorRT engine directories and the served output names.

Export writes bundles through it, the runtime reads them through it, and bench measures
them through it; no other module spells one of these names. Pure Python + the standard
library, so a torch-free serving install can load it. Every field is validated on load;
unknown keys are errors, so a typo in a hand-edited manifest fails loudly instead of
being ignored. docs/ARCHITECTURE.md shows the layout.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernels.configs import check_keys

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ACCEPTED_DTYPES = ("UINT8", "FP32")
INPUT_NAME = "INPUT"  # the served input tensor of the bundles export writes

# -- file layout (relative to the bundle directory) -----------------------------------------
F_FILE = "f.onnx"
PARM_FILE = "parm.onnx"
TORCH_F_FILE = "torch/f.pt2"  # torch.export program of f (--engine torch)
REFERENCE_FILE = "verification/reference.npz"  # export-time inputs and PyTorch outputs
ENGINES_DIR = "engines"  # TensorRT plans, one directory per (GPU, TensorRT version)


def head_file(task: str) -> str:
    return f"heads/{task}.onnx"


def encoder_file(row: int) -> str:
    return f"encoders/enc_{row}.onnx"


def engine_dir(capability: tuple[int, int], trt_version: str) -> str:
    """`engines/sm90_trt10.13.0`: a plan only runs on the compute capability and TensorRT
    version that built it."""
    return f"{ENGINES_DIR}/sm{capability[0]}{capability[1]}_trt{trt_version}"


def plan_file(onnx_file: str, capability: tuple[int, int], trt_version: str) -> str:
    """The TensorRT plan built from a bundle ONNX file: same path under engine_dir, `.plan`."""
    return f"{engine_dir(capability, trt_version)}/{Path(onnx_file).with_suffix('.plan').as_posix()}"


# -- ONNX tensor names: (input, output) per kind of model file --------------------------------
BATCH_DIM = "batch"  # the dynamic leading dimension of every tensor
F_IO = ("x", "z")  # f: x [B, C, H, W] -> z [B, *embedding_shape]
HEAD_IO = ("z", "logits")  # g: z -> logits [B, classes]
ENCODER_IO = ("x", "x_parity")  # Enc_r: x [B, k, C, H, W] -> x_parity [B, C, H, W]
PARM_IO = ("x", "logits_sum")  # ParM: x [B, k, C, H, W] -> logits_sum [B, classes]

# -- served tensors (KServe v2 / Triton names) -------------------------------------------------
RECONSTRUCTED_OUTPUT = "reconstructed"  # BOOL [B]: decoded from coded results


def logits_output(task: str) -> str:
    return f"{task}_logits"  # FP32 [B, classes]


def class_output(task: str) -> str:
    return f"{task}_class"  # INT64 [B], argmax; -1 where the head is unavailable


class ManifestError(ValueError):
    """A bundle's manifest is missing, malformed, or does not match its files."""


def _check_keys(where: str, data: Any, required: set[str], optional: set[str]) -> None:
    check_keys(where, data, required | optional, required, ManifestError)


def _positive_ints(where: str, values: Any) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ManifestError(f"{where}: expected a non-empty list of positive integers, got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ManifestError(f"{where}: expected positive integers, got {values!r}")
    return tuple(values)


def _relative_file(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: expected a relative file path, got {value!r}")
    path = Path(value)
    if path.is_absolute() or ".." in path.parts:
        raise ManifestError(f"{where}: file paths must stay inside the bundle, got {value!r}")
    return value


@dataclass(frozen=True)
class Preprocessing:
    """raw01 = uint8 / 255 (or FP32 already in [0, 1]); x = (raw01 - mean) / std per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ManifestError(
                f"input.preprocessing: mean and std need one value per channel, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if not all(isinstance(s, (int, float)) and s > 0 and math.isfinite(s) for s in self.std):
            raise ManifestError(f"input.preprocessing.std must be finite and > 0, got {self.std}")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # per query, without the batch dim: (C, H, W)
    accepted_dtypes: tuple[str, ...]
    preprocessing: Preprocessing

    def __post_init__(self) -> None:
        bad = set(self.accepted_dtypes) - set(ACCEPTED_DTYPES)
        if not self.accepted_dtypes or bad:
            raise ManifestError(
                f"input.accepted_dtypes must be a non-empty subset of {ACCEPTED_DTYPES}, "
                f"got {list(self.accepted_dtypes)}"
            )
        if len(self.preprocessing.mean) != self.shape[0]:
            raise ManifestError(
                f"input.preprocessing has {len(self.preprocessing.mean)} channel(s) "
                f"but input.shape {list(self.shape)} has {self.shape[0]}"
            )


@dataclass(frozen=True)
class HeadSpec:
    task: str
    file: str
    classes: tuple[str, ...]


@dataclass(frozen=True)
class CodingSpec:
    """Generator = I_k stacked over `coefficients` ((n-k) x k); see kernels.coding."""

    n: int
    k: int
    coefficients: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and isinstance(self.n, int) and 1 <= self.k <= self.n):
            raise ManifestError(f"coding: need integers 1 <= k <= n, got n={self.n}, k={self.k}")
        rows = self.coefficients
        if len(rows) != self.n - self.k or any(len(r) != self.k for r in rows):
            raise ManifestError(
                f"coding.coefficients must be {self.n - self.k} x {self.k} for n={self.n}, "
                f"k={self.k}, got {[len(r) for r in rows]} row length(s)"
            )
        if not all(math.isfinite(c) for r in rows for c in r):
            raise ManifestError("coding.coefficients must be finite numbers")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "coefficients": [list(r) for r in self.coefficients]}


@dataclass(frozen=True)
class EncoderSpec:
    row: int
    file: str


@dataclass(frozen=True)
class Manifest:
    model_name: str
    input: InputSpec
    embedding_shape: tuple[int, ...]
    f: str
    heads: tuple[HeadSpec, ...]
    coding: CodingSpec
    encoders: tuple[EncoderSpec, ...]
    files: dict[str, str]
    parm: str | None = None
    torch: dict[str, str] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version is {self.schema_version!r}, this runtime reads "
                f"version {SCHEMA_VERSION}; re-export the bundle with this version's `python -m export`"
            )
        if not self.heads:
            raise ManifestError("heads: a bundle needs at least one head")
        tasks = [h.task for h in self.heads]
        if len(set(tasks)) != len(tasks):
            raise ManifestError(f"heads: task names must be unique, got {tasks}")
        if math.prod(self.embedding_shape) != math.prod(self.input.shape):
            raise ManifestError(
                f"embedding_shape {list(self.embedding_shape)} must hold as many elements as "
                f"input.shape {list(self.input.shape)} (f is a bijection, no injective padding)"
            )
        rows = sorted(e.row for e in self.encoders)
        if self.encoders and rows != list(range(self.coding.n - self.coding.k)):
            raise ManifestError(
                f"encoders: need exactly one encoder per parity row 0..{self.coding.n - self.coding.k - 1}, "
                f"got rows {rows}"
            )
        unlisted = [p for p in self.model_files() if p not in self.files]
        if unlisted:
            raise ManifestError(f"files: no sha256 recorded for {unlisted}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        _check_keys(
            "manifest",
            data,
            required={"schema_version", "model_name", "input", "embedding_shape", "f", "heads",
                      "coding", "encoders", "files"},
            optional={"parm", "torch", "verification", "provenance"},
        )
        version = data["schema_version"]
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version is {version!r}, this runtime reads version "
                f"{SCHEMA_VERSION}; re-export the bundle with this version's `python -m export`"
            )
        inp = data["input"]
        _check_keys("input", inp, {"name", "shape", "accepted_dtypes", "preprocessing"}, set())
        pre = inp["preprocessing"]
        _check_keys("input.preprocessing", pre, {"mean", "std"}, set())
        heads = data["heads"]
        if not isinstance(heads, list):
            raise ManifestError(f"heads: expected a list, got {type(heads).__name__}")
        for i, head in enumerate(heads):
            _check_keys(f"heads[{i}]", head, {"task", "file", "classes"}, set())
        coding = data["coding"]
        _check_keys("coding", coding, {"n", "k", "coefficients"}, set())
        encoders = data["encoders"]
        if not isinstance(encoders, list):
            raise ManifestError(f"encoders: expected a list, got {type(encoders).__name__}")
        for i, enc in enumerate(encoders):
            _check_keys(f"encoders[{i}]", enc, {"row", "file"}, set())
        files = data["files"]
        if not isinstance(files, Mapping) or not all(
            isinstance(v, str) and len(v) == 64 for v in files.values()
        ):
            raise ManifestError("files: expected an object mapping relative path -> sha256 hex digest")
        torch_files = data.get("torch") or {}
        if not isinstance(torch_files, Mapping):
            raise ManifestError("torch: expected an object mapping model name -> file")
        try:
            return cls(
                schema_version=version,
                model_name=str(data["model_name"]),
                input=InputSpec(
                    name=str(inp["name"]),
                    shape=_positive_ints("input.shape", inp["shape"]),
                    accepted_dtypes=tuple(inp["accepted_dtypes"]),
                    preprocessing=Preprocessing(
                        mean=tuple(float(v) for v in pre["mean"]),
                        std=tuple(float(v) for v in pre["std"]),
                    ),
                ),
                embedding_shape=_positive_ints("embedding_shape", data["embedding_shape"]),
                f=_relative_file("f", data["f"]),
                heads=tuple(
                    HeadSpec(
                        task=str(h["task"]),
                        file=_relative_file(f"heads[{i}].file", h["file"]),
                        classes=tuple(str(c) for c in h["classes"]),
                    )
                    for i, h in enumerate(heads)
                ),
                coding=CodingSpec(
                    n=coding["n"],
                    k=coding["k"],
                    coefficients=tuple(tuple(float(c) for c in row) for row in coding["coefficients"]),
                ),
                encoders=tuple(
                    EncoderSpec(row=int(e["row"]), file=_relative_file(f"encoders[{i}].file", e["file"]))
                    for i, e in enumerate(encoders)
                ),
                files={_relative_file("files", k): v for k, v in files.items()},
                parm=None if data.get("parm") is None else _relative_file("parm", data["parm"]),
                torch={str(k): _relative_file(f"torch.{k}", v) for k, v in torch_files.items()},
                verification=dict(data.get("verification") or {}),
                provenance=dict(data.get("provenance") or {}),
            )
        except (TypeError, KeyError) as exc:  # wrong JSON types deep inside a field
            raise ManifestError(f"manifest: malformed field ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def load(cls, bundle_dir: str | Path) -> Manifest:
        path = Path(bundle_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(
                f"{path}: no manifest; a bundle directory is made by `python -m export CHECKPOINT... --out DIR`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), so `from_dict(to_dict())` round-trips."""
        return json.loads(json.dumps(asdict(self)))

    def dump(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    # -- queries ----------------------------------------------------------------------------------
    @property
    def primary_head(self) -> HeadSpec:
        return self.heads[0]

    def io_names(self) -> dict[str, tuple[str, str]]:
        """(input, output) ONNX tensor names of every ONNX file in the bundle."""
        names = {self.f: F_IO}
        names.update({h.file: HEAD_IO for h in self.heads})
        names.update({e.file: ENCODER_IO for e in self.encoders})
        if self.parm is not None:
            names[self.parm] = PARM_IO
        return names

    def output_names(self) -> list[str]:
        """The served outputs, in the order responses list them."""
        return [*(n for h in self.heads for n in (logits_output(h.task), class_output(h.task))),
                RECONSTRUCTED_OUTPUT]

    def model_files(self) -> list[str]:
        """Every model file the manifest points at (each must have a checksum)."""
        paths = [self.f, *(h.file for h in self.heads), *(e.file for e in self.encoders)]
        if self.parm is not None:
            paths.append(self.parm)
        paths.extend(self.torch.values())
        return paths


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_files(bundle_dir: str | Path, manifest: Manifest, verify: bool = True) -> dict[str, bytes]:
    """Every file the manifest lists, read once; with `verify`, the bytes read are the bytes
    checked against their sha256, so whoever serves from these bytes serves what was
    verified even if a file is swapped on disk later. Raises ManifestError naming every
    file that is missing or differs."""
    root = Path(bundle_dir)
    files = {rel: (root / rel).read_bytes() for rel in sorted(manifest.files)
             if (root / rel).is_file()}
    check_files(manifest, files, f"bundle {root}", verify)
    return files


def check_files(manifest: Manifest, files: Mapping[str, bytes], where: str,
                verify: bool = True) -> None:
    """Raise ManifestError naming every manifest file missing from `files` or (with
    `verify`) whose bytes' sha256 differs; `where` names their origin in the message."""
    problems = []
    for rel, expected in sorted(manifest.files.items()):
        data = files.get(rel)
        if data is None:
            problems.append(f"{rel}: missing")
        elif verify and (actual := hashlib.sha256(data).hexdigest()) != expected:
            problems.append(f"{rel}: sha256 {actual[:12]}… != manifest {expected[:12]}…")
    if problems:
        raise ManifestError(
            f"{where} does not match its manifest: " + "; ".join(problems)
            + ". Re-export it with `python -m export`, or restore the original files."
        )


def verify_checksums(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Raise ManifestError naming every file that is missing or whose sha256 differs."""
    read_files(bundle_dir, manifest, verify=True)
