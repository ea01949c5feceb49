"""`python -m export verify BUNDLE`: checksums, schema, ONNX structure and numerics.

Every code of the bundle is verified: its encoders and its ParM are among the files checked.
Numerics: every file listed in manifest["verification"] is re-run on the inputs stored in
verification/reference.npz at export and compared with the PyTorch outputs stored beside
them, under the tolerance recorded for that file. This catches a file swapped for another
valid ONNX, and an ONNX Runtime (or torch) upgrade that changes the numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.config import VerifyConfig
from export.errors import ExportError, ExportVerificationError
from export.layout import check_onnx, reference_key
from export.numerics import error_stats, run_ort
from runtime.manifest import REFERENCE_FILE, Manifest, ManifestError, verify_checksums

logger = logging.getLogger(__name__)


@dataclass
class FileCheck:
    file: str
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    ok: bool


@dataclass
class VerifyReport:
    bundle: str
    codes: list[str] = field(default_factory=list)  # "n,k" of every code, the default first
    checked: list[FileCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<file>: why"

    def lines(self) -> list[str]:
        codes = f"; codes (n,k) {', '.join(self.codes)}" + (" (the first is served by default)"
                                                             if len(self.codes) > 1 else "")
        out = [f"bundle {self.bundle}: checksums and schema OK{codes if self.codes else ''}"]
        out += [
            f"  {c.file}: max abs err {c.max_abs_err:.3e}, max rel err {c.max_rel_err:.3e} "
            f"(atol {c.atol:g}, rtol {c.rtol:g}) {'OK' if c.ok else 'FAIL'}"
            for c in self.checked
        ]
        out += [f"  skipped {s}" for s in self.skipped]
        return out


def _load_reference(root: Path) -> dict[str, np.ndarray]:
    path = root / REFERENCE_FILE
    if not path.is_file():
        raise ExportVerificationError(f"{path}: missing; the bundle has no stored reference outputs to verify")
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def verify_bundle(config: VerifyConfig) -> VerifyReport:
    """Raise on the first structural problem, or on any numerical mismatch (listing all)."""
    root = Path(config.bundle)
    if not root.is_dir():
        raise ExportError(f"bundle {str(root)!r} is not a directory")
    try:
        manifest = Manifest.load(root)
        verify_checksums(root, manifest)
    except ManifestError as exc:
        raise ExportVerificationError(str(exc)) from exc
    names = manifest.io_names()
    report = VerifyReport(bundle=str(root), codes=manifest.code_labels())
    if not config.numerics:
        report.skipped.append("numerics: --no-numerics")
        return report
    for file, (input_name, output_name) in names.items():
        try:
            check_onnx(root / file, input_name=input_name, output_name=output_name)
        except ExportError as exc:
            raise ExportVerificationError(str(exc)) from exc
    reference = _load_reference(root)
    failures = []
    for file in [*names, *manifest.torch.values()]:
        recorded = manifest.verification.get(file)
        if recorded is None:
            raise ExportVerificationError(f"{file}: manifest['verification'] has no entry for it")
        key_in, key_out = reference_key(file, "input"), reference_key(file, "output")
        if file in manifest.torch.values():
            inputs, expected = reference.get(reference_key(manifest.f, "input")), reference.get(
                reference_key(manifest.f, "output")
            )
            try:
                from export.torch_export import run_program
            except ImportError:
                report.skipped.append(f"{file}: torch is not installed")
                continue
            actual = None if inputs is None else run_program(root / file, inputs)
        else:
            inputs, expected = reference.get(key_in), reference.get(key_out)
            actual = None if inputs is None else run_ort(
                root / file, inputs, input_name=names[file][0], output_name=names[file][1]
            )
        if inputs is None or expected is None:
            raise ExportVerificationError(f"{file}: {REFERENCE_FILE} lacks {key_in!r} / {key_out!r}")
        stats = error_stats(actual, expected, what=file)
        atol, rtol = float(recorded["atol"]), float(recorded["rtol"])
        ok = stats.passes(atol, rtol)
        report.checked.append(FileCheck(file, stats.max_abs_err, stats.max_rel_err, atol, rtol, ok))
        if not ok:
            failures.append(
                f"{file}: max abs err {stats.max_abs_err:.3e} > {atol:g} + {rtol:g} * {stats.ref_max_abs:.3g}"
            )
    if failures:
        raise ExportVerificationError(
            f"bundle {root}: outputs differ from the references stored at export: " + "; ".join(failures)
            + ". Re-export the bundle with this environment's `python -m export`."
        )
    return report
