"""One module -> one checked ONNX file: fixed I/O names, dynamic batch dim `batch`, opset >= 18.

Callers pass modules whose spectral-norm parametrisations are already folded
(`InvertibleNet.folded()`), so the graph holds plain Conv weights; the dynamo exporter
would otherwise trace the sigma computation into the graph and the TorchScript exporter
fails on it.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import onnx
import torch

from export.config import EXPORTERS
from export.errors import ExportError
from export.layout import MIN_OPSET, check_onnx
from runtime.manifest import BATCH_DIM

logger = logging.getLogger(__name__)

# torch.export specialises sizes 0 and 1, so trace with 2 and mark the dim dynamic.
_TRACE_BATCH = 2


class HalfCompute(torch.nn.Module):
    """fp16 weights and compute inside, FP32 at the boundary (the bundle's I/O contract)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(module).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


def export_onnx(
    module: torch.nn.Module,
    sample_shape: tuple[int, ...],
    path: str | Path,
    *,
    input_name: str,
    output_name: str,
    opset: int = MIN_OPSET,
    exporter: str = "dynamo",
) -> Path:
    """Export `module` (one FP32 input of per-sample shape `sample_shape`) to `path` and check it."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset must be >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.zeros((_TRACE_BATCH, *sample_shape), dtype=torch.float32)  # [2, *sample_shape]
    start_s = time.perf_counter()
    # The dynamo exporter logs every optimiser pass and warns about absent torchvision ops.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporters emit deprecation chatter from torch/onnxscript internals we do not control.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # TorchScript tracing warns about Python-level shape checks (f's input validation);
        # they are constants for a fixed per-sample shape, and ORT is compared with PyTorch below.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            if exporter == "dynamo":
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    input_names=[input_name],
                    output_names=[output_name],
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                    dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    input_names=[input_name],
                    output_names=[output_name],
                    opset_version=opset,
                    dynamo=False,
                    dynamic_axes={input_name: {0: BATCH_DIM}, output_name: {0: BATCH_DIM}},
                )
        except Exception as exc:  # noqa: BLE001 - the exporters raise many unrelated types
            raise ExportError(
                f"torch.onnx.export ({exporter}) failed for {path.name}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. If the model still "
                "holds spectral-norm parametrisations, export f.folded(); or retry with "
                f"--exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'}"
            ) from exc
        finally:
            for lg, level in zip(quiet, levels, strict=True):
                lg.setLevel(level)
    model = onnx.load(str(path))
    _name_batch_dims(model, input_name, output_name)
    onnx.save_model(model, str(path))
    check_onnx(path, input_name=input_name, output_name=output_name, opset=opset)
    logger.info("exported %s (%s, opset %d) in %.1f s", path.name, exporter, opset, time.perf_counter() - start_s)
    return path


def _name_batch_dims(model: onnx.ModelProto, input_name: str, output_name: str) -> None:
    """Give the dynamic leading dim the contract's name `batch` on the graph's I/O."""
    for value in [*model.graph.input, *model.graph.output]:
        if value.name not in (input_name, output_name):
            continue
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_param") or not dim0.HasField("dim_value"):
            dim0.dim_param = BATCH_DIM
