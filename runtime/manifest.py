"""The bundle contract, in one place: `manifest.json`'s schema, the bundle's file layout,
the ONNX tensor names, the TensorRT engine directories and the served output names.

Export writes bundles through it, the runtime reads them through it, and bench measures
them through it; no other module spells one of these names. Pure Python + the standard
library, so a torch-free serving install can load it. Every field is validated on load;
unknown keys are errors, so a typo in a hand-edited manifest fails loudly instead of
being ignored. docs/ARCHITECTURE.md shows the layout.

A bundle holds one f and its heads, and one or more *codes* (coding schemes (n, k) with the
encoders and the ParM that serve them, all trained against that f); the first code is the
one served unless another is selected (`Manifest.select_code`, `serve --coding N,K`).
Schema version 1 held exactly one code at the top level (`coding`, `encoders`, `parm`); such
manifests are still read, as a version-2 manifest with that one code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernels.configs import check_keys

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # what export writes: a list of codes
READABLE_VERSIONS = (1, 2)  # version 1 (one code at the top level) is read as one code
MANIFEST_NAME = "manifest.json"
ACCEPTED_DTYPES = ("UINT8", "FP32")
INPUT_NAME = "INPUT"  # the served input tensor of the bundles export writes

# -- file layout (relative to the bundle directory) -----------------------------------------
F_FILE = "f.onnx"
CODES_DIR = "codes"  # one folder per code: codes/n5k4/enc_0.onnx, codes/n5k4/parm.onnx
TORCH_F_FILE = "torch/f.pt2"  # torch.export program of f (--engine torch)
REFERENCE_FILE = "verification/reference.npz"  # export-time inputs and PyTorch outputs
ENGINES_DIR = "engines"  # TensorRT plans, one directory per (GPU, TensorRT version)


def head_file(task: str) -> str:
    return f"heads/{task}.onnx"


def code_label(n: int, k: int) -> str:
    """How a code is named on the command line and in the server's metadata: `"5,4"`."""
    return f"{n},{k}"


