"""The bundle's fixed names and the structural ONNX check; no torch, so `verify` runs without it.

Paths and ONNX I/O names follow docs/ARCHITECTURE.md; `verification/reference.npz` holds,
for every checked file, a few of the real inputs used at export and PyTorch's outputs on them.
"""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError
from runtime.manifest import Manifest

MIN_OPSET = 18
BATCH_DIM = "batch"
INPUT_NAME = "INPUT"  # the served (KServe) input; ONNX files use x / z / logits / ...
REFERENCE_FILE = "verification/reference.npz"
TORCH_F_FILE = "torch/f.pt2"


def reference_key(file: str, what: str) -> str:
    """npz member name for a bundle file's stored input/output ('/' is not safe in npz keys)."""
    return f"{file.replace('/', '__')}::{what}"


def io_names(manifest: Manifest) -> dict[str, tuple[str, str]]:
    """ONNX input/output names of every ONNX file in a bundle (the contract's fixed names)."""
    names = {manifest.f: ("x", "z")}
    names.update({h.file: ("z", "logits") for h in manifest.heads})
    names.update({e.file: ("x", "x_parity") for e in manifest.encoders})
    if manifest.parm is not None:
        names[manifest.parm] = ("x", "logits_sum")
    return names


def check_onnx(path: str | Path, *, input_name: str, output_name: str, opset: int = MIN_OPSET) -> None:
    """onnx.checker (full_check) plus the bundle's I/O contract: names, dynamic batch, opset."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker rejected the model: {exc}") from exc
    model = onnx.load(str(path))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [input_name] or outputs != [output_name]:
        raise ExportError(
            f"{path.name}: expected I/O {[input_name]} -> {[output_name]}, got {inputs} -> {outputs}"
        )
    for value in [*model.graph.input, *model.graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.dim_param != BATCH_DIM:
            raise ExportError(
                f"{path.name}: tensor {value.name!r} needs a dynamic leading dim named "
                f"{BATCH_DIM!r}, got {dim0}"
            )
    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", versions.get("ai.onnx", 0)) < opset:
        raise ExportError(f"{path.name}: opset {versions} is older than the requested {opset}")
