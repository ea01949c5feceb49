"""`python -m export trt BUNDLE`: TensorRT engines for the GPU this runs on.

Engines go to runtime.manifest.plan_file(): engines/<sm>_trt<version>/<same path as the
ONNX, .plan> (e.g. engines/sm90_trt10.13.0/f.plan), because a plan only runs on the compute
capability and TensorRT version that built it. Each engine has one optimisation profile per concurrent
worker context (--workers): an execution context owns a profile, so N workers sharing an
engine need N profiles. The timing cache is persisted next to the plans and reused by the
next build. Precision comes from the ONNX (an fp16 bundle holds fp16 weights): the network
is strongly typed, which TensorRT 10 enables with a flag and TensorRT 11 always uses
(11 removed BuilderFlag.FP16). The manifest's `files` gains the plans' sha256.

TensorRT, CUDA and the cuda-python bindings are imported lazily: where they are missing,
this raises TensorRTUnavailableError (non-zero exit), and never writes a fake engine.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.config import TrtConfig
from export.errors import ExportError, TensorRTBuildError, TensorRTUnavailableError
from runtime.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    engine_dir,
    plan_file,
    sha256_file,
    verify_checksums,
)

logger = logging.getLogger(__name__)

SUPPORTED_MAJOR = (10, 11)
TIMING_CACHE_FILE = "timing.cache"  # inside the engine directory, reused by the next build


@dataclass
class TrtBuildReport:
    engine_dir: str
    engines: dict[str, str] = field(default_factory=dict)  # onnx file -> plan file (bundle-relative)
    build_s: dict[str, float] = field(default_factory=dict)
    timing_cache: str = ""


def import_tensorrt() -> Any:
    """The tensorrt module, or TensorRTUnavailableError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            "TensorRT is not installed here (`import tensorrt` failed: "
            f"{exc}); engines can only be built on a machine with an NVIDIA GPU and TensorRT "
            "10 or 11: `pip install -e '.[gpu]'` there, then rerun `python -m export trt BUNDLE`. "
            "The ONNX bundle itself serves without TensorRT (onnxruntime)."
        ) from exc
    major = int(str(trt.__version__).split(".")[0])
    if major not in SUPPORTED_MAJOR:
        raise TensorRTUnavailableError(
            f"TensorRT {trt.__version__} is not supported; this builder targets major versions {SUPPORTED_MAJOR}"
        )
    return trt


def cuda_check(result: Any, what: str) -> Any:
    """The one status checker for cuda-python calls: `(err, *values)` -> values, or raise."""
    err, *values = result if isinstance(result, tuple) else (result,)
    code = int(getattr(err, "value", err))
    if code != 0:
        raise TensorRTBuildError(f"CUDA call {what} failed with {err!r} (code {code})")
    return values[0] if len(values) == 1 else tuple(values)


