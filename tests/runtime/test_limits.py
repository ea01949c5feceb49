"""Backpressure and per-request timeouts on a real server with slow (fault-delayed) workers."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import numpy as np
import tritonclient.http as triton
from runtime_harness import ServerThread, TinyModel, metric_value, random_images, read_metrics, server_config


def _post(url: str, images: np.ndarray, parameters: dict | None = None
          ) -> tuple[int, dict, dict[str, str]]:
    body: dict = {"inputs": [{"name": "INPUT", "shape": list(images.shape), "datatype": "UINT8",
                              "data": images.ravel().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    request = urllib.request.Request(f"http://{url}/v2/models/tiny/infer",
                                     data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def test_full_queue_503_retry_after_and_timeouts(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, fault_delay_ms=500.0, fault_delay_prob=1.0,
                           max_queue_size=4, max_batch_size=4, admission_wait_ms=0,
                           max_inflight_groups=1, straggler_scale=0,
                           max_groups_per_call=1,
                           max_queue_delay_ms=1.0)
    with ServerThread(config) as srv, concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, srv.url, random_images(4, seed=1))  # 2 groups, ~1 s
        deadline = time.monotonic() + 20
        # group 1 runs, group 2 (2 queries) waits in the queue
        while metric_value(read_metrics(srv.metrics_url), "nv_inference_pending_request_count") < 2:
            assert time.monotonic() < deadline, "the first request never queued"
            time.sleep(0.02)
        status, payload, headers = _post(srv.url, random_images(4, seed=2))
        assert status == 503
        assert "overloaded" in payload["error"]
        assert headers["Retry-After"] == "1"
        assert first.result(timeout=30)[0] == 200  # the admitted request is unaffected

        # a per-request timeout (KServe parameter timeout_ms) answers 504 on time
        t0 = time.perf_counter()
        status, payload, _ = _post(srv.url, random_images(1, seed=3), {"timeout_ms": 100})
        assert status == 504 and "100 ms" in payload["error"]
        assert time.perf_counter() - t0 < 0.45
        # tritonclient's own `timeout` parameter (microseconds) is honoured too
        client = triton.InferenceServerClient(srv.url)
        inp = triton.InferInput("INPUT", [1, 1, 4, 4], "UINT8")
        inp.set_data_from_numpy(random_images(1, seed=4))
        try:
            client.infer("tiny", [inp], timeout=100_000)
            raise AssertionError("expected a timeout")
        except triton.InferenceServerException as exc:
            assert exc.status() == "504"
        # after all that, the server still answers correctly
        images = random_images(2, seed=5)
        status, payload, _ = _post(srv.url, images)
        assert status == 200
        classes = next(o["data"] for o in payload["outputs"] if o["name"] == "digit_class")
        assert classes == tiny.logits(images)["digit"].argmax(axis=1).tolist()
        metrics = read_metrics(srv.metrics_url)
    assert metric_value(metrics, "nv_inference_request_failure", reason="ServiceUnavailable") == 1
    assert metric_value(metrics, "nv_inference_request_failure", reason="RequestTimeout") == 2
