"""Malformed inference requests over gRPC: every case of tests/runtime/test_malformed.py that a
`ModelInferRequest` can express, sent with a raw grpc channel and the generated stub, gets the
gRPC status code of its HTTP status and the same message as the equivalent HTTP request to
the same server; and a call that gives up while its request is queued (cancelled, or its
deadline passes) leaves its queries uncomputed and counted in `coded_cancelled_queries`."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from runtime_harness import (
    ServerThread,
    TinyModel,
    metric_value,
    random_images,
    read_metrics,
    server_config,
)
from test_malformed import CASES as HTTP_CASES
from test_malformed import MAX_BODY
from tritonclient.grpc import service_pb2, service_pb2_grpc

GRPC_CODE = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
             413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
             504: grpc.StatusCode.DEADLINE_EXCEEDED}
HTTP_BY_ID = {case[0]: case for case in HTTP_CASES}
InputTensor = service_pb2.ModelInferRequest.InferInputTensor


# -- building requests -------------------------------------------------------------------------
def _param(value: object) -> service_pb2.InferParameter:
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return service_pb2.InferParameter(int64_param=value)
    return service_pb2.InferParameter(string_param=str(value))


def _tensor(shape: list[int], datatype: str = "UINT8", *, name: str = "INPUT",
            uint: list[int] | None = None, fp32: list[float] | None = None,
            ints: list[int] | None = None, parameters: dict | None = None) -> InputTensor:
    """An input; `uint` / `fp32` / `ints`: typed contents (none: no contents)."""
    tensor = InputTensor(name=name, datatype=datatype, shape=shape)
    if uint is not None:
        tensor.contents.uint_contents.extend(uint)
    if fp32 is not None:
        tensor.contents.fp32_contents.extend(fp32)
    if ints is not None:
        tensor.contents.int_contents.extend(ints)
    for key, value in (parameters or {}).items():
        tensor.parameters[key].CopyFrom(_param(value))
    return tensor


def _request(*inputs: InputTensor, raw: tuple[bytes, ...] = (), model: str = "tiny",
             version: str = "", outputs: tuple[tuple[str, dict], ...] = (),
             parameters: dict | None = None) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.extend(inputs)
    request.raw_input_contents.extend(raw)
    for name, params in outputs:
        output = request.outputs.add(name=name)
        for key, value in params.items():
            output.parameters[key].CopyFrom(_param(value))
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(_param(value))
    return request


def good() -> InputTensor:  # test_malformed's GOOD: [2, 1, 4, 4] UINT8, every pixel 7
    return _tensor([2, 1, 4, 4], uint=[7] * 32)


def _bytes(count: int, dtype: type, value: float) -> bytes:
    return np.full(count, value, dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()


@dataclass(frozen=True)
class Case:
    id: str
    http: str | None  # the test_malformed case it is the gRPC form of (None: gRPC only)
    request: service_pb2.ModelInferRequest
    # None: the message EQUALS the HTTP answer to `http`; else a fragment it must contain
    # (the HTTP case's own fragment is checked too when `http` is set)
    fragment: str | None = None
    status: int | None = None  # None: the HTTP case's status


CASES: list[Case] = [
    Case("no-inputs", "no-inputs", _request()),  # no inputs: both {} and [] over HTTP
    Case("inputs-empty", "inputs-empty", _request()),
    Case("missing-input", "missing-input",
         _request(_tensor([2, 1, 4, 4], name="IMAGE", uint=[7] * 32))),
    Case("two-inputs", "two-inputs",
         _request(good(), _tensor([2, 1, 4, 4], name="X", uint=[7] * 32))),
    Case("wrong-shape", "wrong-shape", _request(_tensor([2, 1, 5, 5], uint=[7] * 50))),
    Case("wrong-rank", "wrong-rank", _request(_tensor([16], uint=[7] * 16))),
    Case("negative-dim", "negative-dim", _request(_tensor([-1, 1, 4, 4], uint=[7] * 16))),
    Case("shape-empty", "shape-empty", _request(_tensor([], uint=[7] * 32))),
    # a datatype the model does not take / no KServe datatype at all: raw contents are
    # refused by the codec with the HTTP message ...
    Case("wrong-dtype-raw", "wrong-dtype",
         _request(_tensor([1, 1, 4, 4], "INT32"), raw=(_bytes(16, np.int32, 7),))),
    Case("unknown-datatype-raw", "unknown-datatype",
         _request(_tensor([1, 1, 4, 4], "FLOAT32"), raw=(_bytes(16, np.float32, 0.5),))),
    # ... typed contents of such a datatype are refused before the codec, by the gRPC
    # translator (runtime/grpc_server.py http_form), with a gRPC message of its own
    Case("wrong-dtype-typed", "wrong-dtype",
         _request(_tensor([1, 1, 4, 4], "INT32", ints=[7] * 16)),
         fragment="datatype 'INT32' has no accepted typed contents"),
    Case("unknown-datatype-typed", "unknown-datatype",
         _request(_tensor([1, 1, 4, 4], "FLOAT32", fp32=[0.5] * 16)),
         fragment="datatype 'FLOAT32' has no accepted typed contents"),
    Case("count-mismatch", "count-mismatch", _request(_tensor([2, 1, 4, 4], uint=[1] * 16))),
    Case("uint8-range", "uint8-range", _request(_tensor([1, 1, 4, 4], uint=[300] * 16))),
    Case("fp32-range-typed", "fp32-range",
         _request(_tensor([1, 1, 4, 4], "FP32", fp32=[2.0] * 16))),
    Case("fp32-range-raw", "fp32-range",
         _request(_tensor([1, 1, 4, 4], "FP32"), raw=(_bytes(16, np.float32, 2.0),))),
    Case("fp32-nan-typed", "fp32-nan",
         _request(_tensor([1, 1, 4, 4], "FP32", fp32=[float("nan")] * 16))),
    Case("fp32-nan-raw", "fp32-nan",
         _request(_tensor([1, 1, 4, 4], "FP32"), raw=(_bytes(16, np.float32, np.nan),))),
    Case("no-data", "no-data", _request(_tensor([2, 1, 4, 4]))),
    # a raw entry whose size does not fit the shape (gRPC's binary_data_size is its length)
    Case("raw-size-vs-shape", "binary-size-vs-shape",
         _request(_tensor([1, 1, 4, 4]), raw=(bytes(8),))),
    # one raw entry per input, or none: gRPC's own framing rule (no HTTP counterpart; the
    # nearest is binary-not-declared, bytes no input claims)
    Case("raw-count-mismatch", None, _request(good(), raw=(bytes(32), bytes(32))),
         fragment="raw_input_contents has 2 entries for 1 inputs", status=400),
    Case("data-and-binary", "data-and-binary",
         _request(_tensor([1, 1, 4, 4], uint=[7] * 16, parameters={"binary_data_size": 16}))),
    Case("unknown-output", "unknown-output", _request(good(), outputs=(("probs", {}),))),
    Case("classification-extension", "classification-extension",
         _request(good(), outputs=(("digit_logits", {"classification": 3}),))),
    Case("batch-too-large", "batch-too-large",
         _request(_tensor([65, 1, 4, 4]), raw=(bytes(65 * 16),))),
    Case("bad-timeout", "bad-timeout", _request(good(), parameters={"timeout_ms": -5})),
    Case("timeout-not-number", "timeout-not-number",
         _request(good(), parameters={"timeout_ms": "5"})),
    Case("binary-output-not-bool", "binary-output-not-bool",
         _request(good(), parameters={"binary_data_output": "yes"})),
    Case("unknown-model", "unknown-model", _request(good(), model="mnist")),
    Case("unknown-version", "unknown-version", _request(good(), version="3")),
    # too large: a message over the limit is refused by gRPC itself (its own message) ...
    Case("huge-message", "huge-body",
         _request(_tensor([MAX_BODY // 16 + 1, 1, 4, 4]), raw=(bytes(MAX_BODY + 16),)),
         fragment="larger than max"),
    # ... and one under it whose codec form (varints -> JSON digits) is over it, by the server
    Case("huge-codec-form", "huge-body",
         _request(_tensor([1875, 1, 4, 4], uint=[200] * 30_000)),
         fragment=f"exceeds the {MAX_BODY}-byte limit (--max-body-bytes)"),
]

# The HTTP cases with no gRPC form, and why: a ModelInferRequest is a protobuf message that
# gRPC decodes before the server sees it, with one type per field.
NO_GRPC_FORM = {
    # JSON syntax: there is no JSON text to get wrong
    **dict.fromkeys(["bad-json", "json-array", "empty-body", "json-too-deep",
                     "json-huge-integer"], "JSON syntax: the body is protobuf, not JSON"),
    # JSON value types: the protobuf schema fixes each field's type
    **dict.fromkeys(["inputs-not-list", "parameters-not-object", "outputs-not-list",
                     "data-not-list", "ragged-data", "id-not-string", "model-name-not-string",
                     "model-version-not-string"],
                    "JSON type: a repeated/map/string field cannot hold another type"),
    **dict.fromkeys(["string-data", "uint8-fraction"],
                    "JSON type: uint_contents holds unsigned integers only"),
    # fields the schema does not have are never seen by the server
    **dict.fromkeys(["unknown-field", "unknown-input-field"],
                    "unknown field: protobuf has fixed fields"),
    # the binary extension's framing: gRPC carries each input's bytes in raw_input_contents,
    # whose length is its binary_data_size (see raw-size-vs-shape, raw-count-mismatch)
    **dict.fromkeys(["binary-size-mismatch", "binary-not-declared", "header-length-too-big",
                     "header-length-not-int"],
                    "HTTP framing: no Inference-Header-Content-Length in gRPC"),
    # HTTP names the model twice (URL and body), gRPC once (model_name, model_version)
    **dict.fromkeys(["model-name-mismatch", "model-version-mismatch"],
                    "one model name: gRPC has no URL to disagree with"),
}


# -- the server and its two doors --------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny: TinyModel) -> Iterator[ServerThread]:
    with ServerThread(server_config(tiny.bundle, max_body_bytes=MAX_BODY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _http(server: ServerThread, case_id: str) -> tuple[int, str]:
    _, path, body, headers, _, _ = HTTP_BY_ID[case_id]
    request = urllib.request.Request(f"http://{server.url}/v2/models/{path}/infer", data=body,
                                     method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()).get("error", "")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["error"]


def _raw_request(images: np.ndarray) -> service_pb2.ModelInferRequest:
    return _request(_tensor(list(images.shape)), raw=(images.tobytes(),))


def _output(response: service_pb2.ModelInferResponse, name: str) -> np.ndarray:
    (index,) = [i for i, o in enumerate(response.outputs) if o.name == name]
    assert response.outputs[index].datatype == "INT64"
    return np.frombuffer(response.raw_output_contents[index], "<i8")


def test_every_http_case_has_a_grpc_form_or_a_reason() -> None:
    covered = {case.http for case in CASES} - {None}
    assert not covered & set(NO_GRPC_FORM)
    assert covered | set(NO_GRPC_FORM) == set(HTTP_BY_ID), \
        set(HTTP_BY_ID) ^ (covered | set(NO_GRPC_FORM))
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_grpc_request_gets_the_http_status_and_message(
        server: ServerThread, stub: service_pb2_grpc.GRPCInferenceServiceStub, case: Case) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(case.request, timeout=30)
    code, message = caught.value.code(), caught.value.details()
    if case.http is not None:
        http_status, http_message = _http(server, case.http)
        assert http_status == HTTP_BY_ID[case.http][4], http_message
        assert code == GRPC_CODE[case.status or http_status], message
        if case.fragment is None:
            assert message == http_message  # one validator, one message
            assert HTTP_BY_ID[case.http][5] in message
        else:
            assert case.fragment in message
    else:
        assert code == GRPC_CODE[case.status], message
        assert case.fragment in message
    # the server keeps serving, over gRPC too
    images = random_images(2, seed=11)
    answer = stub.ModelInfer(_raw_request(images), timeout=30)
    assert _output(answer, "digit_class").shape == (2,)


# -- cancellation ------------------------------------------------------------------------------
async def _wait_for(srv: ServerThread, name: str, value: float, **labels: str) -> str:
    """/metrics once the sample `name` is exactly `value` (polled off the event loop)."""
    deadline = time.monotonic() + 20
    while True:
        text = await asyncio.to_thread(read_metrics, srv.metrics_url)
        if metric_value(text, name, **labels) == value:
            return text
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("gives_up", ["cancel", "deadline"])
def test_a_grpc_call_that_gives_up_while_queued_is_never_computed(tiny: TinyModel,
                                                                  gives_up: str) -> None:
    """As tests/runtime/test_http_extensions.py's disconnect/timeout test, over gRPC: one
    dispatch at a time, one group per dispatch, every worker call slow, so a later call
    waits behind a slow request's second group. The later call gives up while queued
    (grpc.aio `.cancel()`, or a short client deadline): its queries are dropped unrun and
    counted; the slow request is answered, once."""
    k = tiny.k
    config = server_config(tiny.bundle, fault_delay_ms=400.0, fault_delay_prob=1.0,
                           max_inflight_groups=1, straggler_scale=0, redispatch=False,
                           max_groups_per_call=1, max_queue_delay_ms=1.0)
    pending = "nv_inference_pending_request_count"
    slow_images = random_images(2 * k, seed=1)

    async def run(srv: ServerThread) -> tuple[service_pb2.ModelInferResponse, str,
                                              service_pb2.ModelStatisticsResponse]:
        async with grpc.aio.insecure_channel(srv.grpc_url) as channel:
            aio_stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            slow = aio_stub.ModelInfer(_raw_request(slow_images), timeout=60)  # starts now
            await _wait_for(srv, pending, k)  # its first group runs, its second waits
            later = _raw_request(random_images(k, seed=2))
            if gives_up == "cancel":
                call = aio_stub.ModelInfer(later, timeout=60)
                await _wait_for(srv, pending, 2 * k)  # queued behind the slow request
                assert call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert call.cancelled()
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await aio_stub.ModelInfer(later, timeout=0.1)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            answer = await slow  # the slow request is answered, exactly
            text = await _wait_for(srv, "coded_cancelled_queries_total", k, model="tiny")
            text = await _wait_for(srv, "nv_inference_request_failure", 1, model="tiny")
            stats = await aio_stub.ModelStatistics(
                service_pb2.ModelStatisticsRequest(name="tiny"), timeout=30)
            return answer, text, stats

    with ServerThread(config) as srv:
        answer, text, stats = asyncio.run(run(srv))
    np.testing.assert_array_equal(_output(answer, "digit_class"),
                                  tiny.logits(slow_images)["digit"].argmax(axis=1))
    # only the slow request's queries were computed, each once; the other failed once
    assert metric_value(text, "coded_cancelled_queries_total", model="tiny") == k
    assert metric_value(text, "nv_inference_count", model="tiny") == 2 * k
    assert metric_value(text, "nv_inference_request_success", model="tiny") == 1
    if gives_up == "cancel":
        assert metric_value(text, "nv_inference_request_failure", reason="ClientDisconnected") == 1
    else:  # the server's own timeout (the call's deadline bounds it) or the deadline's cancel
        assert metric_value(text, "nv_inference_request_failure", reason="RequestTimeout") + \
            metric_value(text, "nv_inference_request_failure", reason="ClientDisconnected") == 1
    (model_stats,) = stats.model_stats
    assert model_stats.inference_count == 2 * k
    assert model_stats.inference_stats.fail.count == 1
