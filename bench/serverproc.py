"""Start the real server and the load generator as subprocesses, always stop them.

`ServerProcess` is a context manager around `python -m runtime serve BUNDLE ...` on
127.0.0.1: it picks free ports, waits for `GET /v2/health/ready` == 200 (bounded), and on
exit sends SIGTERM (the server drains), then SIGKILL after `stop_timeout_s`. Logs go to a
file so a full pipe can never block the server. `run_loadgen` runs `python -m bench.loadgen`
with a wall-clock bound and returns its record.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.errors import BenchError
from bench.loadgen import LoadConfig, LoadRecord

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchProcessError(BenchError, RuntimeError):
    """A server or load generator did not start, answer, or finish in time."""


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so `finally` / `__exit__` stop the child processes."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen, stop_timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=stop_timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, stop_timeout_s)
        proc.kill()
        proc.wait(timeout=10)


class ServerProcess:
    """`with ServerProcess(bundle, ["--mode", "coded"], log_path) as srv: srv.url ...`"""

    def __init__(self, bundle: str | Path, args: list[str], log_path: Path,
                 ready_timeout_s: float = 180.0, stop_timeout_s: float = 20.0) -> None:
        self.bundle = Path(bundle)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"  # KServe v2 gRPC (host:port)
        self.command = [sys.executable, "-m", "runtime", "serve", str(self.bundle),
                        "--host", "127.0.0.1", "--http-port", str(self.port),
                        "--grpc-port", str(self.grpc_port), "--metrics-port", "-1", *args]
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting server: %s", " ".join(self.command))
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process below
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()  # the child holds its own descriptor
        try:
            self._wait_ready(t0)
        except BaseException:
            _stop(self.proc, self.stop_timeout_s)
            raise
        self.ready_s = time.perf_counter() - t0
        logger.info("server ready in %.1f s at %s", self.ready_s, self.url)
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None  # set by __enter__ just before
        deadline = t0 + self.ready_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise BenchProcessError(
                    f"server exited with code {self.proc.returncode} before it was ready; "
                    f"command: {' '.join(self.command)}\nlog tail ({self.log_path}):\n{_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while warming up
            time.sleep(0.2)
        raise BenchProcessError(
            f"server not ready within {self.ready_timeout_s:.0f} s (raise --ready-timeout-s); "
            f"log tail ({self.log_path}):\n{_tail(self.log_path)}"
        )

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, self.stop_timeout_s)
            logger.info("server stopped (exit code %s)", self.proc.returncode)


def loadgen_argv(config: LoadConfig, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "bench.loadgen", "--out", str(out)]
    for key, value in vars(config).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return argv


def run_loadgen(config: LoadConfig, out: Path, log_path: Path, timeout_s: float) -> LoadRecord:
    """Run the load generator in its own process; kill it after `timeout_s`."""
    argv = loadgen_argv(config, out)
    out.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BenchProcessError(
                f"load generator still running after {timeout_s:.0f} s; killed it. Log: {log_path}"
            ) from exc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    if rc != 0 or not out.is_file():
        raise BenchProcessError(f"load generator failed (exit {rc}); log tail:\n{_tail(log_path)}")
    return LoadRecord.from_dict(json.loads(out.read_text()))
