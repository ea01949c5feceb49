"""Malformed requests: each gets a 4xx with a clear {"error": ...}; the server keeps serving."""

from __future__ import annotations

import ast
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from runtime_harness import ServerThread, TinyModel, metric_value, random_images, server_config

from runtime import protocol
from runtime.errors import BadRequest
from runtime.manifest import Manifest
from runtime.protocol import HEADER_LENGTH, parse_infer_request

MAX_BODY = 100_000


@pytest.fixture(scope="module")
def server(tiny: TinyModel) -> Iterator[ServerThread]:
    with ServerThread(server_config(tiny.bundle, max_body_bytes=MAX_BODY)) as srv:
        yield srv


def _tensor(shape: list[int], datatype: str = "UINT8", data: object = None) -> dict:
    count = int(np.prod(shape)) if shape else 0
    return {"name": "INPUT", "shape": shape, "datatype": datatype,
            "data": [7] * count if data is None else data}


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


GOOD = _tensor([2, 1, 4, 4])
BINARY_HEADER = _json({"inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 32}}]})
BINARY_SHORT = _json({"inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4], "datatype": "UINT8",
                                  "parameters": {"binary_data_size": 8}}]})

# (id, path, body, extra headers, expected status, expected message fragment)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("bad-json", "tiny", b"{not json", {}, 400, "not valid JSON"),
    ("json-array", "tiny", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("empty-body", "tiny", b"", {}, 400, "empty request body"),
    ("no-inputs", "tiny", _json({}), {}, 400, "non-empty 'inputs'"),
    ("inputs-empty", "tiny", _json({"inputs": []}), {}, 400, "non-empty 'inputs'"),
    ("inputs-not-list", "tiny", _json({"inputs": "INPUT"}), {}, 400, "non-empty 'inputs'"),
    ("missing-input", "tiny", _json({"inputs": [{**GOOD, "name": "IMAGE"}]}), {}, 400,
     "missing input 'INPUT'"),
    ("two-inputs", "tiny", _json({"inputs": [GOOD, {**GOOD, "name": "X"}]}), {}, 400,
     "exactly one input"),
    ("wrong-shape", "tiny", _json({"inputs": [_tensor([2, 1, 5, 5])]}), {}, 400,
     "expected shape"),
    ("wrong-rank", "tiny", _json({"inputs": [_tensor([16])]}), {}, 400, "expected shape"),
    ("negative-dim", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4]) | {"shape": [-1, 1, 4, 4]}]}),
     {}, 400, "non-negative integer"),
    ("wrong-dtype", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], "INT32")]}), {}, 400,
     "datatype INT32 is not accepted"),
    ("unknown-datatype", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], "FLOAT32")]}), {}, 400,
     "unknown datatype 'FLOAT32'"),
    ("count-mismatch", "tiny", _json({"inputs": [_tensor([2, 1, 4, 4], data=[1] * 16)]}), {},
     400, "needs 32 elements, data has 16"),
    ("string-data", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], data=["a"] * 16)]}), {}, 400,
     "only numbers"),
    ("ragged-data", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], data=[[1, 2], [3]])]}), {},
     400, "ragged"),
    ("uint8-range", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], data=[300] * 16)]}), {}, 400,
     "0..255"),
    ("fp32-range", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], "FP32", [2.0] * 16)]}), {},
     400, "in [0, 1]"),
    ("fp32-nan", "tiny", json.dumps({"inputs": [_tensor([1, 1, 4, 4], "FP32", [float("nan")] * 16)]}
                                    ).encode(), {}, 400, "NaN"),
    ("no-data", "tiny", _json({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}), {},
     400, "needs 'data'"),
    ("binary-size-mismatch", "tiny", BINARY_HEADER + bytes(16),
     {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400,
     "binary_data_size is 32 but 16 bytes"),
    ("binary-not-declared", "tiny", _json({"inputs": [GOOD]}) + bytes(8),
     {"Inference-Header-Content-Length": str(len(_json({"inputs": [GOOD]})))}, 400,
     "no input declares"),
    ("header-length-too-big", "tiny", _json({"inputs": [GOOD]}),
     {"Inference-Header-Content-Length": "99999"}, 400, "Inference-Header-Content-Length is"),
    ("header-length-not-int", "tiny", _json({"inputs": [GOOD]}),
     {"Inference-Header-Content-Length": "abc"}, 400, "must be an integer"),
    ("unknown-output", "tiny", _json({"inputs": [GOOD], "outputs": [{"name": "probs"}]}), {}, 400,
     "unknown output 'probs'"),
    ("batch-too-large", "tiny", _json({"inputs": [_tensor([65, 1, 4, 4])]}), {}, 400,
     "batch size must be 1..64"),
    ("bad-timeout", "tiny", _json({"inputs": [GOOD], "parameters": {"timeout_ms": -5}}), {}, 400,
     "positive number"),
    ("parameters-not-object", "tiny", _json({"inputs": [GOOD], "parameters": [1]}), {}, 400,
     "must be a JSON object"),
    ("unknown-field", "tiny", _json({"inputs": [GOOD], "input": []}), {}, 400,
     "unknown request field"),
    ("unknown-model", "mnist", _json({"inputs": [GOOD]}), {}, 404, "unknown model 'mnist'"),
    ("unknown-version", "tiny/versions/3", _json({"inputs": [GOOD]}), {}, 404, "version '1' only"),
    ("huge-body", "tiny", b"x" * (MAX_BODY + 1), {}, 413, "limit"),
    ("id-not-string", "tiny", _json({"id": 5, "inputs": [GOOD]}), {}, 400,
     "request 'id' must be a string"),
    ("unknown-input-field", "tiny", _json({"inputs": [{**GOOD, "contents": {}}]}), {}, 400,
     "unknown field(s) ['contents']"),
    ("shape-empty", "tiny", _json({"inputs": [{**GOOD, "shape": []}]}), {}, 400,
     "'shape' must be a non-empty list"),
    ("data-not-list", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], data="pixels")]}), {}, 400,
     "must be a (possibly nested) JSON list"),
    ("uint8-fraction", "tiny", _json({"inputs": [_tensor([1, 1, 4, 4], data=[1.5] * 16)]}), {},
     400, "UINT8 data must be integers"),
    ("data-and-binary", "tiny",
     _json({"inputs": [_tensor([1, 1, 4, 4]) | {"parameters": {"binary_data_size": 16}}]}), {},
     400, "either 'data' or binary_data_size, not both"),
    ("binary-size-vs-shape", "tiny", BINARY_SHORT + bytes(8),
     {"Inference-Header-Content-Length": str(len(BINARY_SHORT))}, 400,
     "needs 16 bytes, binary_data_size is 8"),
    ("outputs-not-list", "tiny", _json({"inputs": [GOOD], "outputs": {"name": "digit_class"}}),
     {}, 400, "'outputs' must be a list"),
    ("classification-extension", "tiny",
     _json({"inputs": [GOOD], "outputs": [{"name": "digit_logits",
                                           "parameters": {"classification": 3}}]}), {}, 400,
     "classification extension is not supported"),
    ("binary-output-not-bool", "tiny",
     _json({"inputs": [GOOD], "parameters": {"binary_data_output": "yes"}}), {}, 400,
     "must be a JSON boolean"),
    ("timeout-not-number", "tiny", _json({"inputs": [GOOD], "parameters": {"timeout_ms": "5"}}),
     {}, 400, "must be a positive number"),
    ("json-too-deep", "tiny", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400,
     "nested too deeply"),
    ("json-huge-integer", "tiny", b'{"inputs": [], "id": ' + b"9" * 5000 + b"}", {}, 400,
     "cannot read"),
    ("model-name-mismatch", "tiny", _json({"model_name": "mnist", "inputs": [GOOD]}), {}, 400,
     "request 'model_name' is 'mnist' but the request was sent to model 'tiny'"),
    ("model-name-not-string", "tiny", _json({"model_name": ["tiny"], "inputs": [GOOD]}), {}, 400,
     "request 'model_name' must be a string"),
    ("model-version-mismatch", "tiny/versions/1", _json({"model_version": "2", "inputs": [GOOD]}),
     {}, 400, "request 'model_version' is '2' but the request was sent to version '1'"),
    ("model-version-not-string", "tiny", _json({"model_version": 1, "inputs": [GOOD]}), {}, 400,
     "request 'model_version' must be a string"),
]
# answered by the HTTP layer before the KServe parser (runtime/protocol.py) sees the body
HTTP_LAYER_CASES = {"empty-body"}


