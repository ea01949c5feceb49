"""Opens a bundle's model files as runners for the workers and the frontend."""

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
from runtime.manifest import Manifest

logger = logging.getLogger(__name__)


class ModelFactory:
    def __init__(self, bundle_dir: Path, manifest: Manifest, config: ServerConfig,
                 device_outputs: bool = False) -> None:
        self.root = bundle_dir
        self.manifest = manifest
        self.config = config
        self.device_outputs = device_outputs  # torch f returns CUDA tensors (GPU decoding)

    # Frontend (always ONNX Runtime on the CPU: light models) -------------------------------
    def heads(self) -> dict[str, ModelRunner]:
        return {h.task: OrtRunner(self.root / h.file, "z", "logits") for h in self.manifest.heads}

    def encoders(self) -> dict[int, ModelRunner]:
        return {e.row: OrtRunner(self.root / e.file, "x", "x_parity")
                for e in self.manifest.encoders}

    # Workers ---------------------------------------------------------------------------------
    def f(self, worker: int) -> ModelRunner:
        engine = self.config.engine
        if engine == "onnxruntime":
            return OrtRunner(self.root / self.manifest.f, "x", "z")
        if engine == "torch":
            rel = self.manifest.torch.get("f")
            if rel is None:
                raise EngineUnavailable("--engine torch needs manifest \"torch\": {\"f\": ...} "
                                        "(a torch.export program); this bundle has none")
            return TorchRunner(self.root / rel, self.config.device, worker,
                               keep_on_device=self.device_outputs)
        if engine == "tensorrt":
            return TensorRTRunner(find_tensorrt_plan(self.root, self.manifest.files), worker, "x", "z")
        raise EngineUnavailable(f"unknown engine {engine!r}")

    def worker_models(self, worker: int, names: list[str]) -> Mapping[str, ModelRunner]:
        models: dict[str, ModelRunner] = {}
        for name in names:
            if name == "f":
                models[name] = self.f(worker)
            elif name.startswith("enc_f/"):
                row = int(name.split("/", 1)[1])
                enc = next(e for e in self.manifest.encoders if e.row == row)
                models[name] = ChainRunner(OrtRunner(self.root / enc.file, "x", "x_parity"),
                                           self.f(worker))
            elif name == "parm":
                if self.manifest.parm is None:
                    raise EngineUnavailable("this bundle has no parm model")
                models[name] = OrtRunner(self.root / self.manifest.parm, "x", "logits_sum")
            elif name == "f_heads":
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
            name: np.zeros((1, k, *chw) if name == "parm" or name.startswith("enc_f/")
                           else (1, *chw), np.float32)
            for name in names
        }