def compute_capability(device: int) -> tuple[int, int]:
    """(major, minor) of CUDA device `device`, through cuda-python (pycuda as a fallback)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError:
            cudart = None
    if cudart is not None:
        count = cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if device >= count:
            raise TensorRTUnavailableError(f"CUDA device {device} requested, {count} present")
        attr = cudart.cudaDeviceAttr
        major = cuda_check(
            cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute"
        )
        minor = cuda_check(
            cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute"
        )
        return int(major), int(minor)
    try:
        import pycuda.driver as cuda

        cuda.init()
        return tuple(cuda.Device(device).compute_capability())  # type: ignore[return-value]
    except ImportError as exc:
        raise TensorRTUnavailableError(
            "neither cuda-python nor pycuda is installed, so the GPU's compute capability (which keys "
            "the engine directory) is unknown; `pip install -e '.[gpu]'`"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - pycuda raises its own LogicError/RuntimeError types
        raise TensorRTUnavailableError(f"no usable CUDA device {device}: {exc}") from exc


def _parse_onnx(trt: Any, builder: Any, logger_: Any, path: Path) -> Any:
    """The network for `path`; all parser errors are collected into one exception."""
    flags = 0
    major = int(str(trt.__version__).split(".")[0])
    if major == 10:  # 11: strongly typed always, the flag is deprecated and ignored
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger_)
    if not parser.parse(path.read_bytes(), str(path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"[{i}] node {err.node()}: {err.code()}: {err.desc()}")
        raise TensorRTBuildError(
            f"TensorRT's ONNX parser rejected {path.name} with {parser.num_errors} error(s):\n  "
            + "\n  ".join(errors or ["(no error details reported)"])
        )
    return network


def _build_one(trt: Any, onnx_path: Path, plan_path: Path, cache: Any, config: TrtConfig, logger_: Any) -> None:
    builder = trt.Builder(logger_)
    network = _parse_onnx(trt, builder, logger_, onnx_path)
    build_config = builder.create_builder_config()
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if not build_config.set_timing_cache(cache, False):
        raise TensorRTBuildError(f"{onnx_path.name}: the timing cache was rejected by the builder config")
    for _ in range(config.workers):  # one profile per concurrent execution context
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            per_sample = tuple(int(d) for d in tensor.shape[1:])
            if any(d < 0 for d in per_sample):
                raise TensorRTBuildError(
                    f"{onnx_path.name}: input {tensor.name!r} has dynamic non-batch dims {tuple(tensor.shape)}; "
                    "only the batch dim may be dynamic"
                )
            profile.set_shape(
                tensor.name,
                (config.min_batch, *per_sample),
                (config.opt_batch, *per_sample),
                (config.max_batch, *per_sample),
            )
        build_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise TensorRTBuildError(
            f"{onnx_path.name}: TensorRT failed to build an engine (see the TensorRT log above); "
            "try a larger --workspace-bytes or a smaller --max-batch"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.partial")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)


def build_engines(config: TrtConfig) -> TrtBuildReport:
    """Build a plan for every ONNX file of the bundle and record their sha256 in the manifest."""
    root = Path(config.bundle)
    try:
        manifest = Manifest.load(root)
        verify_checksums(root, manifest)
    except ManifestError as exc:
        raise ExportError(f"not a valid bundle: {exc}") from exc
    trt = import_tensorrt()
    capability = compute_capability(config.device)
    trt_version = str(trt.__version__)
    engine_rel = engine_dir(capability, trt_version)
    report = TrtBuildReport(engine_dir=engine_rel)
    cache_path = Path(config.timing_cache) if config.timing_cache else root / engine_rel / TIMING_CACHE_FILE
    report.timing_cache = str(cache_path)
    logger_ = trt.Logger(trt.Logger.WARNING)
    scratch = trt.Builder(logger_).create_builder_config()
    cache = scratch.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None:
        raise TensorRTBuildError(f"{cache_path}: cannot load the timing cache; delete it to start a fresh one")
    logger.info("TensorRT %s, sm%d%d: building %d engine(s) into %s with %d profile(s) each",
                trt_version, *capability, len(manifest.io_names()), engine_rel, config.workers)
    for onnx_file in manifest.io_names():
        plan_rel = plan_file(onnx_file, capability, trt_version)
        start_s = time.perf_counter()
        _build_one(trt, root / onnx_file, root / plan_rel, cache, config, logger_)
        report.engines[onnx_file] = plan_rel
        report.build_s[onnx_file] = time.perf_counter() - start_s
        logger.info("built %s in %.1f s", plan_rel, report.build_s[onnx_file])
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(cache.serialize()))
    _record_engines(root, manifest, report)
    return report


def _record_engines(root: Path, manifest: Manifest, report: TrtBuildReport) -> None:
    """Add the plans to manifest['files'] (atomic rewrite: the old manifest stays until it is done)."""
    # via JSON: Manifest.to_dict() keeps tuples, which Manifest.from_dict() refuses
    data = json.loads(json.dumps(manifest.to_dict()))
    data["files"].update({plan: sha256_file(root / plan) for plan in report.engines.values()})
    updated = Manifest.from_dict(data)
    tmp = root / (MANIFEST_NAME + ".partial")
    tmp.write_text(json.dumps(updated.to_dict(), indent=2) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)
