"""KServe v2 over gRPC, driven by the stock tritonclient.grpc clients (sync, aio, streaming):
the same images give the same answers as over HTTP, and errors map to status codes with the
same messages."""

from __future__ import annotations

import asyncio
import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from runtime_harness import TASKS, ServerThread, TinyModel, metric_value, random_images, read_metrics, server_config
from tritonclient.utils import InferenceServerException

from runtime.grpc_server import http_form
from runtime.protocol import parse_infer_request

LOGIT_ATOL = 1e-3


def _inputs(images: np.ndarray, datatype: str = "UINT8") -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT", list(images.shape), datatype)
    inp.set_data_from_numpy(images)
    return [inp]


def _check(result: grpcclient.InferResult, tiny: TinyModel, images: np.ndarray) -> None:
    reference = tiny.logits(images)
    for task in TASKS:
        np.testing.assert_allclose(result.as_numpy(f"{task}_logits"), reference[task],
                                   atol=LOGIT_ATOL, rtol=0)
        np.testing.assert_array_equal(result.as_numpy(f"{task}_class"),
                                      reference[task].argmax(axis=1))


def test_sync_client_health_metadata_config_and_infer(tiny: TinyModel,
                                                      tiny_server: ServerThread) -> None:
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    metadata = client.get_model_metadata("tiny", as_json=True)
    assert [i["name"] for i in metadata["inputs"]] == ["INPUT"]  # one input, unique name
    assert metadata["inputs"][0]["datatype"] == "UINT8"
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["name"] == "tiny" and int(config["max_batch_size"]) == tiny_server.config.max_batch_size
    assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]
    images = random_images(5, seed=3)
    result = client.infer("tiny", _inputs(images), request_id="req-7")
    _check(result, tiny, images)
    response = result.get_response(as_json=True)
    assert response["id"] == "req-7" and response["model_name"] == "tiny"
    assert result.as_numpy("reconstructed").shape == (5,)
    # FP32 in [0, 1] is accepted too, with the same answers
    result = client.infer("tiny", _inputs(images.astype(np.float32) / 255.0, "FP32"))
    _check(result, tiny, images)
    # a subset of outputs
    subset = grpcclient.InferRequestedOutput("parity_class")
    result = client.infer("tiny", _inputs(images), outputs=[subset])
    assert [o["name"] for o in result.get_response(as_json=True)["outputs"]] == ["parity_class"]
    stats = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) >= 3
    client.close()


def test_grpc_and_http_give_the_same_answers_and_flags(tiny: TinyModel,
                                                       tiny_server: ServerThread) -> None:
    images = random_images(9, seed=11)
    g = grpcclient.InferenceServerClient(tiny_server.grpc_url).infer("tiny", _inputs(images))
    h_input = httpclient.InferInput("INPUT", list(images.shape), "UINT8")
    h_input.set_data_from_numpy(images)
    h = httpclient.InferenceServerClient(tiny_server.url).infer("tiny", [h_input])
    for task in TASKS:
        np.testing.assert_array_equal(g.as_numpy(f"{task}_class"), h.as_numpy(f"{task}_class"))
    assert g.as_numpy("reconstructed").dtype == h.as_numpy("reconstructed").dtype == np.bool_


def test_aio_client(tiny: TinyModel, tiny_server: ServerThread) -> None:
    async def run() -> None:
        client = grpcaio.InferenceServerClient(tiny_server.grpc_url)
        try:
            assert await client.is_server_ready()
            images = random_images(3, seed=5)
            inp = grpcaio.InferInput("INPUT", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images)
            results = await asyncio.gather(*(client.infer("tiny", [inp]) for _ in range(4)))
            for result in results:
                _check(result, tiny, images)
        finally:
            await client.close()

    asyncio.run(run())


