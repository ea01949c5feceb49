"""Property-based fuzzing of the HTTP surface: bodies, headers and the binary extension.

Whatever arrives, the server answers with a status it documents (no 5xx but 503/504), an
error body `{"error": "..."}` that names the problem, and stays healthy.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_harness import ServerThread, TinyModel, server_config

ALLOWED = {200, 400, 404, 405, 408, 413, 503, 504}
EXAMPLES = 300

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
datatypes = st.sampled_from(["UINT8", "FP32", "INT32", "BOOL", "BYTES", "FLOAT32", ""])
shapes = st.one_of(st.just([1, 1, 4, 4]), st.just([2, 1, 4, 4]), st.just([1, 4, 4]),
                   st.lists(st.integers(-2, 70), max_size=5), json_values)
pixel_data = st.one_of(st.lists(st.integers(-5, 300), min_size=0, max_size=40),
                       st.lists(st.floats(-1, 2), max_size=40), json_values)
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["INPUT", "IMAGE", ""]), "datatype": datatypes, "shape": shapes},
    optional={"data": pixel_data, "parameters": st.one_of(
        st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-1, 64), json_values)}),
        json_values)})
requests = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensor, max_size=2), json_values)},
    optional={"id": st.one_of(st.text(max_size=8), json_values),
              "parameters": st.one_of(st.dictionaries(
                  st.sampled_from(["timeout_ms", "timeout", "binary_data_output", "other"]),
                  json_values, max_size=3), json_values),
              "outputs": st.one_of(st.lists(st.fixed_dictionaries(
                  {"name": st.sampled_from(["digit_class", "digit_logits", "nope"])},
                  optional={"parameters": json_values}), max_size=3), json_values)})


@st.composite
def wire(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A body and its headers: JSON, raw bytes, or JSON + a binary tail with a (maybe lying)
    Inference-Header-Content-Length."""
    kind = draw(st.sampled_from(["json", "bytes", "binary", "hostile"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), {}
    if kind == "hostile":  # parser limits: huge integer literals, deep nesting
        digits = b"9" * draw(st.integers(20, 6000))
        depth = draw(st.integers(10, 60_000))
        return draw(st.sampled_from([
            b'{"inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4], "datatype": "UINT8", '
            b'"data": [' + digits + b"]}]}",
            b'{"id": "x", "parameters": {"timeout_ms": ' + digits + b'}, "inputs": []}',
            b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}",
        ])), {}
    header = json.dumps(draw(requests), allow_nan=True).encode()
    if kind == "json":
        return header, {}
    tail = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(str(len(header))), st.text(max_size=6),
                            st.integers(-5, len(header) + 100).map(str)))
    return header + tail, {"Inference-Header-Content-Length": length}


def _sendable(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return value.isprintable() and value == value.strip()


@pytest.fixture(scope="module")
def server(tiny: TinyModel) -> Iterator[ServerThread]:
    with ServerThread(server_config(tiny.bundle, request_timeout_ms=5000)) as srv:
        yield srv


def _send(srv: ServerThread, path: str, body: bytes, headers: dict[str, str]
          ) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(srv.url, timeout=30)
    try:
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=wire(), path=st.sampled_from(["/v2/models/tiny/infer",
                                               "/v2/models/tiny/versions/1/infer",
                                               "/v2/models/other/infer"]))
def test_any_request_gets_a_documented_answer(server: ServerThread,
                                              request: tuple[bytes, dict[str, str]],
                                              path: str) -> None:
    body, headers = request
    if not all(_sendable(v) for v in headers.values()):  # http.client would refuse to send it
        headers = {}
    status, payload = _send(server, path, body, headers)
    assert status in ALLOWED, (status, payload[:300])
    if status != 200:
        error = json.loads(payload)["error"]
        assert isinstance(error, str) and error


def test_server_healthy_after_the_fuzzing(server: ServerThread) -> None:
    connection = http.client.HTTPConnection(server.url, timeout=30)
    try:
        connection.request("GET", "/v2/health/ready")
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    body = json.dumps({"inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4], "datatype": "UINT8",
                                   "data": [1] * 16}]}).encode()
    assert _send(server, "/v2/models/tiny/infer", body, {})[0] == 200
