"""`python -m bench.triton_peer BUNDLE --port P`: the bundle's f + primary head, UNCODED, on real Triton.

The throughput bench's peer (bench/throughput.py): the same model a stock serving stack
would run, so the coded server's images/s can be compared with something a user could
deploy instead. PyTriton 0.7.0 starts its bundled `tritonserver` with a Python backend
whose callable runs here: ONNX Runtime on f.onnx then the primary head, one session pair
per model instance (`--instances`, `--threads` intra-op threads each), behind Triton's
dynamic batcher (`--max-batch-size`, `--max-queue-delay-us`).

The model takes the server's input (name and shape from the manifest, UINT8 [B, C, H, W],
normalised with the manifest's preprocessing by runtime/model_io.py `preprocess`), so the
same wrk body works against both; it answers `<task>_logits` and `<task>_class` of the
primary head. Only KServe v2 HTTP is served, on 127.0.0.1: gRPC, metrics, SageMaker and
Vertex AI endpoints are off. `--coding N,K` loads the manifest with that code selected, as
the coded server it is compared with (f and the heads are the same for every code).

It runs in its own Python 3.12 venv (`.venv-triton`, made by bench/setup_peers.sh; the
Python backend stub needs that interpreter's `lib` on LD_LIBRARY_PATH, which the bench
sets). It never imports torch, and this module imports pytriton only inside `serve`, so
the unit tests can import it from the main venv. SIGTERM stops tritonserver and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code
from runtime.manifest import F_IO, HEAD_IO, MANIFEST_NAME, Manifest, class_output, logits_output
from runtime.model_io import preprocess

logger = logging.getLogger("bench.triton_peer")

LOOPBACK = "127.0.0.1"
DEFAULT_PYTHON = ".venv-triton/bin/python"  # made by bench/setup_peers.sh
SETUP_HINT = "run `bash bench/setup_peers.sh triton`"


class PeerConfigError(ValueError):
    """Invalid peer flags."""


@dataclass(frozen=True)
class PeerConfig:
    bundle: str
    port: int
    coding: str | None = None  # the bundle's code, "N,K" (f and the head are the same for every code)
    instances: int = 2  # model instances (one ONNX Runtime session pair each)
    threads: int = 1  # intra-op threads per session
    max_batch_size: int = 64  # Triton's largest batch (requests of up to this many images)
    max_queue_delay_us: int = 2000  # dynamic batcher: longest a request waits for others
    log_verbose: int = 0

    def __post_init__(self) -> None:
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise PeerConfigError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        check_coding(self.coding, [self.bundle], PeerConfigError)  # frozen: load_code parses it again
        if not 1 <= self.port <= 65535:
            raise PeerConfigError(f"--port must be 1..65535, got {self.port}")
        for name in ("instances", "threads", "max_batch_size"):
            if getattr(self, name) < 1:
                raise PeerConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise PeerConfigError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")


def triton_config_kwargs(config: PeerConfig) -> dict[str, Any]:
    """TritonConfig fields: HTTP on 127.0.0.1:port only; every other listener off."""
    return {"http_address": LOOPBACK, "http_port": config.port, "allow_http": True,
            "allow_grpc": False, "grpc_address": LOOPBACK,
            "allow_metrics": False, "allow_gpu_metrics": False, "allow_cpu_metrics": False,
            "metrics_address": LOOPBACK, "allow_sagemaker": False, "allow_vertex_ai": False,
            "exit_on_error": True, "exit_timeout_secs": 5, "log_verbose": config.log_verbose}


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def make_infer(bundle: str | Path, m: Manifest, threads: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """images [B, C, H, W] uint8 -> {<task>_logits [B, classes] fp32, <task>_class [B, 1] int64}.

    Classes are [B, 1] because Triton's batched outputs need a per-item shape (here [1])."""
    root, head = Path(bundle), m.primary_head
    f, g = _session(root / m.f, threads), _session(root / head.file, threads)
    logits_name, class_name = logits_output(head.task), class_output(head.task)

    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        z = f.run([F_IO[1]], {F_IO[0]: preprocess(images, m.input)})[0]  # [B, *embedding]
        logits = g.run([HEAD_IO[1]], {HEAD_IO[0]: z})[0].astype(np.float32)  # [B, classes]
        return {logits_name: logits, class_name: np.argmax(logits, axis=1).astype(np.int64)[:, None]}

    return infer


