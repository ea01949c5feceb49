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
from runtime.gpu_decode import DeviceResult
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

    def close(self) -> None:
        close_runners((self.first, *self.rest))


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
        # GPU decoding (runtime.gpu_decode): return the CUDA tensor and its event, no host copy
        self.keep_on_device = keep_on_device and self.stream is not None
        logger.debug("torch runner %s on %s (worker stream %d)", name, device, stream_index)

    def run(self, x: np.ndarray) -> np.ndarray | DeviceResult:
        torch = self._torch
        with torch.inference_mode():
            if self.stream is None:
                return self.module(torch.from_numpy(x)).numpy()
            with torch.cuda.stream(self.stream):
                xd = torch.from_numpy(np.ascontiguousarray(x)).pin_memory().to(
                    self.device, non_blocking=True)
                y = self.module(xd)
                y = y.contiguous() if self.keep_on_device else y.to("cpu", non_blocking=True)
                # blocking: this thread sleeps until the GPU is done instead of spinning
                done = torch.cuda.Event(blocking=True)
                done.record(self.stream)
            # The call ends when its kernels have: a worker's arrival time is its GPU time
            # (the first k of n that finish decide). The decoder orders itself by the
            # event on the device, not by this host wait.
            done.synchronize()
            return DeviceResult(y, done) if self.keep_on_device else y.numpy()


class TensorRTRunner:
    """A deserialized TensorRT plan with its own execution context and CUDA stream.

    Written against the documented TensorRT >= 10 name-based API (num_io_tensors,
    get_tensor_name, set_input_shape, set_tensor_address, execute_async_v3); NOT run on
    this project's machines (no TensorRT there; see README "GPU"). `python -m export trt`
    builds one optimisation profile per concurrent worker context, so worker i selects
    profile i (mod the profile count). Driver calls go through kernels.cuda_driver.check(),
    which makes the device's primary context (shared with torch and the CUDA decoder)
    current on whichever thread calls: workers are built and run on executor threads.
    Device buffers and page-locked host staging buffers are made once and grown, never per
    call (a page-locked allocation is slow and synchronises), and freed by close().
    """

    def __init__(self, plan: bytes, name: str, worker: int, input_name: str = F_IO[0],
                 output_name: str = F_IO[1]) -> None:
        from kernels.cuda_driver import check, import_pycuda
        from kernels.errors import CudaUnavailableError

        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineUnavailable(
                "--engine tensorrt needs TensorRT (see README \"GPU\": it comes from NVIDIA's "
                f"package index) and an NVIDIA GPU: {exc}"
            ) from exc
        try:
            cuda, _ = import_pycuda()
        except CudaUnavailableError as exc:
            raise EngineUnavailable(f"--engine tensorrt needs pycuda and a GPU: {exc}") from exc
        self._cuda, self._check, self.name = cuda, check, name
        self._device: dict[str, tuple[object, int]] = {}  # tensor -> (allocation, bytes)
        self._host: dict[str, np.ndarray] = {}  # tensor -> page-locked float32 staging
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
        self.stream = check("create a stream", cuda.Stream)  # on this (executor) thread
        self.context = engine.create_execution_context()
        profile = worker % max(engine.num_optimization_profiles, 1)
        self.context.set_optimization_profile_async(profile, self.stream.handle)
        self.input_name, self.output_name = input_name, output_name

    def _device_buffer(self, name: str, nbytes: int) -> object:
        held = self._device.get(name)
        if held is None or held[1] < nbytes:
            if held is not None:
                self.stream_synchronize()  # the old buffer may still be read by queued work
                self._check(f"free the {name} buffer", held[0].free)
            held = (self._check(f"allocate {nbytes} bytes for {name}", self._cuda.mem_alloc, nbytes), nbytes)
            self._device[name] = held
            self.context.set_tensor_address(name, int(held[0]))
        return held[0]

    def _staging(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A page-locked float32 view of `shape`, from a buffer kept and grown per tensor."""
        size = int(np.prod(shape))
        held = self._host.get(name)
        if held is None or held.size < size:
            if held is not None:
                self._check(f"free the {name} staging buffer", held.base.free)
            held = self._check(f"allocate page-locked memory for {name}", self._cuda.pagelocked_empty,
                               (max(size, 1),), np.float32)
            self._host[name] = held
        return held[:size].reshape(shape)

    def stream_synchronize(self) -> None:
        self._check("synchronize the worker stream", self.stream.synchronize)

    def run(self, x: np.ndarray) -> np.ndarray:
        cuda, check = self._cuda, self._check
        x_host = self._staging(self.input_name, x.shape)
        np.copyto(x_host, x, casting="same_kind")
        if not self.context.set_input_shape(self.input_name, x.shape):
            raise EngineUnavailable(f"TensorRT rejected input shape {x.shape}: outside the "
                                    "plan's optimisation profile; rebuild with a larger max batch")
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        y_host = self._staging(self.output_name, out_shape)
        x_dev = self._device_buffer(self.input_name, x_host.nbytes)
        y_dev = self._device_buffer(self.output_name, y_host.nbytes)
        check("copy the input to the device", cuda.memcpy_htod_async, x_dev, x_host, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EngineUnavailable("TensorRT execute_async_v3 failed")
        check("copy the output to the host", cuda.memcpy_dtoh_async, y_host, y_dev, self.stream)
        self.stream_synchronize()
        return y_host.copy()  # the staging buffer is the next call's

    def close(self) -> None:
        """Free the device and page-locked buffers (with the context current: check())."""
        if self._device or self._host:
            self.stream_synchronize()
        for name, (allocation, _) in self._device.items():
            self._check(f"free the {name} buffer", allocation.free)
        for name, staging in self._host.items():
            self._check(f"free the {name} staging buffer", staging.base.free)
        self._device, self._host = {}, {}


def close_runners(runners: Iterable[object]) -> None:
    """Release what runners hold outside Python's heap (TensorRTRunner's buffers); runners
    without a close() hold nothing that needs it."""
    for runner in runners:
        close = getattr(runner, "close", None)
        if close is not None:
            close()


def find_tensorrt_plan(files: Iterable[str]) -> str:
    """The bundle path of `engines/<sm>_trt<version>/f.plan` for this GPU and TensorRT."""
    from kernels.cuda_driver import check, import_pycuda
    from kernels.errors import CudaUnavailableError

    try:
        import tensorrt as trt
        _, context = import_pycuda()
    except (ImportError, CudaUnavailableError) as exc:
        raise EngineUnavailable(f"--engine tensorrt needs tensorrt and pycuda: {exc}") from exc
    major, minor = check("query the device", lambda: context.get_device().compute_capability())
    wanted = plan_file(F_FILE, (major, minor), trt.__version__)
    plans = sorted(p for p in files if p.startswith(f"{ENGINES_DIR}/")
                   and p.endswith("/" + Path(wanted).name))
    if wanted not in plans:
        raise EngineUnavailable(
            f"bundle has no TensorRT plan for this GPU and TensorRT ({wanted}); it has {plans}. "
            "Build one with `python -m export trt BUNDLE` on this machine, or use --engine torch"
        )
    return wanted
