"""Bad clients against a real server: slow or lying connections, disconnects, internal errors,
overload before the body, swapped files, readiness with workers down, draining."""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_harness import (
    ClientPool,
    ServerThread,
    TinyModel,
    metric_value,
    random_images,
    read_metrics,
    server_config,
)

from runtime.http_server import SERVER_NAME
from runtime.worker import WorkerState

BODY = json.dumps({"inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4], "datatype": "UINT8",
                               "data": [7] * 16}]}).encode()


def _connect(srv: ServerThread) -> socket.socket:
    host, port = srv.url.split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _request(srv: ServerThread, method: str, path: str, body: bytes | None = None
             ) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(srv.url, timeout=20)
    try:
        connection.request(method, path, body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _post_head(length: int) -> bytes:
    return (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_idle_and_slow_header_connections_are_closed(tiny: TinyModel) -> None:
    with ServerThread(server_config(tiny.bundle, keepalive_timeout_s=0.3)) as srv:
        idle = _connect(srv)
        slow = _connect(srv)
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        # the server, not the client, ends both (recv returns b"" on its close)
        assert _read_all(idle) == b""
        assert _read_all(slow) == b""
        idle.close()
        slow.close()


def test_a_lying_content_length_gets_408(tiny: TinyModel) -> None:
    with ServerThread(server_config(tiny.bundle, read_timeout_s=0.3)) as srv:
        sock = _connect(srv)
        sock.sendall(_post_head(len(BODY) + 100) + BODY)  # 100 bytes promised, never sent
        reply = _read_all(sock)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408")
        assert b"--read-timeout-s" in reply
        metrics = read_metrics(srv.metrics_url)
    assert metric_value(metrics, "nv_inference_request_failure", reason="BodyTimeout") == 1


def test_a_client_leaving_mid_body_is_counted_not_logged_as_an_error(
        tiny: TinyModel, caplog: pytest.LogCaptureFixture) -> None:
    with ServerThread(server_config(tiny.bundle)) as srv, caplog.at_level(logging.WARNING):
        sock = _connect(srv)
        sock.sendall(_post_head(len(BODY)) + BODY[:10])
        sock.close()
        deadline = time.monotonic() + 20
        while metric_value(read_metrics(srv.metrics_url), "nv_inference_request_failure",
                           reason="ClientDisconnected") < 1:
            assert time.monotonic() < deadline, "the disconnect was never counted"
            time.sleep(0.02)
        assert metric_value(read_metrics(srv.metrics_url), "nv_inference_request_failure",
                            reason="InternalError") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_internal_errors_say_only_internal_error_with_an_id_in_the_log(
        tiny: TinyModel, caplog: pytest.LogCaptureFixture) -> None:
    with ServerThread(server_config(tiny.bundle)) as srv, caplog.at_level(logging.ERROR):
        async def broken(*args: object, **kwargs: object) -> None:
            raise KeyError("secret internal detail")

        srv.server.engine.infer = broken  # type: ignore[union-attr, method-assign]
        status, headers, body = _request(srv, "POST", "/v2/models/tiny/infer", BODY)
        assert status == 500
        assert headers["Server"] == SERVER_NAME  # no Python / aiohttp versions
    message = json.loads(body)["error"]
    assert message.startswith("internal error (id ") and "secret" not in message
    error_id = message.split("id ")[1].split(";")[0]
    assert any(error_id in r.getMessage() for r in caplog.records)


def _wait_pending(srv: ServerThread, queries: int) -> None:
    deadline = time.monotonic() + 20
    while metric_value(read_metrics(srv.metrics_url), "nv_inference_pending_request_count") < queries:
        assert time.monotonic() < deadline, f"the queue never held {queries} queries"
        time.sleep(0.01)


def test_overload_is_refused_before_the_body_is_read(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, fault_delay_ms=300.0, fault_delay_prob=1.0,
                           max_queue_size=4, max_batch_size=4, max_inflight_groups=1,
                           straggler_scale=0, max_groups_per_call=1, max_queue_delay_ms=1.0, admission_wait_ms=0)
    with ServerThread(config) as srv:
        pool = ClientPool(srv.url, threads=2)
        try:
            # 2 queries run (slowly), 2 wait; then 2 more fill the queue to its limit of 4
            first = pool.executor.submit(pool.infer, random_images(4, seed=1), "first")
            _wait_pending(srv, 2)
            second = pool.executor.submit(pool.infer, random_images(2, seed=2), "second")
            _wait_pending(srv, 4)
            # only the headers of a huge request: the 503 comes without the body being sent
            sock = _connect(srv)
            try:
                sock.sendall(_post_head(5_000_000))
                reply = sock.recv(65536)
            finally:
                sock.close()
            assert first.result(timeout=30)[0] == 200 and second.result(timeout=30)[0] == 200
        finally:
            pool.close()
        metrics = read_metrics(srv.metrics_url)
    assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After" in reply
    assert b"overloaded" in reply
    assert metric_value(metrics, "coded_admission_rejected_total") >= 1


def test_a_restarted_worker_serves_the_verified_bytes_not_a_swapped_file(
        tiny: TinyModel, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny.bundle, bundle)
    config = server_config(bundle, fault_kill_worker=0, fault_kill_after_calls=2,
                           max_queue_delay_ms=1.0)
    images = random_images(2, seed=5)
    reference = tiny.logits(images)["digit"]
    with ServerThread(config) as srv:
        # swap f.onnx on disk for a different valid model (a head's file) after start-up
        (bundle / "f.onnx").write_bytes((bundle / "heads/digit.onnx").read_bytes())
        pool = ClientPool(srv.url, threads=1)
        try:
            results = [pool.infer(images, f"r{i}") for i in range(40)]
        finally:
            pool.close()
        metrics = read_metrics(srv.metrics_url)
    assert metric_value(metrics, "coded_worker_restarts_total", worker="0") == 1
    for status, result in results:
        assert status == 200, result
        np.testing.assert_allclose(result.as_numpy("digit_logits"), reference, atol=1e-3)


def test_not_ready_while_too_few_workers_are_up(tiny: TinyModel) -> None:
    with ServerThread(server_config(tiny.bundle)) as srv:
        engine = srv.server.engine  # type: ignore[union-attr]
        assert engine.health().ready
        workers = engine.pool._workers  # noqa: SLF001 - the test plays the supervisor
        workers[0].state = WorkerState.DEAD
        assert engine.health().ready  # coded n=3, k=2: any two answer
        workers[2].state = WorkerState.DEAD
        health = engine.health()
        status, _, _ = _request(srv, "GET", "/v2/health/ready")
        workers[0].state = workers[2].state = WorkerState.READY
    assert not health.ready and "only workers [1]" in (health.reason or "")
    assert status == 503


def test_draining_answers_503_and_closes_keep_alive_connections(tiny: TinyModel) -> None:
    with ServerThread(server_config(tiny.bundle)) as srv:
        connection = http.client.HTTPConnection(srv.url, timeout=20)
        try:
            connection.request("POST", "/v2/models/tiny/infer", BODY)
            first = connection.getresponse()
            first.read()
            done = threading.Event()
            srv._loop.call_soon_threadsafe(  # noqa: SLF001 - start the drain as SIGTERM would
                lambda: (srv.server.engine.begin_drain(), done.set()))  # type: ignore[union-attr]
            assert done.wait(10)
            connection.request("POST", "/v2/models/tiny/infer", BODY)  # the same connection
            second = connection.getresponse()
            payload = json.loads(second.read())
        finally:
            connection.close()
    assert first.status == 200
    assert second.status == 503 and "shutting down" in payload["error"]
    assert second.getheader("Connection") == "close"
    assert second.getheader("Retry-After") == "5"


def test_large_bodies_are_parsed_in_a_helper_process(tiny: TinyModel) -> None:
    large = json.dumps({"inputs": [{"name": "INPUT", "shape": [8, 1, 4, 4], "datatype": "UINT8",
                                    "data": [7] * 128}]}).encode()
    bad = large.replace(b"[8, 1, 4, 4]", b"[8, 1, 5, 5]")
    with ServerThread(server_config(tiny.bundle, large_body_bytes=len(BODY))) as srv:
        frontend = srv.server._http  # type: ignore[union-attr]  # noqa: SLF001
        assert _request(srv, "POST", "/v2/models/tiny/infer", BODY)[0] == 200
        assert frontend._parser is None  # small bodies stay on the loop  # noqa: SLF001
        status, _, _ = _request(srv, "POST", "/v2/models/tiny/infer", large)
        parser = frontend._parser  # noqa: SLF001
        helper_pids = {p.pid for p in parser._processes.values()}  # noqa: SLF001
        status_bad, _, body_bad = _request(srv, "POST", "/v2/models/tiny/infer", bad)
    assert status == 200
    assert helper_pids and os.getpid() not in helper_pids
    # a parse error raised in the helper process reaches the client as its 400
    assert status_bad == 400 and "expected shape" in json.loads(body_bad)["error"]


def test_requests_refused_before_any_handler_are_counted(tiny: TinyModel) -> None:
    with ServerThread(server_config(tiny.bundle)) as srv:
        sock = _connect(srv)
        try:  # a chunk size that is not hex: aiohttp refuses it before routing
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
            reply = _read_all(sock)
        finally:
            sock.close()
        assert _request(srv, "GET", "/v2/no/such/route")[0] == 404
        metrics = read_metrics(srv.metrics_url)
    assert reply.split(b" ")[1] == b"400"
    assert b"aiohttp" not in reply and b"Python" not in reply  # no version banner
    assert metric_value(metrics, "coded_http_errors_total", code="400") == 1
    assert metric_value(metrics, "coded_http_errors_total", code="404") == 1


def test_bad_framing_after_the_headers_is_a_client_error(tiny: TinyModel) -> None:
    with ServerThread(server_config(tiny.bundle, read_timeout_s=2.0)) as srv:
        sock = _connect(srv)
        try:
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            time.sleep(0.2)  # the handler is reading the body when the bad chunk arrives
            sock.sendall(b"zz\r\n")
            reply = _read_all(sock)
        finally:
            sock.close()
        metrics = read_metrics(srv.metrics_url)
    assert reply.split(b" ")[1] in (b"400", b"408"), reply[:200]  # a client error either way
    assert metric_value(metrics, "nv_inference_request_failure", reason="InternalError") == 0