def _post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    request = urllib.request.Request(f"http://{url}/v2/models/{path}/infer", data=body,
                                     method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def _still_serving(server: ServerThread) -> None:
    client = triton.InferenceServerClient(server.url)
    assert client.is_server_ready()
    images = random_images(2, seed=11)
    inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    assert client.infer("tiny", [inp]).as_numpy("digit_class").shape == (2,)


def _bad_request_raises() -> dict[int, str]:
    """Line -> source of every `raise BadRequest(...)` in runtime/protocol.py."""
    source = Path(protocol.__file__).read_text()
    return {node.lineno: ast.get_source_segment(source, node).splitlines()[0].strip()
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
            and getattr(node.exc.func, "id", None) == "BadRequest"}


def _raised_at(error: BaseException) -> int:
    """The line of runtime/protocol.py that raised `error`."""
    tb, line = error.__traceback__, -1
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == protocol.__file__:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def test_every_parse_error_has_a_case(tiny: TinyModel) -> None:
    """Each 400 case, fed straight to the parser, raises BadRequest with its message, and
    every BadRequest the parser can raise is reached by at least one case (a new error
    path needs a new case above)."""
    manifest = Manifest.load(tiny.bundle)
    config = server_config(tiny.bundle, max_body_bytes=MAX_BODY)
    reached: dict[int, list[str]] = {}
    for case_id, path, body, headers, status, fragment in CASES:
        if status != 400 or case_id in HTTP_LAYER_CASES:
            continue
        model, _, version = path.partition("/versions/")  # the model the URL names
        with pytest.raises(BadRequest, match=re.escape(fragment)) as err:
            parse_infer_request(body, headers.get(HEADER_LENGTH), manifest.input,
                                manifest.output_names(), config.max_batch_size, model,
                                version or None)
        reached.setdefault(_raised_at(err.value), []).append(case_id)
    raises = _bad_request_raises()
    assert len(raises) >= 30  # the scan itself works
    missing = {line: src for line, src in raises.items() if line not in reached}
    assert not missing, f"runtime/protocol.py raises BadRequest without a case here: {missing}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_clear_4xx(server: ServerThread, case: tuple) -> None:
    _, path, body, headers, status, fragment = case
    got_status, payload, _ = _post(server.url, path, body, headers)
    assert got_status == status, payload
    assert set(payload) == {"error"}
    assert fragment in payload["error"]
    _still_serving(server)


def test_other_routes_and_methods_answer_json_errors(server: ServerThread) -> None:
    for method, path, status in (("GET", "/v2/models/tiny/infer", 405),
                                 ("GET", "/v3/anything", 404),
                                 ("GET", "/v2/models/nope", 404)):
        request = urllib.request.Request(f"http://{server.url}{path}", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == status
        assert "error" in json.loads(err.value.read())
    _still_serving(server)


def test_failures_are_counted_by_reason(server: ServerThread) -> None:
    before = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    _post(server.url, "tiny", b"{not json", {})
    after = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    name = "nv_inference_request_failure"
    assert (metric_value(after, name, reason="BadRequest")
            - metric_value(before, name, reason="BadRequest")) == 1
