"""Measures the partial-group rule (slow tier: `pytest -s --run-slow tests/runtime/test_partial_groups.py`).

Rule (runtime.batcher / runtime.modes): a coding group leaves when k queries are queued or
when its oldest query has waited --max-queue-delay-ms; a partial group is padded to k with
repeats of its last query and the padded answers are dropped. Prints lone-query and
full-group latencies per delay, and the share of partial groups under 8 concurrent
clients. Set RUNTIME_MEASURE_BUNDLE to measure another bundle (default: the tiny one).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from runtime_harness import ClientPool, ServerThread, TinyModel, metric_value, read_metrics, server_config

from runtime.manifest import Manifest

DELAYS_MS = (0.0, 2.0, 10.0)
REPEATS = 40


def _latencies_ms(client: triton.InferenceServerClient, model: str, images: np.ndarray) -> list[float]:
    inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    for _ in range(5):
        client.infer(model, [inp])
    out = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        client.infer(model, [inp])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@pytest.mark.slow
def test_partial_group_rule_measured(tiny: TinyModel) -> None:
    bundle = Path(os.environ.get("RUNTIME_MEASURE_BUNDLE", tiny.bundle))
    manifest = Manifest.load(bundle)
    k, shape, model = manifest.coding.k, manifest.input.shape, manifest.model_name
    rng = np.random.default_rng(0)
    print(f"\nbundle {bundle} k={k}, load average {os.getloadavg()} on {os.cpu_count()} CPUs")
    for delay_ms in DELAYS_MS:
        with ServerThread(server_config(bundle, max_queue_delay_ms=delay_ms),
                          ready_timeout_s=300) as srv:
            client = triton.InferenceServerClient(srv.url)
            lone = _latencies_ms(client, model, rng.integers(0, 256, (1, *shape), np.uint8))
            full = _latencies_ms(client, model, rng.integers(0, 256, (k, *shape), np.uint8))
            before = read_metrics(srv.metrics_url)
            pool = ClientPool(srv.url, threads=8, model=model)
            one = rng.integers(0, 256, (1, *shape), np.uint8)
            try:
                t0 = time.perf_counter()
                statuses = pool.map(lambda i, pool=pool, one=one: pool.infer(one, f"p{i}")[0],
                                    range(200))
                wall_s = time.perf_counter() - t0
            finally:
                pool.close()
            after = read_metrics(srv.metrics_url)
        dispatches = (metric_value(after, "nv_inference_exec_count")
                      - metric_value(before, "nv_inference_exec_count"))
        partial = (metric_value(after, "coded_partial_groups_total")
                   - metric_value(before, "coded_partial_groups_total"))
        padded = (metric_value(after, "coded_padded_queries_total")
                  - metric_value(before, "coded_padded_queries_total"))
        print(f"max_queue_delay_ms={delay_ms:g}: lone query p50 {statistics.median(lone):.1f} ms; "
              f"full group of {k} p50 {statistics.median(full):.1f} ms; 8 clients x 200 "
              f"one-image requests: {200 / wall_s:.0f} req/s, {dispatches:.0f} dispatches, "
              f"{partial:.0f} with a padded partial group")
        assert set(statuses) == {200}
        # a lone query always waits out the delay: its group can only leave at the deadline
        assert min(lone) >= delay_ms
        # at most one partial group per dispatch, padded with at most k - 1 repeats
        assert partial <= dispatches and padded <= partial * (k - 1)
