"""Checkpoints in, consistent torch modules out: the classifier, and the codes built on it.

Each checkpoint names its kind in `schema`; export accepts exactly one classifier, and any
number of encoder and ParM checkpoints trained against it. Each encoder checkpoint (a
`ParityEncoders` set holds every parity row of its coding scheme) is one code (n, k); each
ParM joins the code with its k (the one with n = k + 1 when several have that k, else the
first given), or, when no encoder has its k, gets its own average code n = k + 1. The first
code is the bundle's default: the first encoder's, else the first ParM's, else `--k`'s.
Everything else that must agree is checked here, before any export work starts: the f every
checkpoint was trained against (`f_hash`), k against `--k`, and the dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export.errors import CheckpointMismatchError, ExportError
from kernels.coding import CodingScheme
from kernels.errors import CodingError

logger = logging.getLogger(__name__)

CLASSIFIER_SCHEMA = "coded-invnet/classifier"
ENCODER_SCHEMA = "coded-invnet/encoder"
PARM_SCHEMA = "coded-invnet/parm"
SCHEMAS = (CLASSIFIER_SCHEMA, ENCODER_SCHEMA, PARM_SCHEMA)


@dataclass
class Checkpoint:
    path: Path
    data: dict[str, Any]

    @property
    def schema(self) -> str:
        return self.data["schema"]

    @property
    def f_hash(self) -> str | None:
        return self.data.get("f_hash")


@dataclass
class CodeSources:
    """One code of the bundle and the modules that serve it."""

    coding: CodingScheme
    encoders: torch.nn.Module | None = None  # trainer.models.encoder.ParityEncoders, eval mode
    parm: torch.nn.Module | None = None  # trainer.models.parm.ParityModel, eval mode
    encoder_path: Path | None = None
    parm_path: Path | None = None

    @property
    def label(self) -> str:
        return f"n={self.coding.n} k={self.coding.k}"


@dataclass
class ExportSources:
    """Everything the bundle is made from, already cross-checked."""

    classifier: torch.nn.Module  # trainer.models.Classifier, eval mode
    f_hash: str
    dataset: str
    codes: list[CodeSources]  # the first is the bundle's default code
    checkpoints: list[Checkpoint] = field(default_factory=list)

    # The default code's parts (a bundle of one code reads as it did before several).
    @property
    def coding(self) -> CodingScheme:
        return self.codes[0].coding

    @property
    def encoders(self) -> torch.nn.Module | None:
        return self.codes[0].encoders

    @property
    def parm(self) -> torch.nn.Module | None:
        return self.codes[0].parm

    @property
    def ks(self) -> list[int]:
        """Every code's k, each once, in code order."""
        return list(dict.fromkeys(c.coding.k for c in self.codes))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate one checkpoint through trainer.checkpoint; its `schema` says its kind."""
    from trainer.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {str(path)!r} does not exist; pass the .pt files written by `python -m trainer`")
    try:  # peek at the kind first: one command line takes all three kinds in any order
        peek = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips, pickles, foreign files all land here
        raise ExportError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); the file is "
            "corrupt, truncated or not a torch.save checkpoint. Re-run the training command that wrote it."
        ) from exc
    schema = peek.get("schema") if isinstance(peek, dict) else None
    if schema not in SCHEMAS:
        raise ExportError(
            f"checkpoint {str(path)!r} has schema {schema!r}, expected one of {list(SCHEMAS)} "
            "(a classifier, encoder or ParM checkpoint from `python -m trainer`)"
        )
    try:
        data = load_checkpoint(path, schema)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    if not isinstance(data.get("f_hash"), str):  # every kind records the f it belongs to
        raise ExportError(f"checkpoint {str(path)!r} ({schema}) lacks the `f_hash` of its f")
    return Checkpoint(path=path, data=data)


def _build(ckpt: Checkpoint) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes (model classes live in trainer.models)."""
    from trainer.checkpoint import CheckpointError, load_classifier

    if ckpt.schema == CLASSIFIER_SCHEMA:  # also refuses weights that do not match their f_hash
        try:
            return load_classifier(ckpt.path)[0].eval()
        except CheckpointError as exc:
            raise CheckpointMismatchError(str(exc)) from exc
    config = ckpt.data["model_config"]
    try:
        if ckpt.schema == ENCODER_SCHEMA:
            from trainer.models.encoder import build_encoders

            module = build_encoders(config)
        else:
            from trainer.models import Classifier, ClassifierConfig
            from trainer.models.parm import ParityModel, ParMConfig

            parm_config = ParMConfig.from_dict(dict(config))
            module = ParityModel(parm_config, Classifier(ClassifierConfig.from_dict(dict(parm_config.classifier))))
        module.load_state_dict(ckpt.data["state_dict"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ExportError(
            f"checkpoint {str(ckpt.path)!r}: model_config/state_dict do not build a "
            f"{ckpt.schema.split('/')[-1]} model ({type(exc).__name__}: {exc})"
        ) from exc
    return module.eval()


def _coding_of(ckpt: Checkpoint) -> CodingScheme:
    raw = ckpt.data.get("coding")
    if raw is None:
        raw = {"n": ckpt.data["model_config"]["k"] + len(ckpt.data["model_config"]["coefficients"]),
               "k": ckpt.data["model_config"]["k"],
               "coefficients": ckpt.data["model_config"]["coefficients"]}
    try:
        return CodingScheme.from_dict(raw)
    except (CodingError, KeyError, TypeError) as exc:
        raise ExportError(f"checkpoint {str(ckpt.path)!r}: invalid coding {raw!r} ({exc})") from exc


def _check_encoder(ckpt: Checkpoint, coding: CodingScheme, in_shape: tuple[int, ...]) -> None:
    enc_config = ckpt.data["model_config"]
    if [float(c) for row in enc_config.get("coefficients", []) for c in row] != [
        float(c) for row in coding.coefficients.tolist() for c in row
    ]:
        raise CheckpointMismatchError(
            f"encoder {str(ckpt.path)!r}: its `coding` {coding.to_dict()} disagrees with the "
            f"coefficients its encoders were built with {enc_config.get('coefficients')}"
        )
    enc_shape = (enc_config.get("in_channels"), *enc_config.get("image_size", []))
    if enc_shape != in_shape:
        raise CheckpointMismatchError(f"encoder {str(ckpt.path)!r} takes images {enc_shape}, the classifier {in_shape}")


def _codes(encoders: list[Checkpoint], parms: list[Checkpoint], k: int | None,
           in_shape: tuple[int, ...]) -> list[CodeSources]:
    """One code per encoder checkpoint, each ParM joined to the code with its k (see the
    module docstring); modules are not built yet."""
    if k is not None:  # --k pins the group size: every source that knows it must agree
        ks = {"--k": int(k)}
        ks.update({str(c.path): _coding_of(c).k for c in encoders})
        ks.update({str(c.path): int(c.data["model_config"]["k"]) for c in parms})
        if len(set(ks.values())) > 1:
            raise CheckpointMismatchError(
                f"k mismatch: {', '.join(f'{src} has k={v}' for src, v in ks.items())}; with --k every "
                "encoder and ParM must use that group size k (drop --k to export codes of several k)"
            )
    codes: list[CodeSources] = []
    for ckpt in encoders:
        coding = _coding_of(ckpt)
        _check_encoder(ckpt, coding, in_shape)
        twin = next((c for c in codes if (c.coding.n, c.coding.k) == (coding.n, coding.k)), None)
        if twin is not None:
            raise ExportError(
                f"encoders {str(twin.encoder_path)!r} and {str(ckpt.path)!r} are both for the code "
                f"n={coding.n}, k={coding.k}; a bundle holds one encoder set per (n, k): drop one, or "
                "export each into its own bundle"
            )
        codes.append(CodeSources(coding=coding, encoder_path=ckpt.path))
    parm_of_k: dict[int, Path] = {}
    for ckpt in parms:
        pk = int(ckpt.data["model_config"]["k"])
        if pk in parm_of_k:
            raise ExportError(
                f"ParM checkpoints {str(parm_of_k[pk])!r} and {str(ckpt.path)!r} both have k={pk}; a "
                "bundle holds one ParM per k: drop one"
            )
        parm_of_k[pk] = ckpt.path
        same_k = [c for c in codes if c.coding.k == pk]
        code = next((c for c in same_k if c.coding.n == pk + 1), same_k[0] if same_k else None)
        if code is None:  # no encoder for this k: the average code, as a ParM-only bundle has
            code = CodeSources(coding=CodingScheme.average(pk))
            codes.append(code)
        code.parm_path = ckpt.path
    if not codes:
        if k is None:
            raise ExportError(
                "no encoder or ParM checkpoint to take the coding scheme from; pass --k K to "
                "describe coding groups of K queries (the default average code, n = K + 1)"
            )
        codes.append(CodeSources(coding=CodingScheme.average(int(k))))
    return codes


def load_sources(paths: list[str] | tuple[str, ...], k: int | None = None) -> ExportSources:
    """Read, classify and cross-check the checkpoints; `k` (optional) pins the group size."""
    ckpts = [read_checkpoint(p) for p in paths]
    by_schema: dict[str, list[Checkpoint]] = {s: [] for s in SCHEMAS}
    for ckpt in ckpts:
        by_schema[ckpt.schema].append(ckpt)
    classifiers, encoders, parms = (by_schema[s] for s in SCHEMAS)
    if len(classifiers) != 1:
        raise ExportError(
            f"expected exactly one classifier checkpoint ({CLASSIFIER_SCHEMA}), got {len(classifiers)}: "
            f"{[str(c.path) for c in classifiers]}"
        )
    cls_ckpt = classifiers[0]
    classifier = _build(cls_ckpt)
    f_hash = str(cls_ckpt.f_hash)  # load_classifier checked it against fingerprint(f)
    dataset = str(cls_ckpt.data.get("dataset") or classifier.config.dataset)
    for other in [*encoders, *parms]:
        if other.f_hash != f_hash:
            raise CheckpointMismatchError(
                f"{other.schema.split('/')[-1]} {str(other.path)!r} was trained against f_hash "
                f"{str(other.f_hash)[:12]}…, but classifier {str(cls_ckpt.path)!r} has f_hash "
                f"{f_hash[:12]}…; train the encoder/ParM against this classifier (or export the "
                "classifier it was trained with)"
            )
        other_dataset = other.data.get("dataset")
        if other_dataset is not None and other_dataset != dataset:
            raise CheckpointMismatchError(
                f"{str(other.path)!r} was trained on dataset {other_dataset!r}, the classifier on {dataset!r}"
            )
    codes = _codes(encoders, parms, k, tuple(classifier.config.f.in_shape))
    by_path = {c.path: c for c in ckpts}
    for code in codes:
        code.encoders = None if code.encoder_path is None else _build(by_path[code.encoder_path])
        code.parm = None if code.parm_path is None else _build(by_path[code.parm_path])
        logger.info("code %s: encoders %s, ParM %s", code.label, code.encoder_path or "none",
                    code.parm_path or "none")
    return ExportSources(classifier=classifier, f_hash=f_hash, dataset=dataset, codes=codes, checkpoints=ckpts)
