"""Runtime test harness: a tiny exact bundle built with onnx.helper, and real servers.

The bundle: input [1, 4, 4] (d = 16), f(x) = reshape(flatten(x) @ A) with A invertible, so
f is linear and the encoder Enc_r(x_1..x_k) = sum_j C[r, j] x_j is EXACT
(f(sum_j c_j x_j) = sum_j c_j f(x_j)); coded decoding is then exact up to float32 rounding
and every label is checkable with numpy. Heads are linear; parm is exact too.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # the GPU check's machine has no onnx: its tests use the shipped bundle instead
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    onnx = None

from runtime.config import ServerConfig
from runtime.manifest import code_encoder_file, code_parm_file, sha256_file
from runtime.server import Server

CHW = (1, 4, 4)
EMB = (4, 2, 2)
D = 16
MEAN, STD = 0.5, 0.25
TASKS = {"digit": 3, "parity": 2}


@dataclass
class TinyModel:
    bundle: Path
    A: np.ndarray  # [16, 16]
    W: dict[str, np.ndarray]  # task -> [16, classes]
    b: dict[str, np.ndarray]
    k: int
    n: int

    def logits(self, raw_uint8: np.ndarray) -> dict[str, np.ndarray]:
        """Reference logits for raw images [B, 1, 4, 4] uint8 (float64)."""
        x = (raw_uint8.astype(np.float64) / 255.0 - MEAN) / STD
        z = x.reshape(len(x), D) @ self.A  # [B, 16]
        return {t: z @ self.W[t] + self.b[t] for t in TASKS}


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _f_graph(A: np.ndarray, in_name: str, out_name: str, prefix: str) -> tuple[list, list]:
    nodes = [
        helper.make_node("Reshape", [in_name, f"{prefix}flat_shape"], [f"{prefix}flat"]),
        helper.make_node("MatMul", [f"{prefix}flat", f"{prefix}A"], [f"{prefix}zflat"]),
        helper.make_node("Reshape", [f"{prefix}zflat", f"{prefix}emb_shape"], [out_name]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, D], np.int64), f"{prefix}flat_shape"),
        numpy_helper.from_array(A.astype(np.float32), f"{prefix}A"),
        numpy_helper.from_array(np.array([-1, *EMB], np.int64), f"{prefix}emb_shape"),
    ]
    return nodes, inits


def _tensor(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _coefficients(n: int, k: int) -> np.ndarray:
    return np.full((n - k, k), 1.0 / k) if n - k == 1 else \
        np.array([[1.0 / k] * k] + [[(j + 1.0) ** r for j in range(k)] for r in range(1, n - k)])


def _write_encoders(root: Path, coefficients: np.ndarray, files: list[str]) -> list[dict]:
    """Enc_r(x) = sum_j C[r, j] x_j into `files[r]` (exact for the linear f)."""
    k = coefficients.shape[1]
    encoders = []
    for r, rel in enumerate(files):
        coeff = np.asarray(coefficients[r], np.float32).reshape(1, k, 1, 1, 1)
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "c"], ["weighted"]),
             helper.make_node("ReduceSum", ["weighted", "axes"], ["x_parity"], keepdims=0)],
            f"enc_{r}", [_tensor("x", ["batch", k, *CHW])], [_tensor("x_parity", ["batch", *CHW])],
            [numpy_helper.from_array(coeff, "c"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")])
        _save(helper.make_model(graph), root / rel)
        encoders.append({"row": r, "file": rel})
    return encoders


def _write_parm(root: Path, rel: str, k: int, A: np.ndarray, W: np.ndarray, b: np.ndarray) -> None:
    """parm: sum_j logits_primary(x_j) = f(sum_j x_j) W + k b (exact for linear f and head)."""
    f_nodes, f_inits = _f_graph(A, "xsum", "zsum", "f_")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["xsum"], keepdims=0), *f_nodes,
         helper.make_node("Reshape", ["zsum", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["mm"]),
         helper.make_node("Add", ["mm", "kb"], ["logits_sum"])],
        "parm", [_tensor("x", ["batch", k, *CHW])], [_tensor("logits_sum", ["batch", W.shape[1]])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes"), *f_inits,
         numpy_helper.from_array(np.array([-1, D], np.int64), "shape"),
         numpy_helper.from_array(W, "W"),
         numpy_helper.from_array((k * b).astype(np.float32), "kb")])
    _save(helper.make_model(graph), root / rel)


def build_tiny_bundle(root: Path, k: int = 2, n: int = 3, seed: int = 0,
                      codes: list[tuple[int, int]] | None = None) -> TinyModel:
    """A schema-1 bundle of the one code (n, k) (the layout of bundles exported before
    several codes), or with `codes` [(n, k), ...] a schema-2 bundle holding each of them
    (encoders and a ParM per code, in runtime.manifest's codes/ layout; the first is the
    default and is the TinyModel's n, k)."""
    if onnx is None:
        raise RuntimeError("the tiny test bundle needs onnx (pip install -e '.[train]')")
    rng = np.random.default_rng(seed)
    A = (np.eye(D) + 0.3 * rng.standard_normal((D, D))).astype(np.float32)  # invertible (a.s.)
    W = {t: rng.standard_normal((D, c)).astype(np.float32) for t, c in TASKS.items()}
    b = {t: rng.standard_normal(c).astype(np.float32) for t, c in TASKS.items()}

    nodes, inits = _f_graph(A, "x", "z", "")
    _save(helper.make_model(helper.make_graph(
        nodes, "f", [_tensor("x", ["batch", *CHW])], [_tensor("z", ["batch", *EMB])], inits)),
        root / "f.onnx")
    heads = []
    for task, classes in TASKS.items():
        graph = helper.make_graph(
            [helper.make_node("Reshape", ["z", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"])],
            task, [_tensor("z", ["batch", *EMB])], [_tensor("logits", ["batch", classes])],
            [numpy_helper.from_array(np.array([-1, D], np.int64), "shape"),
             numpy_helper.from_array(W[task], "W"), numpy_helper.from_array(b[task], "b")])
        _save(helper.make_model(graph), root / f"heads/{task}.onnx")
        heads.append({"task": task, "file": f"heads/{task}.onnx",
                      "classes": [f"{task}{c}" for c in range(classes)]})
    primary = next(iter(TASKS))
    if codes is None:  # schema 1: encoders/enc_<r>.onnx, parm.onnx, one code at the top level
        coefficients = _coefficients(n, k)
        encoders = _write_encoders(root, coefficients, [f"encoders/enc_{r}.onnx" for r in range(n - k)])
        _write_parm(root, "parm.onnx", k, A, W[primary], b[primary])
        version, code_fields = 1, {"coding": {"n": n, "k": k, "coefficients": coefficients.tolist()},
                                   "encoders": encoders, "parm": "parm.onnx"}
    else:
        entries = []
        for cn, ck in codes:
            coefficients = _coefficients(cn, ck)
            encoders = _write_encoders(root, coefficients,
                                       [code_encoder_file(cn, ck, r) for r in range(cn - ck)])
            _write_parm(root, code_parm_file(cn, ck), ck, A, W[primary], b[primary])
            entries.append({"n": cn, "k": ck, "coefficients": coefficients.tolist(),
                            "encoders": encoders, "parm": code_parm_file(cn, ck)})
        (n, k), version, code_fields = codes[0], 2, {"codes": entries}

    files = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.onnx"))]
    manifest = {
        "schema_version": version,
        "model_name": "tiny",
        "input": {"name": "INPUT", "shape": list(CHW), "accepted_dtypes": ["UINT8", "FP32"],
                  "preprocessing": {"mean": [MEAN], "std": [STD]}},
        "embedding_shape": list(EMB),
        "f": "f.onnx",
        "heads": heads,
        **code_fields,
        "files": {rel: sha256_file(root / rel) for rel in files},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return TinyModel(bundle=root, A=A.astype(np.float64), W={t: w.astype(np.float64) for t, w in W.items()},
                     b={t: v.astype(np.float64) for t, v in b.items()}, k=k, n=n)


class ServerThread:
    """A real Server on 127.0.0.1 (ephemeral ports) in a background thread with its own loop."""

    def __init__(self, config: ServerConfig, ready_timeout_s: float = 60.0) -> None:
        self.config = config
        self.server: Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)
        self._ready_timeout_s = ready_timeout_s

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.server = Server(self.config)
            try:
                await self.server.startup()
                self._ready.set()
                await self._stop.wait()
            finally:
                await self.server.shutdown()

        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(self._ready_timeout_s):
            raise TimeoutError("test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            raise TimeoutError("test server did not shut down within 30 s")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.server is not None and self.server.http_port is not None
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def grpc_url(self) -> str:
        assert self.server is not None and self.server.grpc_port is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        assert self.server is not None and self.server.metrics_port is not None
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"


def server_config(bundle: Path, **overrides: object) -> ServerConfig:
    options: dict[str, object] = {"bundle": str(bundle), "http_port": 0, "metrics_port": 0,
                                  "grpc_port": 0, "log_level": "WARNING"}
    options.update(overrides)
    return ServerConfig.from_dict(options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{key}="{val}"' in label_text for key, val in labels.items()):
            total += float(value)
    return total


def random_images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, *CHW), dtype=np.uint8)


class ClientPool:
    """Concurrent tritonclient callers: one InferenceServerClient per thread."""

    def __init__(self, url: str, threads: int, model: str = "tiny") -> None:
        import concurrent.futures

        import tritonclient.http as triton

        self._triton = triton
        self._url = url
        self._model = model
        self._local = threading.local()
        self.executor = concurrent.futures.ThreadPoolExecutor(threads)

    def _client(self):  # noqa: ANN202 - tritonclient type
        if not hasattr(self._local, "client"):
            self._local.client = self._triton.InferenceServerClient(self._url, connection_timeout=60,
                                                                     network_timeout=60)
        return self._local.client

    def infer(self, images: np.ndarray, request_id: str, parameters: dict | None = None):  # noqa: ANN201
        """(status, InferResult or error message); never raises for HTTP errors."""
        triton = self._triton
        inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        try:
            return 200, self._client().infer(self._model, [inp], request_id=request_id,
                                             parameters=parameters)
        except triton.InferenceServerException as exc:
            return int(exc.status() or 0), exc.message()

    def map(self, fn, items):  # noqa: ANN001, ANN201
        return list(self.executor.map(fn, items))

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def read_metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


# -- the middle layers without a server: fake clock, event-loop ordering, metrics ---------------
SETTLE_ROUNDS = 50  # loop iterations that let every ready callback and task run


class FakeClock:
    """A clock the test sets by hand (`Batcher(clock=...)`): what the batcher decides then
    depends on this clock only, never on how fast the machine is."""

    def __init__(self, now_s: float = 0.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


async def settle(rounds: int = SETTLE_ROUNDS) -> None:
    """Run the event loop until everything that is ready has run (no wall-clock wait)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(predicate, what: str, rounds: int = SETTLE_ROUNDS) -> None:  # noqa: ANN001
    """Run the event loop until `predicate()` holds; fail (naming `what`) if it never does."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    if not predicate():
        raise AssertionError(f"never happened: {what}")


def metric_sample(metrics, name: str, **labels: str) -> float:  # noqa: ANN001 - runtime Metrics
    """Sum of the samples `name` of a runtime.metrics.Metrics registry whose labels include
    `labels` (0 when there is none), e.g. metric_sample(m, "coded_erasures_total", worker="1")."""
    return sum(sample.value for family in metrics.registry.collect() for sample in family.samples
               if sample.name == name
               and all(sample.labels.get(key) == value for key, value in labels.items()))


# The shipped datasets beside the checkout, or $CODED_INVNET_DATA (trainer.data's rule; the
# runtime tests do not import trainer)
DATA_ROOT = Path(os.environ.get("CODED_INVNET_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")


def read_idx(path: Path) -> np.ndarray:
    """IDX (optionally gzip) -> uint8 array: magic 0x0000 08 <ndim>, big-endian dims (the
    runtime must not import trainer, so its tests read MNIST with this)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        zero, dtype_code, ndim = struct.unpack(">HBB", fh.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
        return np.frombuffer(fh.read(), dtype=np.uint8).reshape(dims)


def mnist_test(root: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` MNIST test images [N, 1, 28, 28] uint8 and labels [N] from `root`."""
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")[:count]
    return images[:, None], labels
