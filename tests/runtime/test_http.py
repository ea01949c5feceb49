"""A real server on 127.0.0.1, driven by the stock tritonclient.http client (JSON + binary)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from runtime_harness import TASKS, ServerThread, TinyModel, metric_value, random_images, server_config

# float32 ONNX vs float64 reference, plus the coded decode's k * p - sum rounding
LOGIT_ATOL = 1e-3


def _infer(client: triton.InferenceServerClient, images: np.ndarray, binary: bool,
           outputs: list[str] | None = None) -> triton.InferResult:
    inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=binary)
    requested = None if outputs is None else [
        triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer("tiny", [inp], outputs=requested)


def _check_labels(result: triton.InferResult, tiny: TinyModel, images: np.ndarray,
                  parm: bool = False) -> None:
    reference = tiny.logits(images)
    primary = next(iter(TASKS))
    # ParM decodes only the primary head of a missing query; its other heads are unavailable
    decoded = result.as_numpy("reconstructed") if parm else np.zeros(len(images), bool)
    for task in TASKS:
        rows = slice(None) if task == primary else ~decoded
        np.testing.assert_allclose(result.as_numpy(f"{task}_logits")[rows], reference[task][rows],
                                   atol=LOGIT_ATOL, rtol=0)
        np.testing.assert_array_equal(result.as_numpy(f"{task}_class")[rows],
                                      reference[task].argmax(axis=1)[rows])
        if task != primary:
            assert np.isnan(result.as_numpy(f"{task}_logits")[decoded]).all()
            assert (result.as_numpy(f"{task}_class")[decoded] == -1).all()
    params = result.get_response()["parameters"]
    assert ("unavailable_heads" in params) == bool(decoded.any())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_gets_correct_labels(tiny: TinyModel, tiny_server: ServerThread,
                                          binary: bool) -> None:
    client = triton.InferenceServerClient(tiny_server.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny")
    images = random_images(7, seed=1)
    result = _infer(client, images, binary)
    _check_labels(result, tiny, images)
    flags = result.as_numpy("reconstructed")
    assert flags.shape == (7,) and flags.dtype == np.bool_
    params = result.get_response()["parameters"]
    assert params["reconstructed"] == bool(flags.any())
    assert params["mode"] == "coded"
    # requesting a subset of outputs returns exactly that subset
    subset = _infer(client, images, binary, outputs=["parity_class"])
    assert [o["name"] for o in subset.get_response()["outputs"]] == ["parity_class"]
    np.testing.assert_array_equal(subset.as_numpy("parity_class"),
                                  tiny.logits(images)["parity"].argmax(axis=1))


def test_fp32_input_and_single_image_shape(tiny: TinyModel, tiny_server: ServerThread) -> None:
    client = triton.InferenceServerClient(tiny_server.url)
    images = random_images(1, seed=2)
    inp = triton.InferInput("INPUT", [1, 4, 4], "FP32")  # no batch dim: one query
    inp.set_data_from_numpy((images[0] / 255.0).astype(np.float32))
    result = client.infer("tiny", [inp])
    _check_labels(result, tiny, images)


def test_metadata_and_metrics(tiny_server: ServerThread) -> None:
    client = triton.InferenceServerClient(tiny_server.url)
    meta = client.get_model_metadata("tiny")
    names = [o["name"] for o in meta["outputs"]]
    assert names == ["digit_logits", "digit_class", "parity_logits", "parity_class",
                     "reconstructed"]
    assert meta["inputs"][0]["shape"] == [-1, 1, 4, 4]
    assert meta["parameters"]["k"] == 2 and meta["parameters"]["n"] == 3
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    _infer(client, random_images(3, seed=3), binary=True)
    text = urllib.request.urlopen(tiny_server.metrics_url, timeout=10).read().decode()
    assert metric_value(text, "nv_inference_request_success", model="tiny") >= 1
    assert metric_value(text, "nv_inference_count", model="tiny") >= 3
    assert metric_value(text, "coded_worker_ready") == 3  # n = 3 workers, all warmed up
    for name in ("nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_exec_count"):
        assert metric_value(text, name, model="tiny", version="1") > 0, name
    assert "# TYPE coded_decode_duration_seconds histogram" in text


def _raw_infer(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://{url}/v2/models/tiny/infer",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("mode,extra", [
    ("uncoded", {}), ("replication", {}), ("parm", {}), ("coded", {"encoders_on_workers": True}),
])
def test_modes_answer_exactly(tiny: TinyModel, mode: str, extra: dict) -> None:
    images = random_images(5, seed=4)
    with ServerThread(server_config(tiny.bundle, mode=mode, metrics_port=-1, **extra)) as srv:
        client = triton.InferenceServerClient(srv.url)
        result = _infer(client, images, binary=True)
        _check_labels(result, tiny, images, parm=mode == "parm")
        assert result.get_response()["parameters"]["mode"] == mode
        # the plain-JSON path of the same server, with an id that must come back
        body = {"id": "req-7", "inputs": [{"name": "INPUT", "shape": [5, 1, 4, 4],
                                           "datatype": "UINT8", "data": images.ravel().tolist()}]}
        answer = _raw_infer(srv.url, body)
        assert answer["id"] == "req-7"
        classes = next(o for o in answer["outputs"] if o["name"] == "digit_class")["data"]
        assert classes == tiny.logits(images)["digit"].argmax(axis=1).tolist()


def test_approxifer_answers_every_query_as_decoded(tiny: TinyModel) -> None:
    images = random_images(6, seed=5)
    with ServerThread(server_config(tiny.bundle, mode="approxifer", metrics_port=-1)) as srv:
        result = _infer(triton.InferenceServerClient(srv.url), images, binary=True)
    logits = result.as_numpy("digit_logits")
    assert logits.shape == (6, 3) and np.isfinite(logits).all()
    # Berrut interpolation is approximate even for a linear model: only the flags are exact
    assert result.as_numpy("reconstructed").all()
    assert result.get_response()["parameters"]["reconstructed"] is True


def test_ready_only_after_every_worker_warmed_up(tiny: TinyModel) -> None:
    """live = 200 as soon as the socket listens; ready = 503 until the workers are warm."""
    import asyncio

    import aiohttp

    from runtime.server import Server

    async def run() -> None:
        server = Server(server_config(tiny.bundle, metrics_port=-1))
        try:
            await server.start_listening()
            base = f"http://127.0.0.1:{server.http_port}/v2"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/health/live") as response:
                    assert response.status == 200
                async with session.get(f"{base}/health/ready") as response:
                    assert response.status == 503
                    assert "warming up" in (await response.json())["error"]
                body = {"inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4], "datatype": "UINT8",
                                    "data": [0] * 16}]}
                async with session.post(f"{base}/models/tiny/infer", json=body) as response:
                    assert response.status == 503
                await server.start_workers()
                async with session.get(f"{base}/health/ready") as response:
                    assert response.status == 200
                async with session.post(f"{base}/models/tiny/infer", json=body) as response:
                    assert response.status == 200
        finally:
            await server.shutdown()

    asyncio.run(run())


def test_run_until_calls_on_ready_once_the_workers_are_warm(tiny: TinyModel) -> None:
    """`runtime serve` freezes the start-up heap there (runtime.serve.freeze_heap)."""
    import asyncio

    from runtime.server import Server

    async def run() -> list[bool]:
        server = Server(server_config(tiny.bundle, metrics_port=-1, grpc_port=-1))
        stop = asyncio.Event()
        seen: list[bool] = []

        def on_ready() -> None:
            seen.append(server.engine.health().ready)
            stop.set()

        await asyncio.wait_for(server.run_until(stop, on_ready=on_ready), 60)
        return seen

    assert asyncio.run(run()) == [True]


def test_freeze_heap_moves_the_live_heap_out_of_the_collector() -> None:
    import gc

    from runtime.serve import freeze_heap

    assert gc.get_freeze_count() == 0
    try:
        # modules, functions, this test's objects (some may be freed by refcount meanwhile)
        assert freeze_heap() > 1000 and gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()  # the test process goes on collecting as before
