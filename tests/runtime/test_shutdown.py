"""Graceful shutdown of a real `python -m runtime serve` process on SIGTERM / SIGINT."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from runtime_harness import TinyModel, free_port, metric_value, random_images, read_metrics

REPO = Path(__file__).resolve().parents[2]


def _start(bundle: Path, port: int, metrics_port: int, *flags: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", str(bundle), "--http-port", str(port),
         "--metrics-port", str(metrics_port), *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return proc
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("server not ready within 60 s")


def _wait_inflight(metrics_port: int, count: int, timeout_s: float = 20.0) -> None:
    """Block until the server is handling `count` requests (so the signal hits them)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + timeout_s
    while metric_value(read_metrics(url), "coded_inflight_requests") < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} requests never in flight")
        time.sleep(0.02)


def _infer(port: int, images: np.ndarray) -> tuple[int, dict]:
    body = {"inputs": [{"name": "INPUT", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.ravel().tolist()}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/tiny/infer",
                                     data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _classes(payload: dict) -> list[int]:
    return next(o["data"] for o in payload["outputs"] if o["name"] == "digit_class")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_drains_in_flight_requests(tiny: TinyModel, sig: signal.Signals) -> None:
    port, metrics_port = free_port(), free_port()
    # every worker answer takes 1 s, so requests are surely in flight at the signal
    proc = _start(tiny.bundle, port, metrics_port, "--fault-delay-ms", "1000",
                  "--fault-delay-prob", "1", "--drain-timeout-s", "10")
    images = [random_images(2, seed=600 + i) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_infer, port, im) for im in images]
        _wait_inflight(metrics_port, len(images))
        proc.send_signal(sig)
        time.sleep(0.2)
        # no longer accepting: new connections are refused (or told 503) while draining
        try:
            status, _ = _infer(port, images[0])
            assert status == 503
        except urllib.error.URLError:
            pass
        results = [f.result(timeout=30) for f in futures]
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    for im, (status, payload) in zip(images, results, strict=True):
        assert status == 200, payload
        assert _classes(payload) == tiny.logits(im)["digit"].argmax(axis=1).tolist()
    assert "shutting down: draining" in output
    assert "serving tiny" in output and "mode=coded n=3 k=2" in output  # start-up facts
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    else:
        assert "loop=uvloop" in output  # the CLI runs on uvloop where it is installed


def test_drain_timeout_bounds_shutdown(tiny: TinyModel) -> None:
    port, metrics_port = free_port(), free_port()
    proc = _start(tiny.bundle, port, metrics_port, "--fault-delay-ms", "4000",
                  "--fault-delay-prob", "1", "--worker-deadline-ms", "10000",
                  "--drain-timeout-s", "0.5")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_infer, port, random_images(2, seed=700))
        _wait_inflight(metrics_port, 1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        stopped_s = time.monotonic() - t0
        status, payload = future.result(timeout=30)
    assert proc.returncode == 0, output
    assert stopped_s < 3.5  # well before the 4 s worker answer
    assert status == 503 and "shut down" in payload["error"]


def test_connections_waiting_in_the_backlog_at_sigterm_get_a_clean_answer(tiny: TinyModel) -> None:
    """Connections the kernel accepted but the server had not yet taken when SIGTERM came
    are answered (503 + Connection: close, or served), never reset."""
    import os
    import socket

    port, metrics_port = free_port(), free_port()
    proc = _start(tiny.bundle, port, metrics_port, "--drain-timeout-s", "2")
    body = json.dumps({"inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4], "datatype": "UINT8",
                                   "data": [3] * 16}]}).encode()
    request = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
               "\r\n\r\n").encode() + body
    sockets = []
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # it cannot accept; the kernel still queues handshakes
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(request)
            sockets.append(sock)
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        status_lines = []
        for sock in sockets:
            try:
                status_lines.append(sock.recv(200).split(b"\r\n", 1)[0])
            except ConnectionResetError:
                status_lines.append(b"reset")
        assert proc.wait(timeout=30) == 0
    finally:
        for sock in sockets:
            sock.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert all(line in (b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable")
               for line in status_lines), status_lines
