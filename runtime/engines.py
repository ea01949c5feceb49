"""Model runners: one compiled model behind `run(x) -> y`, per inference engine.

- onnxruntime (default): CPU sessions, one intra-op thread each and no spin-waiting, so
  n workers share a 2-core machine politely; the runtime's thread pool provides parallelism.
- torch: `torch.export` programs from manifest["torch"] on CUDA, one stream per worker.
- tensorrt: serialized plans `engines/<sm>_trt<version>/f.plan`, name-based I/O tensors.

torch, tensorrt and pycuda are imported lazily inside their runners, so a CPU-only serving
install never needs them (tests/runtime/test_imports.py enforces this).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.errors import EngineUnavailable
from runtime.manifest import ENGINES_DIR, F_FILE, F_IO, plan_file

logger = logging.getLogger(__name__)


class ModelRunner(Protocol):
    """A loaded model with one input and one output tensor (names per docs/ARCHITECTURE.md)."""

    def run(self, x: np.ndarray) -> np.ndarray: ...


class OrtRunner:
    """An ONNX model from its bytes (`name`: the bundle path, for messages)."""

    def __init__(self, model: bytes, name: str, input_name: str = F_IO[0],
                 output_name: str | None = None) -> None:
        import onnxruntime as ort  # imported here so `--help` and manifest tooling stay fast

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn a core while idle; the box is shared with training.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.name = name
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if input_name not in inputs:
            raise EngineUnavailable(
                f"{name}: expected an input tensor named {input_name!r}, the file has {inputs}; "
                "re-export the bundle (tensor names are fixed in docs/ARCHITECTURE.md)"
            )
        if output_name is not None and output_name not in outputs:
            raise EngineUnavailable(
                f"{name}: expected an output tensor named {output_name!r}, the file has {outputs}"
            )
        self.input_name = input_name
        self.output_name = output_name or outputs[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]


class ChainRunner:
    """Runs models one after the other (encoder -> f on a backup worker, f -> heads)."""

    def __init__(self, first: ModelRunner, *rest: ModelRunner, concat_rest: bool = False) -> None:
        self.first, self.rest, self.concat_rest = first, rest, concat_rest

    def run(self, x: np.ndarray) -> np.ndarray:
        y = self.first.run(x)
        if self.concat_rest:  # f -> every head, logits side by side: [B, sum(classes)]
            return np.concatenate([r.run(y) for r in self.rest], axis=1)
        for runner in self.rest:
            y = runner.run(y)
        return y


class TorchRunner:
    """A `torch.export` program on one CUDA stream (GPU machines without TensorRT)."""

    def __init__(self, program: bytes, name: str, device: str, stream_index: int,
                 keep_on_device: bool = False) -> None:
        try:
            import torch
        except ImportError as exc:
            raise EngineUnavailable(
                "--engine torch needs PyTorch (pip install torch); this install has none"
            ) from exc
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("--engine torch --device cuda: no CUDA device is visible")
        self._torch = torch
        self.device = torch.device(device)
        self.module = torch.export.load(io.BytesIO(program)).module().to(self.device)
        # One stream per worker, so workers overlap on one GPU like separate machines would.
        self.stream = torch.cuda.Stream(device=self.device) if device == "cuda" else None
        # GPU decoding (runtime.gpu_decode): return the CUDA tensor, not a host copy
        self.keep_on_device = keep_on_device and self.stream is not None
        logger.debug("torch runner %s on %s (worker stream %d)", name, device, stream_index)

    def run(self, x: np.ndarray) -> np.ndarray:  # or a CUDA tensor when keep_on_device
        torch = self._torch
        with torch.inference_mode():
            if self.stream is None:
                return self.module(torch.from_numpy(x)).numpy()
            with torch.cuda.stream(self.stream):
                xd = torch.from_numpy(np.ascontiguousarray(x)).pin_memory().to(
                    self.device, non_blocking=True)
                y = self.module(xd)
                if not self.keep_on_device:
                    y = y.to("cpu", non_blocking=True)
            self.stream.synchronize()  # the result is complete before anyone else reads it
            return y if self.keep_on_device else y.numpy()


class TensorRTRunner:
    """A deserialized TensorRT plan with its own execution context and CUDA stream.

    Written against the documented TensorRT >= 10 name-based API (num_io_tensors,
    get_tensor_name, set_input_shape, set_tensor_address, execute_async_v3); NOT run on
    this project's CPU machines. `python -m export trt` builds one optimisation profile per
    concurrent worker context, so worker i selects profile i (mod the profile count).
    pycuda attaches to the device's primary context (shared with torch and the CUDA
    decoder); that context is pushed around every call because workers run on threads.
    """

    def __init__(self, plan: bytes, name: str, worker: int, input_name: str = F_IO[0],
                 output_name: str = F_IO[1]) -> None:
        try:
            import pycuda.autoprimaryctx as primary
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as exc:
            raise EngineUnavailable(
                "--engine tensorrt needs the `gpu` extra (tensorrt, pycuda) and an NVIDIA GPU: "
                f"{exc}"
            ) from exc
        self._cuda, self._trt, self._context = cuda, trt, primary.context
        trt_logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(trt_logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineUnavailable(f"{name}: TensorRT could not deserialize the plan (wrong "
                                    "TensorRT version or GPU?); rebuild it with `python -m export trt`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if input_name not in names or output_name not in names:
            raise EngineUnavailable(f"{name}: expected I/O tensors {input_name!r} and "
                                    f"{output_name!r}, the plan has {names}")
        self.engine = engine
        self.stream = cuda.Stream()
        self.context = engine.create_execution_context()
        profile = worker % max(engine.num_optimization_profiles, 1)
        self.context.set_optimization_profile_async(profile, self.stream.handle)
        self.input_name, self.output_name = input_name, output_name
        self._buffers: dict[str, tuple[object, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> object:
        held = self._buffers.get(name)
        if held is None or held[1] < nbytes:
            held = (self._cuda.mem_alloc(nbytes), nbytes)
            self._buffers[name] = held
            self.context.set_tensor_address(name, int(held[0]))
        return held[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        cuda = self._cuda
        self._context.push()  # worker threads have no current CUDA context of their own
        try:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if not self.context.set_input_shape(self.input_name, x.shape):
                raise EngineUnavailable(f"TensorRT rejected input shape {x.shape}: outside the "
                                        "plan's optimisation profile; rebuild with a larger max batch")
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            y = cuda.pagelocked_empty(out_shape, np.float32)
            x_dev = self._buffer(self.input_name, x.nbytes)
            y_dev = self._buffer(self.output_name, y.nbytes)
            cuda.memcpy_htod_async(x_dev, x, self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise EngineUnavailable("TensorRT execute_async_v3 failed")
            cuda.memcpy_dtoh_async(y, y_dev, self.stream)
            self.stream.synchronize()
            return np.array(y)
        finally:
            self._context.pop()


def find_tensorrt_plan(files: Iterable[str]) -> str:
    """The bundle path of `engines/<sm>_trt<version>/f.plan` for this GPU and TensorRT."""
    try:
        import pycuda.autoprimaryctx  # noqa: F401 - the device's primary context
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailable(f"--engine tensorrt needs tensorrt and pycuda: {exc}") from exc
    major, minor = cuda.Device(0).compute_capability()
    wanted = plan_file(F_FILE, (major, minor), trt.__version__)
    plans = sorted(p for p in files if p.startswith(f"{ENGINES_DIR}/")
                   and p.endswith("/" + Path(wanted).name))
    if wanted not in plans:
        raise EngineUnavailable(
            f"bundle has no TensorRT plan for this GPU and TensorRT ({wanted}); it has {plans}. "
            "Build one with `python -m export trt BUNDLE` on this machine, or use --engine torch"
        )
    return wanted
