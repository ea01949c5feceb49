"""`python -m bench.echo --port PORT`: a bare KServe v2 stub that answers every query at once.

Why: the latency bench under load (`python -m bench latency ... --load-fractions ...`)
drives the real server with bench/loadgen.py, and part of every latency it reports is the
client's own cost (Python, the event loop, HTTP parsing on a shared 2-core machine). Driving
this server with the same load generator, pattern and rates measures that floor: no model,
no batching, one aiohttp handler that reads the body and returns a fixed, valid v2 response.

`POST /v2/models/{name}/infer` -> 200 with one output and `parameters.reconstructed: false`;
`GET /v2/health/ready` -> 200. It listens on 127.0.0.1 only and exits cleanly on SIGTERM.
`EchoProcess` runs it as a subprocess on a free port, like bench/serverproc.ServerProcess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from bench.serverproc import REPO_ROOT, BenchProcessError, _stop, _tail, free_port
from runtime.manifest import RECONSTRUCTED_OUTPUT

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def echo_response(model_name: str) -> bytes:
    """The fixed answer: the shape a real server gives a batch-1 query (class + flag)."""
    return json.dumps({
        "model_name": model_name,
        "outputs": [{"name": "digit_class", "shape": [1], "datatype": "INT64", "data": [0]},
                    {"name": RECONSTRUCTED_OUTPUT, "shape": [1], "datatype": "BOOL", "data": [False]}],
        "parameters": {RECONSTRUCTED_OUTPUT: False},
    }, separators=(",", ":")).encode()


def make_app() -> web.Application:
    """The two routes; the body is read (a real server must read it too) and dropped.

    aiohttp is imported here, not at module level, as in bench/loadgen.py."""
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=echo_response(request.match_info["name"]), content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    return app


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    from aiohttp import web

    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("echo server on http://%s:%d", HOST, port)
    await stop.wait()
    await runner.cleanup()


class EchoProcess:
    """`with EchoProcess(log_path) as echo: echo.url ...`: the stub as a subprocess, always stopped."""

    def __init__(self, log_path: Path, ready_timeout_s: float = 30.0, stop_timeout_s: float = 10.0) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.command = [sys.executable, "-m", "bench.echo", "--port", str(self.port)]
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> EchoProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            self._wait_ready()
        except BaseException:
            _stop(self.proc, self.stop_timeout_s)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None  # set by __enter__ just before
        deadline = time.perf_counter() + self.ready_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise BenchProcessError(f"echo server exited with code {self.proc.returncode}; "
                                        f"log tail ({self.log_path}):\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.1)
        raise BenchProcessError(f"echo server not ready within {self.ready_timeout_s:.0f} s; "
                                f"log tail ({self.log_path}):\n{_tail(self.log_path)}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, self.stop_timeout_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help=f"TCP port on {HOST}")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s echo %(message)s")
    try:
        import uvloop  # the real server runs on uvloop: a fair floor does too
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
