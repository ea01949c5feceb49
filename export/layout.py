"""Export-only bundle details: the minimum opset, the reference-file keys and the structural
ONNX check; no torch, so `verify` runs without it.

The bundle's file names and ONNX tensor names are runtime.manifest's (one owner);
`verification/reference.npz` (manifest.REFERENCE_FILE) holds, for every checked file, a few
of the real inputs used at export and PyTorch's outputs on them, under `reference_key`.
"""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError
from runtime.manifest import BATCH_DIM

MIN_OPSET = 18
# The served (KServe) input name export writes into manifest["input"]["name"]; the runtime
# reads it from there, so it is a default of export's, not part of the fixed contract.


def reference_key(file: str, what: str) -> str:
    """npz member name for a bundle file's stored input/output ('/' is not safe in npz keys)."""
    return f"{file.replace('/', '__')}::{what}"


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
