"""1,000 requests from 50 concurrent clients: none lost, none duplicated, every label right."""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp
import numpy as np
from runtime_harness import ServerThread, TinyModel, metric_value, random_images, read_metrics, server_config

CLIENTS = 50
REQUESTS = 1000


async def _client(session: aiohttp.ClientSession, url: str, ids: list[int], images: np.ndarray,
                  seen: list[tuple[int, str, list[int], list[bool]]]) -> None:
    for i in ids:
        body = {"id": f"q{i}", "inputs": [{"name": "INPUT", "shape": [1, 1, 4, 4],
                                           "datatype": "UINT8", "data": images[i].ravel().tolist()}],
                "outputs": [{"name": "digit_class"}, {"name": "reconstructed"}]}
        async with session.post(f"http://{url}/v2/models/tiny/infer", json=body) as response:
            payload = await response.json()
            assert response.status == 200, payload
        outputs = {o["name"]: o["data"] for o in payload["outputs"]}
        seen.append((i, payload["id"], outputs["digit_class"], outputs["reconstructed"]))


async def _run(url: str, images: np.ndarray) -> list[tuple[int, str, list[int], list[bool]]]:
    seen: list[tuple[int, str, list[int], list[bool]]] = []
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(_client(session, url, list(range(c, REQUESTS, CLIENTS)), images, seen)
                               for c in range(CLIENTS)))
    return seen


def test_thousand_requests_fifty_clients(tiny: TinyModel) -> None:
    images = random_images(REQUESTS, seed=42)  # [1000, 1, 4, 4], one query per request
    expected = tiny.logits(images)["digit"].argmax(axis=1)
    with ServerThread(server_config(tiny.bundle, max_queue_delay_ms=2.0)) as srv:
        t0 = time.perf_counter()
        seen = asyncio.run(_run(srv.url, images))
        elapsed_s = time.perf_counter() - t0
        metrics = read_metrics(srv.metrics_url)
    ids = collections.Counter(rid for _, rid, _, _ in seen)
    assert len(seen) == REQUESTS
    assert set(ids) == {f"q{i}" for i in range(REQUESTS)}  # none lost
    assert max(ids.values()) == 1  # none duplicated
    for i, rid, classes, _ in seen:
        assert rid == f"q{i}"
        assert classes == [int(expected[i])]  # each answer belongs to its own query
    assert metric_value(metrics, "nv_inference_request_success") == REQUESTS
    assert metric_value(metrics, "nv_inference_count") == REQUESTS
    reconstructed = sum(flags[0] for _, _, _, flags in seen)
    assert metric_value(metrics, "coded_reconstructed_responses_total") == reconstructed
    print(f"{REQUESTS} requests, {CLIENTS} clients: {elapsed_s:.2f} s "
          f"({REQUESTS / elapsed_s:.0f} req/s), {reconstructed} reconstructed")
