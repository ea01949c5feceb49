"""The Ray tier: real servers with `--workers-backend ray` on a local 2-CPU Ray cluster.

Not collected by a plain `pytest` run (no test_ prefix): test_ray_backend.py runs this file
inside a private network namespace with only loopback up, because Ray binds to the
machine's own non-loopback address otherwise. Run by hand the same way:

    unshare -n sh -c 'ip link set lo up && python -m pytest tests/runtime/ray_tier.py'
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from runtime_harness import (
    ClientPool,
    ServerThread,
    TinyModel,
    metric_value,
    random_images,
    read_metrics,
    server_config,
)

from bench.netns_cluster import loopback_only

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dist]'")

SAFETY_S = 30.0  # bounds a wait for something that happens at once; reached only on failure

if not loopback_only():
    pytest.skip("the Ray tier runs only in a network namespace with nothing but loopback "
                "(see this file's docstring); test_ray_backend.py runs it so",
                allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    """One local Ray instance for the module (each server's backend joins it)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False)
    yield
    ray.shutdown()


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + SAFETY_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {SAFETY_S:g} s: {what}")
        time.sleep(0.05)


def _infer(url: str, images: np.ndarray) -> triton.InferResult:
    client = triton.InferenceServerClient(url)
    inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    return client.infer("tiny", [inp])


def _actor_pid(srv: ServerThread, index: int) -> int:
    """The process of worker `index`'s actor (waiting while Ray restarts it)."""
    actor = srv.server.engine.backend.actor(index)  # type: ignore[union-attr]
    deadline = time.monotonic() + SAFETY_S
    while True:
        try:
            return ray.get(actor.ready.remote(), timeout=SAFETY_S)["pid"]
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_ray_answers_equal_the_thread_backends(tiny: TinyModel) -> None:
    batches = [random_images(1 + i % 3, seed=700 + i) for i in range(12)]
    answers: dict[str, list[np.ndarray]] = {}
    for backend in ("thread", "ray"):
        with ServerThread(server_config(tiny.bundle, workers_backend=backend)) as srv:
            results = [_infer(srv.url, images) for images in batches]
            answers[backend] = [r.as_numpy("digit_logits") for r in results]
            if backend == "ray":  # every worker is a Ray actor, in a process of its own
                pids = {_actor_pid(srv, i) for i in range(3)}
                assert len(pids) == 3 and os.getpid() not in pids
    for images, thread, on_ray in zip(batches, answers["thread"], answers["ray"], strict=True):
        np.testing.assert_allclose(on_ray, thread, atol=1e-4, rtol=0)
        np.testing.assert_allclose(on_ray, tiny.logits(images)["digit"], atol=1e-3, rtol=0)


def test_ray_actor_killed_mid_load_loses_nothing(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, workers_backend="ray", fault_kill_worker=0,
                           fault_kill_after_calls=5, max_queue_delay_ms=5.0)
    requests = 80
    images = {f"r{i}": random_images(1 + i % 2, seed=100 + i) for i in range(requests)}
    with ServerThread(config) as srv:
        before = _actor_pid(srv, 0)
        pool = ClientPool(srv.url, threads=8)
        try:
            results = pool.map(lambda rid: (rid, pool.infer(images[rid], rid)), list(images))
        finally:
            pool.close()
        def restarted() -> bool:
            text = read_metrics(srv.metrics_url)
            return (metric_value(text, "coded_worker_restarts_total", worker="0") == 1
                    and metric_value(text, "coded_worker_ready") == 3)

        _wait_for(restarted, "worker 0 restarted and back up")
        after = _actor_pid(srv, 0)
        metrics = read_metrics(srv.metrics_url)
    assert after != before  # the actor's process ended, and Ray restarted it
    assert sorted(rid for rid, _ in results) == sorted(images)  # each answered, once
    flagged = 0
    for rid, (status, result) in results:
        assert status == 200, (rid, result)
        assert result.get_response()["id"] == rid
        reference = tiny.logits(images[rid])["digit"]
        np.testing.assert_allclose(result.as_numpy("digit_logits"), reference, atol=1e-3, rtol=0)
        flagged += int(result.as_numpy("reconstructed").sum())
    assert flagged >= 1  # the killed worker's query at least was rebuilt
    assert metric_value(metrics, "coded_reconstructed_responses_total") == flagged
    assert metric_value(metrics, "coded_worker_restarts_total", worker="0", reason="dead") == 1
    assert metric_value(metrics, "nv_inference_request_success") == requests


def test_ray_straggler_is_decoded_around_and_its_call_cancelled(tiny: TinyModel) -> None:
    # each group's straggler would answer 60 s late: far past every bound here (and is not
    # re-sent elsewhere, which a parity slower than the straggler clock would otherwise cause)
    config = server_config(tiny.bundle, workers_backend="ray", fault_straggler_per_group=True,
                           fault_delay_ms=60_000.0, fault_seed=3, max_queue_delay_ms=50.0,
                           redispatch=False)
    groups = 4
    with ServerThread(config) as srv:
        for i in range(groups):
            images = random_images(2, seed=200 + i)  # one full group of k = 2
            result = _infer(srv.url, images)
            assert result.as_numpy("reconstructed").sum() == 1  # rebuilt from the parity
            np.testing.assert_array_equal(result.as_numpy("digit_class"),
                                          tiny.logits(images)["digit"].argmax(axis=1))
        _wait_for(lambda: metric_value(read_metrics(srv.metrics_url),
                                       "coded_cancelled_calls_total") == groups,
                  "every straggler's call cancelled")
        actors = [srv.server.engine.backend.actor(i) for i in range(3)]  # type: ignore[union-attr]
        # ... inside its actor too: nothing is left running there (the delay was stopped)
        _wait_for(lambda: sum(ray.get([a.calls_in_progress.remote() for a in actors])) == 0,
                  "the actors dropped the cancelled calls")
        metrics = read_metrics(srv.metrics_url)
    assert metric_value(metrics, "coded_erasures_total") == groups
    assert metric_value(metrics, "coded_late_results_dropped_total") == 0
