"""`python -m export`: checkpoints -> verified bundle directory; `verify` and `trt` verbs.

  python -m export CLASSIFIER [ENCODER...] [PARM...] --out BUNDLE_DIR [--opset 18] [--fp16]
  python -m export verify BUNDLE
  python -m export trt BUNDLE [--workers N]

The default verb takes checkpoint paths, so a first argument that is exactly `verify` or
`trt` selects a verb; a checkpoint file with one of those names can be passed as ./verify.
"""

from __future__ import annotations

import argparse
import logging
import sys

from export.config import EXPORTERS, MIN_OPSET, ExportConfig, TrtConfig, VerifyConfig, default_tolerance
from export.errors import ExportError, TensorRTUnavailableError

logger = logging.getLogger(__name__)

VERBS = {
    "verify": "re-check a bundle: checksums, schema, ONNX structure, numerics vs stored references",
    "trt": "build TensorRT engines for this GPU (needs TensorRT 10/11 and CUDA)",
}
EXIT_FAILED = 1
EXIT_TENSORRT_MISSING = 3


def _export_parser() -> argparse.ArgumentParser:
    fp32_tol, fp16_tol = default_tolerance(False), default_tolerance(True)
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a classifier checkpoint (+ optional encoder and ParM checkpoints) into a "
        "verified, self-describing bundle directory: ONNX files + manifest.json. One bundle may hold "
        "several codes for its f: each encoder checkpoint is one code (n, k), each ParM joins the code "
        "with its k (or gets its own n = k+1 code); the first code is the one `serve` picks unless "
        "given --coding N,K.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="other verbs:\n"
        + "\n".join(f"  python -m export {verb} BUNDLE   {text}" for verb, text in VERBS.items())
        + "\n\nRun `python -m export VERB --help` for a verb's flags.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="one classifier checkpoint, then any encoder checkpoints (one per code (n, k)) "
                        "and ParM checkpoints (one per k), in any order")
    parser.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory to create")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    parser.add_argument("--fp16", action="store_true",
                        help=f"fp16 weights and compute inside each ONNX file, FP32 I/O; default tolerance "
                        f"atol/rtol {fp16_tol[0]:g}/{fp16_tol[1]:g} instead of {fp32_tol[0]:g}/{fp32_tol[1]:g}")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch.onnx exporter")
    parser.add_argument("--k", type=int, default=None,
                        help="coding group size when no encoder/ParM checkpoint sets it (average code, n = k+1); "
                        "with them, every encoder and ParM must have this k")
    parser.add_argument("--model-name", default=None, help="manifest model_name (default: <dataset>-iresnet)")
    parser.add_argument("--data-dir", default=None, help="dataset directory for the verification inputs")
    parser.add_argument("--verify-samples", type=int, default=64,
                        help="real test inputs compared ORT vs PyTorch per file")
    parser.add_argument("--reference-samples", type=int, default=8,
                        help="how many of them are stored in verification/reference.npz for `verify`")
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance override")
    parser.add_argument("--rtol", type=float, default=None, help="tolerance relative to max|reference|")
    parser.add_argument("--no-torch-program", dest="torch_program", action="store_false",
                        help="skip torch/f.pt2 (the torch.export program for `--engine torch`)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--seed", type=int, default=0, help="seed choosing the verification inputs")
    return parser


def _verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export verify", description=VERBS["verify"])
    parser.add_argument("bundle", metavar="BUNDLE")
    parser.add_argument("--no-numerics", dest="numerics", action="store_false",
                        help="checksums and schema only (no onnxruntime needed)")
    return parser


def _trt_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export trt", description=VERBS["trt"])
    parser.add_argument("bundle", metavar="BUNDLE")
    parser.add_argument("--workers", type=int, default=1,
                        help="concurrent worker contexts per engine (one optimisation profile each)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--workspace-bytes", type=int, default=1 << 30)
    parser.add_argument("--timing-cache", default=None,
                        help="timing cache file (default: <bundle>/engines/<sm>_trt<ver>/timing.cache)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    return parser


def _run_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    from export.bundle import build_bundle

    manifest = build_bundle(ExportConfig(**vars(args)), command=["python", "-m", "export", *argv])
    others = "".join(f", also n={c.n} k={c.k}" for c in manifest.codes[1:])
    print(f"wrote bundle {args.out}: {len(manifest.files)} files, coding n={manifest.coding.n} k={manifest.coding.k}"
          f"{' (the default)' if others else ''}{others}")
    for file, stats in manifest.verification.items():
        print(f"  {file}: max abs err {stats['max_abs_err']:.3e}, max rel err {stats['max_rel_err']:.3e} "
              f"on {stats['samples']} samples")
    return 0


def _run_verify(argv: list[str]) -> int:
    args = _verify_parser().parse_args(argv)
    from export.verify import verify_bundle

    report = verify_bundle(VerifyConfig(**vars(args)))
    print("\n".join(report.lines()))
    return 0


def _run_trt(argv: list[str]) -> int:
    args = _trt_parser().parse_args(argv)
    from export.tensorrt_build import build_engines

    report = build_engines(TrtConfig(**vars(args)))
    print(f"built {len(report.engines)} engine(s) in {report.engine_dir}; timing cache {report.timing_cache}")
    for onnx_file, plan in report.engines.items():
        print(f"  {onnx_file} -> {plan} ({report.build_s[onnx_file]:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("export").setLevel(logging.INFO)
    verb = argv[0] if argv and argv[0] in VERBS else None
    runner = {"verify": _run_verify, "trt": _run_trt}.get(verb, _run_export)
    try:
        return runner(argv[1:] if verb else argv)
    except TensorRTUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TENSORRT_MISSING
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
