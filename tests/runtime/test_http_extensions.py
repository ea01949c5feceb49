"""Triton's HTTP extensions on a real server, driven by STOCK clients: model configuration,
statistics and the repository index with tritonclient.http, an inference through the KServe
SDK's REST and gRPC clients (when installed), and cancellation: a request that gives up while queued
(client gone, timeout) leaves its queries uncomputed and counted."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from google.protobuf import json_format
from runtime_harness import (
    ServerThread,
    TinyModel,
    metric_value,
    random_images,
    read_metrics,
    server_config,
)
from tritonclient.grpc import model_config_pb2, service_pb2

from runtime.batcher import Batcher
from runtime.manifest import Manifest
from runtime.model_io import output_specs

IMAGES_PER_REQUEST = 3  # with k = 2: one full coding group and one padded partial group


def _http(srv: ServerThread, method: str, path: str, body: bytes | None = None
          ) -> tuple[int, object]:
    request = urllib.request.Request(f"http://{srv.url}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _infer(client: triton.InferenceServerClient, images: np.ndarray) -> triton.InferResult:
    inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    return client.infer("tiny", [inp])


def test_config_statistics_index_and_metadata_with_tritonclient(tiny: TinyModel) -> None:
    manifest = Manifest.load(tiny.bundle)
    k = manifest.coding.k
    with ServerThread(server_config(tiny.bundle)) as srv:
        client = triton.InferenceServerClient(srv.url)
        assert client.is_server_ready()

        # metadata: one input, its canonical datatype; FP32 documented in the parameters
        meta = client.get_model_metadata("tiny")
        assert [i["name"] for i in meta["inputs"]] == [manifest.input.name]
        assert meta["inputs"][0]["datatype"] == "UINT8"
        assert meta["parameters"]["input_datatypes"][manifest.input.name] == ["UINT8", "FP32"]
        assert client.get_model_metadata("tiny", model_version="1") == meta
        extensions = client.get_server_metadata()["extensions"]
        for extension in ("binary_tensor_data", "model_configuration", "statistics",
                          "model_repository"):
            assert extension in extensions

        # model configuration: exactly Triton's ModelConfig
        config = client.get_model_config("tiny")
        parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())
        assert parsed.name == "tiny" and parsed.max_batch_size == srv.config.max_batch_size
        assert [i.name for i in parsed.input] == [manifest.input.name]
        assert list(parsed.input[0].dims) == list(manifest.input.shape)
        assert [o.name for o in parsed.output] == [s.name for s in output_specs(manifest)]
        assert int(parsed.parameters["k"].string_value) == k
        assert client.get_model_config("tiny", model_version="1") == config

        # repository index: tritonclient posts an empty body
        assert client.get_model_repository_index() == [
            {"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
        status, ready_only = _http(srv, "POST", "/v2/repository/index", b'{"ready": true}')
        assert status == 200 and [m["name"] for m in ready_only] == ["tiny"]
        json_format.ParseDict({"models": ready_only}, service_pb2.RepositoryIndexResponse())
        status, error = _http(srv, "POST", "/v2/repository/index", b'{"ready": "yes"}')
        assert status == 400 and "ready" in error["error"]
        client.load_model("tiny")  # loaded at start: a no-op
        with pytest.raises(triton.InferenceServerException, match="cannot be unloaded"):
            client.unload_model("tiny")

        # statistics before any inference: zeros
        before = client.get_inference_statistics("tiny")
        (stats,) = before["model_stats"]
        assert stats["name"] == "tiny" and stats["version"] == "1"
        assert stats["inference_count"] == stats["execution_count"] == 0
        assert stats["last_inference"] == 0
        assert stats["inference_stats"]["success"] == {"count": 0, "ns": 0}
        assert stats["coded"]["cancelled_queries"] == 0

        requests = 2
        started_ms = time.time() * 1000
        for seed in range(requests):
            _infer(client, random_images(IMAGES_PER_REQUEST, seed=seed))
        for model_stats in (client.get_inference_statistics("tiny"),
                            client.get_inference_statistics("tiny", model_version="1"),
                            client.get_inference_statistics()):  # GET /v2/models/stats
            (stats,) = model_stats["model_stats"]
            coded = stats.pop("coded")
            json_format.ParseDict(model_stats, service_pb2.ModelStatisticsResponse())
            queries = requests * IMAGES_PER_REQUEST
            groups_per_request = math.ceil(IMAGES_PER_REQUEST / k)
            assert stats["inference_count"] == queries
            # sequential requests: each is dispatched as its full groups, then its partial one
            assert stats["execution_count"] == requests * groups_per_request
            assert coded["partial_groups"] == requests
            assert coded["padded_queries"] == requests * (-IMAGES_PER_REQUEST % k)
            assert coded["cancelled_queries"] == 0
            inference = stats["inference_stats"]
            assert inference["success"]["count"] == requests and inference["success"]["ns"] > 0
            assert inference["fail"] == {"count": 0, "ns": 0}
            assert inference["queue"]["count"] == queries
            assert inference["compute_infer"]["count"] == stats["execution_count"]
            assert inference["compute_infer"]["ns"] > 0
            assert started_ms - 1 <= stats["last_inference"] <= time.time() * 1000 + 1

        # the same counters as /metrics
        text = read_metrics(srv.metrics_url)
        assert metric_value(text, "nv_inference_count", model="tiny") == queries
        assert metric_value(text, "nv_inference_exec_count", model="tiny") == \
            requests * groups_per_request

        # unknown models and versions: 404 with the usual error JSON
        for path in ("/v2/models/mnist/config", "/v2/models/tiny/versions/2/config",
                     "/v2/models/mnist/stats", "/v2/models/tiny/versions/2/stats"):
            status, error = _http(srv, "GET", path)
            assert status == 404 and set(error) == {"error"}, path
            assert "unknown model 'mnist'" in error["error"] or "version '1' only" in error["error"]
        with pytest.raises(triton.InferenceServerException, match="unknown model"):
            client.get_model_config("mnist")


def test_model_name_in_the_body_must_match_the_url(tiny: TinyModel) -> None:
    images = random_images(2, seed=5)
    tensor = {"name": "INPUT", "shape": list(images.shape), "datatype": "UINT8",
              "data": images.ravel().tolist()}
    with ServerThread(server_config(tiny.bundle, metrics_port=-1)) as srv:
        def post(path: str, **fields: str) -> tuple[int, object]:
            body = json.dumps({**fields, "inputs": [tensor]}).encode()
            return _http(srv, "POST", f"/v2/models/{path}/infer", body)

        for path, fields in (("tiny", {"model_name": "tiny"}),
                             ("tiny", {"model_name": "tiny", "model_version": "1"}),
                             ("tiny/versions/1", {"model_name": "tiny", "model_version": "1"})):
            status, answer = post(path, **fields)
            assert status == 200, answer
            assert answer["model_name"] == "tiny"
        status, error = post("tiny", model_name="mnist")
        assert status == 400 and "'mnist'" in error["error"] and "'tiny'" in error["error"]
        status, error = post("tiny/versions/1", model_name="tiny", model_version="2")
        assert status == 400 and "model_version" in error["error"]


# The KServe SDK's generated protobuf module registers the same `inference.*` messages as
# tritonclient's (imported by the gRPC frontend), so both cannot live in one process: the
# SDK's client runs in a child process, against the server in this one.
KSERVE_CLIENT = """
import asyncio, json, sys
sys.path[:] = json.loads(sys.argv[1])
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, binary, images = sys.argv[2], sys.argv[3] == "binary", np.array(json.loads(sys.argv[4]), np.uint8)

