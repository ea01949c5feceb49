"""Checkpoint files: one `torch.save` dict per model, loadable with `weights_only=True`.

Keys (docs/ARCHITECTURE.md): schema, schema_version, model_config, state_dict, train_config,
metrics, dataset, git_commit, command, plus per-schema extras (`f_hash`, `coding`, ...).
Writes are atomic (temporary file + rename) so a reader polling the path never sees half a
file, and a training run killed mid-save leaves the previous checkpoint intact.

`command` is the command line as a user types it (`python -m trainer ...`, see
`trainer.flags.run_command`), never the interpreter path of the machine that ran it, so
a bundle's provenance can be pasted and re-run elsewhere.

The loaders (`load_classifier`, `load_encoders`, `load_parm`) rebuild a model from the file
alone, so export and the benchmarks need no training loop.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.errors import CheckpointError

if TYPE_CHECKING:
    from trainer.models import Classifier
    from trainer.models.encoder import ParityEncoders
    from trainer.models.parm import ParityModel

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CLASSIFIER_SCHEMA = "coded-invnet/classifier"
ENCODER_SCHEMA = "coded-invnet/encoder"
PARM_SCHEMA = "coded-invnet/parm"
TRAIN_STATE_SCHEMA = "coded-invnet/train-state"  # resumable last.pt of any trainer

_REQUIRED_KEYS = (
    "schema", "schema_version", "model_config", "state_dict", "train_config",
    "metrics", "dataset", "git_commit", "command",
)
_REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """HEAD of the repository this code runs from, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(
    path: str | Path,
    *,
    schema: str,
    model_config: dict,
    state_dict: dict[str, torch.Tensor],
    train_config: dict,
    metrics: dict,
    dataset: str,
    command: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint dict atomically; `extra` keys go at the top level.

    `command`: the typed command that produced it (empty when called as a library)."""
    path = Path(path)
    ckpt: dict[str, Any] = {
        "schema": schema,
        "schema_version": SCHEMA_VERSION,
        "model_config": model_config,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "train_config": train_config,
        "metrics": metrics,
        "dataset": dataset,
        "git_commit": git_commit(),
        "command": list(command or []),
    }
    for key, value in (extra or {}).items():
        if key in ckpt:
            raise CheckpointError(f"extra key {key!r} would overwrite a standard checkpoint key")
        ckpt[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %s checkpoint %s", schema, path)


def load_checkpoint(path: str | Path, expected_schema: str) -> dict:
    """Load with weights_only=True and check schema, version and required keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); the file is "
            "corrupt, truncated, or not a torch.save file made by this project"
        ) from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, expected a dict with "
            f"keys {list(_REQUIRED_KEYS)}"
        )
    schema = ckpt.get("schema")
    if schema != expected_schema:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has schema {schema!r}, expected {expected_schema!r}; "
            "pass the right kind of checkpoint for this command"
        )
    version = ckpt.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has schema_version {version!r}, this code reads "
            f"version {SCHEMA_VERSION}; retrain or convert the checkpoint"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks required keys {missing}")
    return ckpt


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the Classifier (eval mode) from a classifier checkpoint; returns (model, ckpt).

    The stored f_hash must match the fingerprint of the loaded f, so a checkpoint whose
    weights and hash disagree (edited, mixed up) is refused.
    """
    from trainer.models import Classifier, ClassifierConfig, fingerprint

    ckpt = load_checkpoint(path, CLASSIFIER_SCHEMA)
    try:
        config = ClassifierConfig.from_dict(ckpt["model_config"])
        model = Classifier(config)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: model_config/state_dict do not build a Classifier "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    model.eval()
    stored = ckpt.get("f_hash")
    if stored is None:
        raise CheckpointError(f"classifier checkpoint {str(path)!r} lacks 'f_hash'")
    actual = fingerprint(model.f)
    if actual != stored:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: stored f_hash {stored[:12]}... does not match the "
            f"weights' fingerprint {actual[:12]}...; the file was modified or assembled wrongly"
        )
    return model, ckpt


def load_encoders(path: str | Path) -> tuple[ParityEncoders, dict[str, Any]]:
    """(ParityEncoders in eval mode, checkpoint dict) from an encoder checkpoint."""
    from trainer.models.encoder import build_encoders

    ckpt = load_checkpoint(path, ENCODER_SCHEMA)
    encoders = build_encoders(ckpt["model_config"])
    encoders.load_state_dict(ckpt["state_dict"])
    return encoders.eval(), ckpt


def load_parm(path: str | Path) -> tuple[ParityModel, dict[str, Any]]:
    """(ParityModel in eval mode, checkpoint dict) from a ParM checkpoint."""
    from trainer.models.parm import build_parm

    ckpt = load_checkpoint(path, PARM_SCHEMA)
    parm = build_parm(ckpt["model_config"])
    parm.load_state_dict(ckpt["state_dict"])
    return parm.eval(), ckpt
