"""`torch/f.pt2`: a torch.export program of folded f with a dynamic batch dim.

The runtime's `--engine torch` (GPUs without TensorRT) loads it with
`torch.export.load(path).module()` and moves it to its device; the program is traced on
CPU, so its weights are CPU tensors until then.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from export.errors import ExportError
from runtime.manifest import BATCH_DIM

logger = logging.getLogger(__name__)

_TRACE_BATCH = 2  # torch.export specialises 0 and 1


def export_program(module: torch.nn.Module, sample_shape: tuple[int, ...], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((_TRACE_BATCH, *sample_shape), dtype=torch.float32)  # [2, C, H, W]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            program = torch.export.export(
                module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},)
            )
            torch.export.save(program, str(path))
        except Exception as exc:  # noqa: BLE001 - torch.export raises many unrelated types
            raise ExportError(
                f"torch.export failed for {path.name}: {type(exc).__name__}: {exc}. "
                "Pass --no-torch-program to export the ONNX bundle without it."
            ) from exc
    logger.info("wrote torch.export program %s", path)
    return path


def run_program(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Load the saved program exactly as the runtime does and run it on `inputs` ([B, ...])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.export.load(str(path)).module()
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))).numpy()