async def run():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    try:
        inp = InferInput(name="INPUT", shape=list(images.shape), datatype="UINT8")
        inp.set_data_from_numpy(images, binary_data=binary)
        request = InferRequest(model_name="tiny", infer_inputs=[inp], request_id="ks-1")
        return await client.infer(f"http://{url}", request, model_name="tiny")
    finally:
        await client.close()

response = asyncio.run(run())
print(json.dumps({"model_name": response.model_name, "id": response.id,
                  "outputs": {o.name: o.as_numpy().tolist() for o in response.outputs}}))
"""


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_rest_client_gets_the_same_classes(tiny: TinyModel, binary: bool) -> None:
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the KServe SDK (kserve==0.21.0, about 270 MB with its dependencies) is "
                    "not installed")
    images = random_images(5, seed=6)
    with ServerThread(server_config(tiny.bundle, metrics_port=-1)) as srv:
        child = subprocess.run(
            [sys.executable, "-c", KSERVE_CLIENT, json.dumps(sys.path), srv.url,
             "binary" if binary else "json", json.dumps(images.tolist())],
            capture_output=True, text=True, timeout=120, check=False)
        assert child.returncode == 0, child.stderr[-3000:]
        reference = _infer(triton.InferenceServerClient(srv.url), images)
    response = json.loads(child.stdout)
    assert response["model_name"] == "tiny" and response["id"] == "ks-1"
    for task in ("digit", "parity"):
        classes = np.array(response["outputs"][f"{task}_class"])
        np.testing.assert_array_equal(classes, reference.as_numpy(f"{task}_class"))
        np.testing.assert_array_equal(classes, tiny.logits(images)[task].argmax(axis=1))
    flags = response["outputs"]["reconstructed"]  # may differ between runs: timing
    assert len(flags) == len(images) and all(isinstance(f, bool) for f in flags)



KSERVE_GRPC_CLIENT = """
import asyncio, json, sys
sys.path[:] = json.loads(sys.argv[1])
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

