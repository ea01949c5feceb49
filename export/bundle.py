"""`build_bundle`: checkpoints -> a verified, self-describing bundle directory.

Layout (runtime.manifest, docs/ARCHITECTURE.md): f.onnx, heads/<task>.onnx, per code
codes/n<n>k<k>/enc_<r>.onnx and codes/n<n>k<k>/parm.onnx, torch/f.pt2,
verification/reference.npz, manifest.json. Every code's files are checked like f's. Everything is written into a
temporary sibling directory and renamed into place only after every file exported, passed
its ORT-vs-PyTorch check and the manifest validated, so BUNDLE_DIR never holds half a bundle.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.config import ExportConfig
from export.errors import ExportError, ExportVerificationError
from export.layout import reference_key
from export.numerics import error_stats, run_ort
from export.onnx_export import HalfCompute, export_onnx
from export.provenance import provenance
from export.sources import CodeSources, ExportSources, load_sources
from runtime.manifest import (
    ACCEPTED_DTYPES,
    ENCODER_IO,
    F_FILE,
    F_IO,
    HEAD_IO,
    INPUT_NAME,
    MANIFEST_NAME,
    PARM_IO,
    REFERENCE_FILE,
    SCHEMA_VERSION,
    TORCH_F_FILE,
    Manifest,
    ManifestError,
    code_encoder_file,
    code_parm_file,
    head_file,
    sha256_file,
    verify_checksums,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """One exported model file and what it is checked against."""

    file: str
    input_name: str
    output_name: str
    module: torch.nn.Module  # the FP32 PyTorch reference
    inputs: np.ndarray  # [N, ...] real inputs for the check


@torch.no_grad()
def _torch_outputs(module: torch.nn.Module, inputs: np.ndarray, chunk: int = 64) -> np.ndarray:
    module = module.eval()
    outs = [module(torch.from_numpy(inputs[i : i + chunk])).numpy() for i in range(0, len(inputs), chunk)]
    return np.concatenate(outs, axis=0).astype(np.float32)


def _real_inputs(sources: ExportSources, config: ExportConfig) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(x [N, C, H, W], {k: groups [N, k, C, H, W]} for every code's k): normalised test-split
    images, seeded choice (the first code's groups are drawn first, as for a one-code bundle)."""
    from trainer.data import DatasetError, get_spec, load_split, normalize

    try:
        spec = get_spec(sources.dataset)
        images, _ = load_split(sources.dataset, "test", config.data_dir)  # uint8 [M, C, H, W]
    except DatasetError as exc:
        raise ExportError(f"cannot load the verification inputs: {exc}") from exc
    rng = np.random.default_rng(config.seed)
    n = config.verify_samples
    single = rng.choice(len(images), size=n, replace=n > len(images))
    x = normalize(images[single], spec)  # [N, C, H, W] float32
    x_groups = {}
    for k in sources.ks:
        groups = rng.choice(len(images), size=(n, k), replace=True)
        x_groups[k] = np.ascontiguousarray(  # [N, k, C, H, W]
            normalize(images[groups.reshape(-1)], spec).reshape(n, k, *x.shape[1:]))
    return np.ascontiguousarray(x), x_groups


def _artifacts(sources: ExportSources, x: np.ndarray, x_groups: dict[int, np.ndarray]) -> list[Artifact]:
    classifier = sources.classifier.eval()
    z = _torch_outputs(classifier.f, x)  # [N, *embedding_shape], from the unfolded f
    arts = [Artifact(F_FILE, *F_IO, classifier.f, x)]
    arts += [Artifact(head_file(task), *HEAD_IO, head, z) for task, head in classifier.heads.items()]
    for code in sources.codes:
        n, k = code.coding.n, code.coding.k
        if code.encoders is not None:
            arts += [Artifact(code_encoder_file(n, k, r), *ENCODER_IO, enc, x_groups[k])
                     for r, enc in enumerate(code.encoders.encoders)]
        if code.parm is not None:
            arts.append(Artifact(code_parm_file(n, k), *PARM_IO, code.parm, x_groups[k]))
    return arts


def _exportable(module: torch.nn.Module) -> torch.nn.Module:
    """Fold spectral-norm scaling so the graph holds plain Conv weights (same eval function)."""
    if hasattr(module, "folded") and callable(module.folded):
        return module.folded()
    if hasattr(module, "f") and hasattr(module.f, "folded"):  # ParM: its own i-ResNet body
        out = copy.deepcopy(module).eval()
        out.f = module.f.folded()
        return out
    return module