def parse_code_label(text: str) -> tuple[int, int]:
    """`"5,4"` -> (5, 4); ManifestError for anything that is not two integers n >= k >= 1."""
    parts = str(text).split(",")
    try:
        n, k = (int(p.strip()) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        n, k = 0, 0
    if not 1 <= k <= n:
        raise ManifestError(f"a code is named N,K with integers N >= K >= 1 (e.g. 5,4), got {text!r}")
    return n, k


def code_dir(n: int, k: int) -> str:
    """The folder of one code's models: `codes/n5k4`."""
    return f"{CODES_DIR}/n{n}k{k}"


def code_encoder_file(n: int, k: int, row: int) -> str:
    """Parity row `row`'s encoder of code (n, k): `codes/n5k4/enc_0.onnx`."""
    return f"{code_dir(n, k)}/enc_{row}.onnx"


def code_parm_file(n: int, k: int) -> str:
    """The ParM of code (n, k): `codes/n5k4/parm.onnx`."""
    return f"{code_dir(n, k)}/parm.onnx"


# Schema-1 layout (one code, bundles exported before several codes; their manifests name
# these paths, so they keep loading): encoders/enc_<r>.onnx and parm.onnx.
PARM_FILE = "parm.onnx"


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
class CodeSpec:
    """One code of the bundle: its coding scheme, the encoders of its parity rows (coded
    mode; none = the code serves the other modes only) and an optional ParM for its k."""

    coding: CodingSpec
    encoders: tuple[EncoderSpec, ...] = ()
    parm: str | None = None

    def __post_init__(self) -> None:
        rows = sorted(e.row for e in self.encoders)
        parities = self.coding.n - self.coding.k
        if self.encoders and rows != list(range(parities)):
            raise ManifestError(
                f"encoders: need exactly one encoder per parity row 0..{parities - 1}, got rows {rows}"
            )

    @property
    def n(self) -> int:
        return self.coding.n

    @property
    def k(self) -> int:
        return self.coding.k

    @property
    def label(self) -> str:
        return code_label(self.n, self.k)

    def model_files(self) -> list[str]:
        return [*(e.file for e in self.encoders), *([] if self.parm is None else [self.parm])]

    def to_dict(self) -> dict[str, Any]:
        return {**self.coding.to_dict(),
                "encoders": [{"row": e.row, "file": e.file} for e in self.encoders],
                "parm": self.parm}

    @classmethod
    def from_dict(cls, where: str, data: Any) -> CodeSpec:
        """A version-2 `codes[i]` entry; `where` prefixes error messages ("" for the top
        level of a version-1 manifest, whose fields are named as they were)."""
        prefix = f"{where}: " if where else ""
        try:
            _check_keys(where or "coding", data, {"n", "k", "coefficients", "encoders"}, {"parm"})
            encoders = data["encoders"]
            if not isinstance(encoders, list):
                raise ManifestError(f"encoders: expected a list, got {type(encoders).__name__}")
            for i, enc in enumerate(encoders):
                _check_keys(f"encoders[{i}]", enc, {"row", "file"}, set())
            return cls(
                coding=CodingSpec(
                    n=data["n"],
                    k=data["k"],
                    coefficients=tuple(tuple(float(c) for c in row) for row in data["coefficients"]),
                ),
                encoders=tuple(
                    EncoderSpec(row=int(e["row"]), file=_relative_file(f"encoders[{i}].file", e["file"]))
                    for i, e in enumerate(encoders)
                ),
                parm=None if data.get("parm") is None else _relative_file("parm", data["parm"]),
            )
        except ManifestError as exc:
            if not prefix or str(exc).startswith(where):
                raise
            raise ManifestError(f"{prefix}{exc}") from exc
        except (TypeError, KeyError, ValueError) as exc:  # wrong JSON types inside the code
            raise ManifestError(f"{where or 'coding'}: malformed field ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class Manifest:
    model_name: str
    input: InputSpec
    embedding_shape: tuple[int, ...]
    f: str
    heads: tuple[HeadSpec, ...]
    codes: tuple[CodeSpec, ...]  # the first is the one served (see select_code)
    files: dict[str, str]
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
        if not self.codes:
            raise ManifestError("codes: a bundle needs at least one code {n, k, coefficients, encoders, parm}")
        labels = [c.label for c in self.codes]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ManifestError(
                f"codes: (n, k) {', '.join(repeated)} appear(s) more than once ({labels}); each code "
                "of a bundle needs its own (n, k)"
            )
        unlisted = [p for p in self.model_files() if p not in self.files]
        if unlisted:
            raise ManifestError(f"files: no sha256 recorded for {unlisted}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """A version-2 manifest, or a version-1 one (read as its one code)."""
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        common = {"schema_version", "model_name", "input", "embedding_shape", "f", "heads", "files"}
        optional = {"torch", "verification", "provenance"}
        if version == 1:
            _check_keys("manifest", data, required=common | {"coding", "encoders"}, optional=optional | {"parm"})
            _check_keys("coding", data["coding"], {"n", "k", "coefficients"}, set())
            codes = (CodeSpec.from_dict("", {**data["coding"], "encoders": data["encoders"],
                                             "parm": data.get("parm")}),)
            logger.debug("manifest schema_version 1: read as its one code %s", codes[0].label)
        elif version == SCHEMA_VERSION:
            _check_keys("manifest", data, required=common | {"codes"}, optional=optional)
            if not isinstance(data["codes"], list):
                raise ManifestError(f"codes: expected a list, got {type(data['codes']).__name__}")
            codes = tuple(CodeSpec.from_dict(f"codes[{i}]", c) for i, c in enumerate(data["codes"]))
        else:
            raise ManifestError(
                f"manifest schema_version is {version!r}, this runtime reads version(s) "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-export the bundle with this version's "
                "`python -m export`"
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
                codes=codes,
                files={_relative_file("files", k): v for k, v in files.items()},
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
        """Plain JSON types (tuples become lists), always schema version 2, so
        `from_dict(to_dict())` round-trips (a version-1 manifest comes back as version 2)."""
        data = json.loads(json.dumps(asdict(self)))
        data["codes"] = [c.to_dict() for c in self.codes]
        return data

    def dump(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    # -- the selected code (the first one): what everything serving one code reads ---------------
    @property
    def code(self) -> CodeSpec:
        return self.codes[0]

    @property
    def coding(self) -> CodingSpec:
        return self.codes[0].coding

    @property
    def encoders(self) -> tuple[EncoderSpec, ...]:
        return self.codes[0].encoders

    @property
    def parm(self) -> str | None:
        return self.codes[0].parm

    def code_labels(self) -> list[str]:
        """Every code of the bundle as "n,k", the selected one first."""
        return [c.label for c in self.codes]

    def select_code(self, n: int, k: int) -> Manifest:
        """A copy whose first (selected) code is (n, k), the others after it in their order."""
        chosen = [c for c in self.codes if (c.n, c.k) == (n, k)]
        if not chosen:
            raise ManifestError(
                f"the bundle has no code n={n}, k={k}; its codes (n,k): {', '.join(self.code_labels())}"
            )
        return dataclasses.replace(self, codes=(chosen[0], *(c for c in self.codes if c is not chosen[0])))

    # -- queries ----------------------------------------------------------------------------------
    @property
    def primary_head(self) -> HeadSpec:
        return self.heads[0]

    def io_names(self) -> dict[str, tuple[str, str]]:
        """(input, output) ONNX tensor names of every ONNX file in the bundle, every code's."""
        names = {self.f: F_IO}
        names.update({h.file: HEAD_IO for h in self.heads})
        for code in self.codes:
            names.update({e.file: ENCODER_IO for e in code.encoders})
            if code.parm is not None:
                names[code.parm] = PARM_IO
        return names

    def output_names(self) -> list[str]:
        """The served outputs, in the order responses list them."""
        return [*(n for h in self.heads for n in (logits_output(h.task), class_output(h.task))),
                RECONSTRUCTED_OUTPUT]

    def model_files(self) -> list[str]:
        """Every model file the manifest points at, every code's (each must have a checksum)."""
        paths = [self.f, *(h.file for h in self.heads), *(p for c in self.codes for p in c.model_files())]
        paths.extend(self.torch.values())
        return list(dict.fromkeys(paths))

    def served_files(self) -> dict[str, str]:
        """`files` less those only the other codes use: what serving the selected code reads
        (start-up cost then does not grow with the number of codes in the bundle)."""
        served = set(self.code.model_files())
        others = {p for c in self.codes[1:] for p in c.model_files()} - served
        return {rel: digest for rel, digest in self.files.items() if rel not in others}


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_files(bundle_dir: str | Path, manifest: Manifest, verify: bool = True,
               served_only: bool = False) -> dict[str, bytes]:
    """Every file the manifest lists (with `served_only`, those serving its selected code
    reads: Manifest.served_files), read once; with `verify`, the bytes read are the bytes
    checked against their sha256, so whoever serves from these bytes serves what was
    verified even if a file is swapped on disk later. Raises ManifestError naming every
    file that is missing or differs."""
    root = Path(bundle_dir)
    wanted = manifest.served_files() if served_only else manifest.files
    files = {rel: (root / rel).read_bytes() for rel in sorted(wanted) if (root / rel).is_file()}
    check_files(manifest, files, f"bundle {root}", verify, served_only)
    return files


def check_files(manifest: Manifest, files: Mapping[str, bytes], where: str,
                verify: bool = True, served_only: bool = False) -> None:
    """Raise ManifestError naming every manifest file (with `served_only`, every file of
    Manifest.served_files) missing from `files` or (with `verify`) whose bytes' sha256
    differs; `where` names their origin in the message."""
    problems = []
    wanted = manifest.served_files() if served_only else manifest.files
    for rel, expected in sorted(wanted.items()):
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