def serve(config: PeerConfig) -> None:
    """Bind the model into PyTriton's tritonserver and block until SIGTERM / SIGINT."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

    m = load_code(config.bundle, config.coding)
    head = m.primary_head

    def instance() -> Callable[..., dict[str, np.ndarray]]:
        infer = make_infer(config.bundle, m, config.threads)

        @batch
        def run(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            return infer(inputs[m.input.name])

        return run

    model_config = ModelConfig(max_batch_size=config.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us))
    # the statistics endpoint open (loopback only): the bench reads the peer's batch sizes
    # there as it does the server's; PyTriton protects it with a token by default
    security = TritonSecurityConfig(restricted_endpoints=[
        e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    with Triton(config=TritonConfig(**triton_config_kwargs(config)), security_config=security) as triton:
        triton.bind(model_name=m.model_name, infer_func=[instance() for _ in range(config.instances)],
                    inputs=[Tensor(name=m.input.name, dtype=np.uint8, shape=tuple(m.input.shape))],
                    outputs=[Tensor(name=logits_output(head.task), dtype=np.float32, shape=(len(head.classes),)),
                             Tensor(name=class_output(head.task), dtype=np.int64, shape=(1,))],
                    config=model_config, strict=False)
        logger.info("triton peer: model %s on http://%s:%d (%d instance(s) x %d thread(s))",
                    m.model_name, LOOPBACK, config.port, config.instances, config.threads)
        triton.serve()


def _stop_on_sigterm() -> None:
    """SIGTERM -> SystemExit, so `with Triton` stops tritonserver instead of orphaning it."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.triton_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    p.add_argument("--coding", help=CODING_HELP)
    defaults = PeerConfig.__dataclass_fields__
    for name in ("instances", "threads", "max_batch_size", "max_queue_delay_us", "log_verbose"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name].default)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = PeerConfig(**vars(build_parser().parse_args(argv)))
    except PeerConfigError as exc:
        logger.error("%s", exc)
        return 2
    _stop_on_sigterm()
    serve(config)
    return 0


# -- the bench's side (main venv): start the peer, or say why it cannot ---------------------------
def _probe(python: Path, code: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=timeout_s)


def peer_environment(python: str | Path) -> tuple[dict[str, str] | None, str | None]:
    """(environment to run the peer with, None) or (None, why the peer cannot run).

    Checks that the venv's interpreter exists and imports pytriton, onnxruntime and numpy,
    and puts the interpreter's own `lib` dir (sysconfig LIBDIR: where libpython lives, which
    PyTriton's backend stub links against) first on LD_LIBRARY_PATH."""
    python = Path(python)
    if not python.exists():
        return None, f"{python} not found (no PyTriton venv); {SETUP_HINT}"
    try:
        probe = _probe(python, "import sysconfig, pytriton, onnxruntime, numpy; "
                               "print(sysconfig.get_config_var('LIBDIR'))")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{python} could not run ({type(exc).__name__}: {exc}); {SETUP_HINT}"
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{python} cannot import pytriton/onnxruntime/numpy ({tail}); {SETUP_HINT}"
    libdir = probe.stdout.strip()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env, None


class PeerProcess:
    """`with PeerProcess(bundle, python, log_path, ...) as peer: peer.url ...`

    Starts `python -m bench.triton_peer BUNDLE --port P [--coding N,K]` in its own session (so tritonserver
    and its backend stubs share one process group that can be killed if anything is left),
    waits until the model is ready, and on exit sends SIGTERM, then SIGKILL to the group."""

    def __init__(self, bundle: str | Path, model_name: str, python: str | Path, env: dict[str, str],
                 log_path: Path, options: dict[str, int] | None = None, ready_timeout_s: float = 180.0,
                 stop_timeout_s: float = 30.0, coding: str | None = None) -> None:
        from bench.serverproc import free_port

        self.model_name = model_name
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in (options or {}).items()]
        self.command = [str(python), "-m", "bench.triton_peer", str(bundle), "--port", str(self.port),
                        *coding_server_args(coding), *flags]
        self.env, self.log_path = env, log_path
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> PeerProcess:
        from bench.serverproc import REPO_ROOT

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting triton peer: %s", " ".join(self.command))
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                         env=self.env, start_new_session=True)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        logger.info("triton peer ready in %.1f s at %s", self.ready_s, self.url)
        return self

    def _wait_ready(self, t0: float) -> None:
        from bench.serverproc import BenchProcessError, _tail

        assert self.proc is not None
        ready = f"{self.url}/v2/models/{self.model_name}/ready"
        while time.perf_counter() < t0 + self.ready_timeout_s:
            if self.proc.poll() is not None:
                raise BenchProcessError(f"triton peer exited with code {self.proc.returncode} before it was "
                                        f"ready; log tail ({self.log_path}):\n{_tail(self.log_path, 1500)}")
            try:
                with urllib.request.urlopen(ready, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or the model is still loading
            time.sleep(0.5)
        raise BenchProcessError(f"triton peer not ready within {self.ready_timeout_s:.0f} s; log tail "
                                f"({self.log_path}):\n{_tail(self.log_path, 1500)}")

    def stop(self) -> None:
        """SIGTERM (tritonserver unloads and exits), then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("triton peer pid %d ignored SIGTERM for %.0f s; killing its group",
                               self.proc.pid, self.stop_timeout_s)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group is the peer's own session
        except (ProcessLookupError, PermissionError):
            pass  # nothing left
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    raise SystemExit(main())