def _export_and_check(art: Artifact, root: Path, config: ExportConfig) -> tuple[dict[str, Any], np.ndarray]:
    module = _exportable(art.module).eval()
    if config.fp16:
        module = HalfCompute(module).eval()
    path = export_onnx(
        module, tuple(art.inputs.shape[1:]), root / art.file,
        input_name=art.input_name, output_name=art.output_name,
        opset=config.opset, exporter=config.exporter,
    )
    reference = _torch_outputs(art.module, art.inputs)
    actual = run_ort(path, art.inputs, input_name=art.input_name, output_name=art.output_name)
    stats = error_stats(actual, reference, what=art.file)
    atol, rtol = config.tolerance
    logger.info("%s: ORT vs PyTorch max abs %.3g, max rel %.3g on %d samples",
                art.file, stats.max_abs_err, stats.max_rel_err, stats.samples)
    if not stats.passes(atol, rtol):
        raise ExportVerificationError(
            f"{art.file}: ONNX Runtime disagrees with PyTorch on {stats.samples} real test inputs: "
            f"max abs err {stats.max_abs_err:.3e} > atol {atol:g} + rtol {rtol:g} * max|ref| "
            f"{stats.ref_max_abs:.3g}. The exported graph is not the trained model; try "
            "--exporter torchscript, or loosen --atol/--rtol only if the error is expected (e.g. fp16)"
        )
    return stats.to_dict(atol, rtol), reference


def _export_torch_program(sources: ExportSources, root: Path, x: np.ndarray) -> dict[str, Any]:
    from export.config import FP32_TOLERANCE
    from export.torch_export import export_program, run_program

    f = sources.classifier.f
    path = export_program(f.folded(), tuple(x.shape[1:]), root / TORCH_F_FILE)
    stats = error_stats(run_program(path, x), _torch_outputs(f, x), what=TORCH_F_FILE)
    atol, rtol = FP32_TOLERANCE  # the program is always fp32; the GPU engine may autocast
    if not stats.passes(atol, rtol):
        raise ExportVerificationError(
            f"{TORCH_F_FILE}: the torch.export program disagrees with f: max abs err "
            f"{stats.max_abs_err:.3e} > atol {atol:g} + rtol {rtol:g} * {stats.ref_max_abs:.3g}"
        )
    return stats.to_dict(atol, rtol)


def _code_entry(code: CodeSources) -> dict[str, Any]:
    """manifest["codes"][i]: the scheme and the files _artifacts exported for it."""
    n, k = code.coding.n, code.coding.k
    rows = len(code.encoders.encoders) if code.encoders is not None else 0
    return {**code.coding.to_dict(),
            "encoders": [{"row": r, "file": code_encoder_file(n, k, r)} for r in range(rows)],
            "parm": code_parm_file(n, k) if code.parm is not None else None}


def _write_bundle(root: Path, sources: ExportSources, config: ExportConfig, command: list[str] | None) -> Manifest:
    from trainer.data import get_spec

    spec = get_spec(sources.dataset)
    x, x_groups = _real_inputs(sources, config)
    verification: dict[str, Any] = {}
    reference: dict[str, np.ndarray] = {}
    m = config.reference_samples
    for art in _artifacts(sources, x, x_groups):
        verification[art.file], ref_out = _export_and_check(art, root, config)
        reference[reference_key(art.file, "input")] = art.inputs[:m]
        reference[reference_key(art.file, "output")] = ref_out[:m]
    torch_files: dict[str, str] = {}
    if config.torch_program:
        verification[TORCH_F_FILE] = _export_torch_program(sources, root, x)
        torch_files["f"] = TORCH_F_FILE
    (root / REFERENCE_FILE).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / REFERENCE_FILE, **reference)

    classifier = sources.classifier
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )
    data = {
        "schema_version": SCHEMA_VERSION,
        "model_name": config.model_name or f"{sources.dataset}-iresnet",
        "input": {
            "name": INPUT_NAME,
            "shape": list(classifier.config.f.in_shape),
            "accepted_dtypes": list(ACCEPTED_DTYPES),
            "preprocessing": {"mean": list(spec.mean), "std": list(spec.std)},
        },
        "embedding_shape": list(classifier.config.f.embedding_shape),
        "f": F_FILE,
        "heads": [
            {"task": h.task, "file": head_file(h.task), "classes": list(h.class_names)}
            for h in classifier.config.heads
        ],
        "codes": [_code_entry(code) for code in sources.codes],
        "torch": torch_files,
        "files": {rel: sha256_file(root / rel) for rel in files},
        "verification": verification,
        "provenance": provenance(sources, config, command),
    }
    try:
        manifest = Manifest.from_dict(data)
        manifest.dump(root)
        verify_checksums(root, Manifest.load(root))  # what the runtime will read, re-read from disk
    except ManifestError as exc:
        raise ExportError(f"the exported bundle's manifest is invalid: {exc}") from exc
    return manifest


def build_bundle(config: ExportConfig, command: list[str] | None = None) -> Manifest:
    """Export `config.checkpoints` into `config.out`; returns the written manifest."""
    start_s = time.perf_counter()
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise ExportError(f"{str(out)!r} already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        raise ExportError(f"{str(out)!r} exists and is not a bundle (no {MANIFEST_NAME}); refusing to replace it")
    sources = load_sources(config.checkpoints, k=config.k)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shipped and served
    try:
        manifest = _write_bundle(tmp, sources, config, command)
        if out.exists():  # --overwrite: swap, so a failure before this line leaves the old bundle
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s (%d files) in %.1f s", out, len(manifest.files), time.perf_counter() - start_s)
    return manifest
