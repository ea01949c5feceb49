"""manifest["provenance"]: the commands that made a bundle, as a user types them, and versions.

Commands are recorded as `python -m <package> ...`, never the interpreter or script path
of the machine that ran them (checkpoints written before trainer recorded typed commands
hold `sys.argv`, e.g. `/abs/path/trainer/__main__.py classifier ...`; those are rewritten).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from runtime.manifest import sha256_file

if TYPE_CHECKING:
    from export.config import ExportConfig
    from export.sources import ExportSources

_PYTHON = re.compile(r"python[0-9.]*(\.exe)?")


def normalized_command(command: str | Sequence[str] | None) -> str | None:
    """`command` (argv list or shell string) as a user would type it: `python -m pkg ...`."""
    if not command:
        return None
    argv = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    head = PurePath(argv[0])
    if _PYTHON.fullmatch(head.name) and len(argv) > 1 and argv[1] == "-m":  # /usr/bin/python3 -m pkg
        argv = ["python", *argv[1:]]
    elif head.name == "__main__.py" and head.parent.name:  # sys.argv[0] of `python -m pkg`
        argv = ["python", "-m", head.parent.name, *argv[1:]]
    elif head.suffix == ".py" and head.is_absolute():  # a script: keep its name, not its home
        argv = ["python", head.name, *argv[1:]]
    return shlex.join(argv)


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def provenance(sources: ExportSources, config: ExportConfig, command: Sequence[str] | None) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    commands = [c for c in (normalized_command(ck.data.get("command")) for ck in sources.checkpoints) if c]
    if command:
        commands.append(normalized_command(command))
    kinds = [ck.schema.split("/")[-1] for ck in sources.checkpoints]
    # keyed by kind ("classifier", "encoder", "parm"); a kind given several times: "<kind>:<path>"
    metrics = {kind if kinds.count(kind) == 1 else f"{kind}:{ck.path}": ck.data.get("metrics", {})
               for kind, ck in zip(kinds, sources.checkpoints, strict=True)}
    cls_ckpt = next(ck for ck in sources.checkpoints if ck.schema.endswith("classifier"))
    atol, rtol = config.tolerance
    return {
        "commands": commands,
        "dataset": sources.dataset,
        "metrics": metrics,
        "git_commit": cls_ckpt.data.get("git_commit"),
        "f_hash": sources.f_hash,
        "checkpoints": [
            {"path": str(ck.path), "schema": ck.schema, "sha256": sha256_file(ck.path),
             "git_commit": ck.data.get("git_commit")}
            for ck in sources.checkpoints
        ],
        "export": {
            "git_commit": git_commit(),
            "opset": config.opset,
            "exporter": config.exporter,
            "precision": "fp16" if config.fp16 else "fp32",
            "criterion": f"max|ort - torch| <= {atol:g} + {rtol:g} * max|torch| per file",
            "verification_inputs": f"{sources.dataset} test split, {config.verify_samples} samples "
            f"(groups of k={', '.join(map(str, sources.ks))} for encoders/ParM), seed {config.seed}",
            "reference_samples": config.reference_samples,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