url, raw, images = sys.argv[2], sys.argv[3] == "raw", np.array(json.loads(sys.argv[4]), np.uint8)

async def run():
    # retries=0: no retry policy on the channel, one attempt per call
    client = InferenceGRPCClient(url, timeout=30, retries=0)
    try:
        ready = await client.is_server_ready()
        inp = InferInput(name="INPUT", shape=list(images.shape), datatype="UINT8")
        # raw: raw_input_contents; typed: contents.uint_contents
        inp.set_data_from_numpy(images, binary_data=raw)
        request = InferRequest(model_name="tiny", infer_inputs=[inp], request_id="ks-g1")
        return ready, await client.infer(request)
    finally:
        await client.close()

ready, response = asyncio.run(run())
print(json.dumps({"ready": ready, "model_name": response.model_name, "id": response.id,
                  "outputs": {o.name: o.as_numpy().tolist() for o in response.outputs}}))
"""


@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
def test_kserve_grpc_client_gets_the_same_classes(tiny: TinyModel, raw: bool) -> None:
    """The KServe SDK's gRPC client (InferenceGRPCClient, grpc.aio), in a child process,
    against the server's gRPC port: the same classes as tritonclient.grpc."""
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the KServe SDK (kserve==0.21.0, about 270 MB with its dependencies) is "
                    "not installed")
    import tritonclient.grpc as grpcclient

    images = random_images(5, seed=7)
    with ServerThread(server_config(tiny.bundle, metrics_port=-1)) as srv:
        child = subprocess.run(
            [sys.executable, "-c", KSERVE_GRPC_CLIENT, json.dumps(sys.path), srv.grpc_url,
             "raw" if raw else "typed", json.dumps(images.tolist())],
            capture_output=True, text=True, timeout=120, check=False)
        assert child.returncode == 0, child.stderr[-3000:]
        inp = grpcclient.InferInput("INPUT", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            reference = client.infer("tiny", [inp])
        finally:
            client.close()
    response = json.loads(child.stdout)
    assert response["ready"] is True
    assert response["model_name"] == "tiny" and response["id"] == "ks-g1"
    for task in ("digit", "parity"):
        classes = np.array(response["outputs"][f"{task}_class"])
        np.testing.assert_array_equal(classes, reference.as_numpy(f"{task}_class"))
        np.testing.assert_array_equal(classes, tiny.logits(images)[task].argmax(axis=1))
    flags = response["outputs"]["reconstructed"]  # may differ between runs: timing
    assert len(flags) == len(images) and all(isinstance(f, bool) for f in flags)

# -- cancellation ------------------------------------------------------------------------------
def test_batcher_counts_the_rows_of_given_up_blocks_once() -> None:
    async def run() -> list[int]:
        dropped: list[int] = []
        batcher = Batcher(2, max_queue_delay_s=0.0, max_queue_size=64,
                          on_cancelled=dropped.append)
        first = batcher.submit(np.zeros((3, 1, 4, 4), np.float32))
        second = batcher.submit(np.zeros((2, 1, 4, 4), np.float32))
        third = batcher.submit(np.zeros((4, 1, 4, 4), np.float32))
        batch = await batcher.next_group(1)  # rows 0..1 of the first block go out
        assert [(p.block, p.start, p.stop) for p in batch.pieces] == [(first, 0, 2)]
        first.future.cancel()  # its third row was never dispatched
        second.future.cancel()
        batch = await batcher.next_group(1)  # skips both: only the third block's rows go out
        assert all(p.block is third for p in batch.pieces)
        third.future.cancel()
        assert batcher.drain() == [third]  # shutdown: its 2 undispatched rows are dropped
        return dropped

    assert asyncio.run(run()) == [1, 2, 2]


def _raw_post(srv: ServerThread, images: np.ndarray) -> socket.socket:
    body = json.dumps({"inputs": [{"name": "INPUT", "shape": list(images.shape),
                                   "datatype": "UINT8", "data": images.ravel().tolist()}]})
    host, port = srv.url.split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall((f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    return sock


def _wait_for(srv: ServerThread, name: str, value: float, **labels: str) -> str:
    """/metrics once the sample `name` is exactly `value`."""
    deadline = time.monotonic() + 20
    while True:
        text = read_metrics(srv.metrics_url)
        if metric_value(text, name, **labels) == value:
            return text
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.005)


def _slow_infer(url: str, images: np.ndarray) -> triton.InferResult:
    return _infer(triton.InferenceServerClient(url, network_timeout=60), images)


@pytest.mark.parametrize("gives_up", ["disconnect", "timeout"])
def test_a_request_that_gives_up_while_queued_is_never_computed(tiny: TinyModel,
                                                                 gives_up: str) -> None:
    """One dispatch at a time, one group per dispatch, every worker call slow: a request's
    second group waits behind its first, and a later request waits behind both. The later
    request gives up while queued (its client disconnects, or its timeout passes): its
    queries are dropped unrun and counted; the slow request is answered, once."""
    k = tiny.k
    config = server_config(tiny.bundle, fault_delay_ms=400.0, fault_delay_prob=1.0,
                           max_inflight_groups=1, straggler_scale=0,
                           max_groups_per_call=1, max_queue_delay_ms=1.0)
    pending = "nv_inference_pending_request_count"
    with ServerThread(config) as srv, concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow_images = random_images(2 * k, seed=1)
        slow = pool.submit(_slow_infer, srv.url, slow_images)
        _wait_for(srv, pending, k)  # its first group runs, its second waits
        if gives_up == "disconnect":
            sock = _raw_post(srv, random_images(k, seed=2))
            _wait_for(srv, pending, 2 * k)  # queued behind the slow request
            sock.close()  # the client goes away before its answer
            reason = "ClientDisconnected"
        else:
            status, error = _http(srv, "POST", "/v2/models/tiny/infer", json.dumps({
                "inputs": [{"name": "INPUT", "shape": [k, 1, 4, 4], "datatype": "UINT8",
                            "data": random_images(k, seed=2).ravel().tolist()}],
                "parameters": {"timeout_ms": 50}}).encode())
            assert status == 504, error
            reason = "RequestTimeout"
        answer = slow.result(timeout=30)  # the slow request is answered, exactly
        np.testing.assert_array_equal(answer.as_numpy("digit_class"),
                                      tiny.logits(slow_images)["digit"].argmax(axis=1))
        text = _wait_for(srv, "coded_cancelled_queries_total", k, model="tiny")
        # only the slow request's queries were computed, each once; the other failed once
        assert metric_value(text, "nv_inference_count", model="tiny") == 2 * k
        assert metric_value(text, "nv_inference_request_success", model="tiny") == 1
        assert metric_value(text, "nv_inference_request_failure", model="tiny") == 1
        assert metric_value(text, "nv_inference_request_failure", reason=reason) == 1
        stats = triton.InferenceServerClient(srv.url).get_inference_statistics("tiny")
        (stats,) = stats["model_stats"]
        assert stats["coded"]["cancelled_queries"] == k
        assert stats["inference_count"] == 2 * k
        assert stats["inference_stats"]["fail"]["count"] == 1