def test_streaming_answers_every_request_with_its_id(tiny: TinyModel,
                                                     tiny_server: ServerThread) -> None:
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {f"s{i}": random_images(1 + i % 3, seed=20 + i) for i in range(6)}
    for request_id, images in sent.items():
        client.async_stream_infer("tiny", _inputs(images), request_id=request_id)
    bad = random_images(2, seed=1).reshape(2, 1, 2, 8)  # a wrong shape: an error message
    client.async_stream_infer("tiny", _inputs(bad), request_id="bad")
    got, errors = {}, []
    for _ in range(len(sent) + 1):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(error)
        else:
            got[result.get_response().id] = result
    client.stop_stream()
    assert sorted(got) == sorted(sent)  # each answered once, its id echoed
    for request_id, images in sent.items():
        _check(got[request_id], tiny, images)
    assert len(errors) == 1 and "expected shape" in str(errors[0])  # the stream went on
    client.close()


@pytest.mark.parametrize(("shape", "datatype", "fragment"), [
    ([1, 1, 2, 8], "UINT8", "expected shape"),
    ([1, 1, 4, 4], "INT32", "is not accepted"),
    ([65, 1, 4, 4], "UINT8", "batch size must be 1.."),
])
def test_bad_requests_are_invalid_argument_with_the_http_message(
        tiny_server: ServerThread, shape: list[int], datatype: str, fragment: str) -> None:
    dtype = {"UINT8": np.uint8, "INT32": np.int32}[datatype]
    data = np.zeros(shape, dtype)
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("tiny", _inputs(data, datatype))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert fragment in caught.value.message()
    h_input = httpclient.InferInput("INPUT", shape, datatype)
    h_input.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as over_http:
        httpclient.InferenceServerClient(tiny_server.url).infer("tiny", [h_input])
    assert over_http.value.status() == "400"
    assert caught.value.message() == over_http.value.message()  # one validator, one message


def test_unknown_model_is_not_found(tiny_server: ServerThread) -> None:
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("nope", _inputs(random_images(1, seed=0)))
    assert caught.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("tiny", model_version="7")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_deadline_exceeded_and_overload_unavailable(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, fault_delay_ms=400.0, fault_delay_prob=1.0,
                           max_queue_size=2, max_batch_size=2, admission_wait_ms=0,
                           max_inflight_groups=1, straggler_scale=0, redispatch=False,
                           max_groups_per_call=1, max_queue_delay_ms=1.0)
    with ServerThread(config) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", _inputs(random_images(1, seed=1)), client_timeout=0.1)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        # fill the queue from another thread, then one more request is refused at once
        busy = threading.Thread(target=lambda: [
            grpcclient.InferenceServerClient(srv.grpc_url).infer("tiny", _inputs(random_images(2, seed=s)))
            for s in (2, 3)])
        busy.start()
        deadline_metric = "nv_inference_pending_request_count"
        for _ in range(500):
            if metric_value(read_metrics(srv.metrics_url), deadline_metric) >= 2:
                break
            threading.Event().wait(0.01)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", _inputs(random_images(2, seed=4)))
        assert caught.value.status() == "StatusCode.UNAVAILABLE" and "overloaded" in caught.value.message()
        busy.join(timeout=30)


def test_http_form_is_what_the_http_codec_parses(tiny: TinyModel, tiny_server: ServerThread) -> None:
    """A gRPC request becomes the HTTP codec's input: raw contents as binary data, typed
    contents as JSON data, parameters kept."""
    from tritonclient.grpc import service_pb2

    images = random_images(2, seed=9)
    request = service_pb2.ModelInferRequest(model_name="tiny", id="x")
    tensor = request.inputs.add(name="INPUT", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    request.parameters["timeout_ms"].int64_param = 250
    manifest = tiny_server.server.engine.manifest  # type: ignore[union-attr]
    names = manifest.output_names()
    parsed = parse_infer_request(*http_form(request), manifest.input, names, 64)
    np.testing.assert_array_equal(parsed.raw, images)
    assert parsed.request_id == "x" and parsed.timeout_s == pytest.approx(0.25)
    request.ClearField("raw_input_contents")
    tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    parsed = parse_infer_request(*http_form(request), manifest.input, names, 64)
    np.testing.assert_array_equal(parsed.raw, images)


def test_grpc_port_minus_one_turns_it_off(tiny: TinyModel) -> None:
    with ServerThread(server_config(tiny.bundle, grpc_port=-1)) as srv:
        assert srv.server is not None and srv.server.grpc_port is None
