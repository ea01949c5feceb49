"""Opens a bundle's model files as runners for the workers and the frontend.

The names of the models a worker can run (what a mode asks a worker for) live here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from runtime.config import ServerConfig
from runtime.engines import (
    ChainRunner,
    ModelRunner,
    OrtRunner,
    TensorRTRunner,
    TorchRunner,
    find_tensorrt_plan,
)
from runtime.errors import EngineUnavailable
from runtime.manifest import ENCODER_IO, F_IO, HEAD_IO, PARM_IO, Manifest, check_files, read_files

logger = logging.getLogger(__name__)

WORKER_F = "f"  # x [G, C, H, W] -> z [G, *embedding_shape]
WORKER_PARM = "parm"  # x [G, k, C, H, W] -> logits_sum [G, classes of the primary head]
WORKER_F_HEADS = "f_heads"  # x [G, C, H, W] -> every head's logits side by side
ENCODER_THEN_F = "enc_f/"  # + parity row: x [G, k, C, H, W] -> f(Enc_r(x)) (paper Remark 3)


def encoder_then_f(row: int) -> str:
    return f"{ENCODER_THEN_F}{row}"


class ModelFactory:
    """Runners from the bundle's bytes (the served code's: Manifest.served_files), read (and
    checked against the manifest, with --verify-checksums) once at construction: a worker
    restarted later builds its models from these same bytes, never from whatever the disk
    holds by then."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, config: ServerConfig,
                 device_outputs: bool = False, files: Mapping[str, bytes] | None = None) -> None:
        """`files`: the bundle's bytes as another process read them (a Ray actor gets them
        through the object store); checked against the manifest here all the same."""
        self.root = bundle_dir
        self.manifest = manifest
        self.config = config
        self.device_outputs = device_outputs  # torch f returns CUDA tensors (GPU decoding)
        if files is None:
            files = read_files(bundle_dir, manifest, verify=config.verify_checksums, served_only=True)
        else:
            check_files(manifest, files, f"bundle {bundle_dir} as received",
                        config.verify_checksums, served_only=True)
        self.files = files

    def _onnx(self, rel: str, io_names: tuple[str, str]) -> OrtRunner:
        return OrtRunner(self.files[rel], rel, *io_names)

    # Frontend (always ONNX Runtime on the CPU: light models) -------------------------------
    def heads(self) -> dict[str, ModelRunner]:
        return {h.task: self._onnx(h.file, HEAD_IO) for h in self.manifest.heads}

    def encoders(self) -> dict[int, ModelRunner]:
        return {e.row: self._onnx(e.file, ENCODER_IO) for e in self.manifest.encoders}

    # Workers ---------------------------------------------------------------------------------
    def f(self, worker: int) -> ModelRunner:
        engine = self.config.engine
        if engine == "onnxruntime":
            return self._onnx(self.manifest.f, F_IO)
        if engine == "torch":
            rel = self.manifest.torch.get("f")
            if rel is None:
                raise EngineUnavailable("--engine torch needs manifest \"torch\": {\"f\": ...} "
                                        "(a torch.export program); this bundle has none")
            return TorchRunner(self.files[rel], rel, self.config.device, worker,
                               keep_on_device=self.device_outputs)
        if engine == "tensorrt":
            plan = find_tensorrt_plan(self.files)
            return TensorRTRunner(self.files[plan], plan, worker, *F_IO)
        raise EngineUnavailable(f"unknown engine {engine!r}")

    def worker_models(self, worker: int, names: list[str]) -> Mapping[str, ModelRunner]:
        models: dict[str, ModelRunner] = {}
        for name in names:
            if name == WORKER_F:
                models[name] = self.f(worker)
            elif name.startswith(ENCODER_THEN_F):
                row = int(name[len(ENCODER_THEN_F):])
                enc = next(e for e in self.manifest.encoders if e.row == row)
                models[name] = ChainRunner(self._onnx(enc.file, ENCODER_IO), self.f(worker))
            elif name == WORKER_PARM:
                if self.manifest.parm is None:
                    raise EngineUnavailable("this bundle has no parm model")
                models[name] = self._onnx(self.manifest.parm, PARM_IO)
            elif name == WORKER_F_HEADS:
                models[name] = ChainRunner(self.f(worker), *self.heads().values(),
                                           concat_rest=True)
            else:
                raise EngineUnavailable(f"unknown worker model {name!r}")
        return models

    def warmup_inputs(self, names: list[str]) -> dict[str, np.ndarray]:
        """A zero batch of the right shape per model, so the first real call is not slow."""
        chw = tuple(self.manifest.input.shape)
        k = self.manifest.coding.k
        return {
            name: np.zeros((1, k, *chw) if name == WORKER_PARM or name.startswith(ENCODER_THEN_F)
                           else (1, *chw), np.float32)
            for name in names
        }
