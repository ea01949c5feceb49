"""Fault injection against a real server: killed, straggling, overdue and failing workers.

No test measures latency: each asserts what the server reports (reconstructed flags,
labels, metrics). That a coded group is answered without waiting for its straggler, and
that the systematic grace waits, is pinned by tests/runtime/test_modes.py with a fake pool."""

from __future__ import annotations

import time

import numpy as np
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


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_killed_worker_every_request_answered_once_and_flagged(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, fault_kill_worker=0, fault_kill_after_calls=5,
                           max_queue_delay_ms=5.0)
    requests = 120
    images = {f"r{i}": random_images(1 + i % 2, seed=100 + i) for i in range(requests)}
    with ServerThread(config) as srv:
        pool = ClientPool(srv.url, threads=8)
        try:
            results = pool.map(lambda rid: (rid, pool.infer(images[rid], rid)), list(images))
        finally:
            pool.close()
        metrics = read_metrics(srv.metrics_url)
    answered = [rid for rid, (status, _) in results]
    assert sorted(answered) == sorted(images)  # each request answered exactly once
    flagged = 0
    for rid, (status, result) in results:
        assert status == 200, result
        assert result.get_response()["id"] == rid
        reference = tiny.logits(images[rid])
        # reconstructed answers are exact here (linear f): labels must still be right
        np.testing.assert_array_equal(result.as_numpy("digit_class"),
                                      reference["digit"].argmax(axis=1))
        np.testing.assert_allclose(result.as_numpy("digit_logits"), reference["digit"],
                                   atol=1e-3, rtol=0)
        flags = result.as_numpy("reconstructed")
        assert result.get_response()["parameters"]["reconstructed"] == bool(flags.any())
        flagged += int(flags.sum())
    assert flagged >= 1  # the killed worker's query at least was decoded
    assert metric_value(metrics, "coded_worker_restarts_total", worker="0", reason="dead") == 1
    assert metric_value(metrics, "coded_worker_failures_total", worker="0", reason="dead") >= 1
    # the server counted exactly the answers the clients saw flagged
    assert metric_value(metrics, "coded_reconstructed_responses_total") == flagged
    assert metric_value(metrics, "nv_inference_request_success") == requests


def test_straggler_per_group_is_decoded_not_waited_for(tiny: TinyModel) -> None:
    delay_ms = 1500.0
    # no re-dispatch: on a slow machine the straggler deadline can pass before the parity
    # (which waits for the encoder) lands, and a re-sent slot then answers exactly; that path
    # has its own tests (test_modes_coded), this one is about decoding
    config = server_config(tiny.bundle, fault_straggler_per_group=True, fault_delay_ms=delay_ms,
                           fault_seed=3, max_queue_delay_ms=50.0, redispatch=False)
    with ServerThread(config) as srv:
        client = triton.InferenceServerClient(srv.url)
        for i in range(4):
            images = random_images(2, seed=200 + i)  # one full group of k = 2
            inp = triton.InferInput("INPUT", [2, 1, 4, 4], "UINT8")
            inp.set_data_from_numpy(images)
            result = client.infer("tiny", [inp])
            # decoded from the parity: the straggler's own result was not in yet
            assert result.as_numpy("reconstructed").sum() == 1
            # ... and it was counted missing before the answer left (one per group so far)
            assert metric_value(read_metrics(srv.metrics_url), "coded_erasures_total") == i + 1
            np.testing.assert_array_equal(result.as_numpy("digit_class"),
                                          tiny.logits(images)["digit"].argmax(axis=1))
        # every straggler's call is cancelled once its group is answered (the delay stops),
        # and counted; none lands late
        assert _wait_for(lambda: metric_value(read_metrics(srv.metrics_url),
                                              "coded_cancelled_calls_total") == 4, 5.0)
        # one erasure per group: the straggler, whose result was missing at decode time
        text = read_metrics(srv.metrics_url)
        assert metric_value(text, "coded_late_results_dropped_total") == 0
        assert metric_value(text, "coded_erasures_total") == 4
        assert metric_value(text, "coded_reconstructed_responses_total") == 4


def test_uncoded_waits_for_the_straggler(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, mode="uncoded", fault_straggler_per_group=True,
                           fault_delay_ms=400.0, max_queue_delay_ms=50.0)
    images = random_images(2, seed=300)  # one group: both workers, one of them straggles
    with ServerThread(config) as srv:
        client = triton.InferenceServerClient(srv.url)
        inp = triton.InferInput("INPUT", [2, 1, 4, 4], "UINT8")
        inp.set_data_from_numpy(images)
        result = client.infer("tiny", [inp])
        text = read_metrics(srv.metrics_url)
    # no other copy: the straggler's own (late) result answered its query, exactly
    assert not result.as_numpy("reconstructed").any()
    np.testing.assert_allclose(result.as_numpy("digit_logits"), tiny.logits(images)["digit"],
                               atol=1e-3, rtol=0)
    assert metric_value(text, "nv_inference_exec_count") == 1
    assert metric_value(text, "coded_erasures_total") == 0  # every result was used...
    assert metric_value(text, "coded_late_results_dropped_total") == 0  # ... none dropped
    assert metric_value(text, "coded_reconstructed_responses_total") == 0


def test_overdue_worker_is_an_erasure_and_restarted(tiny: TinyModel) -> None:
    # deadline far above a normal call even on a loaded 2-core box, far below the delay
    # (late calls are not cancelled here: the straggler's call itself runs into its deadline;
    # test_pool covers the hung worker whose calls are all cancelled)
    config = server_config(tiny.bundle, fault_straggler_per_group=True, fault_delay_ms=3000.0,
                           worker_deadline_ms=800.0, fault_seed=1, max_queue_delay_ms=50.0,
                           cancel_late_calls=False)
    with ServerThread(config) as srv:
        client = triton.InferenceServerClient(srv.url)

        def settled(overdue: int) -> bool:
            text = read_metrics(srv.metrics_url)
            return (metric_value(text, "coded_worker_failures_total", reason="overdue") == overdue
                    and metric_value(text, "coded_worker_restarts_total") == overdue
                    and metric_value(text, "coded_worker_ready") == 3)

        for i in range(3):
            images = random_images(2, seed=400 + i)
            inp = triton.InferInput("INPUT", [2, 1, 4, 4], "UINT8")
            inp.set_data_from_numpy(images)
            result = client.infer("tiny", [inp])
            assert result.as_numpy("reconstructed").sum() == 1  # decoded from the parity
            np.testing.assert_array_equal(result.as_numpy("digit_class"),
                                          tiny.logits(images)["digit"].argmax(axis=1))
            # the straggler misses its deadline, counts as overdue and is replaced
            assert _wait_for(lambda i=i: settled(i + 1)), read_metrics(srv.metrics_url)


def test_failing_calls_answer_every_request_once(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, fault_fail_prob=0.25, fault_seed=7, metrics_port=-1)
    ids = [f"f{i}" for i in range(60)]
    images = {rid: random_images(2, seed=500 + i) for i, rid in enumerate(ids)}
    with ServerThread(config) as srv:
        pool = ClientPool(srv.url, threads=6)
        try:
            results = dict(pool.map(lambda rid: (rid, pool.infer(images[rid], rid)), ids))
        finally:
            pool.close()
    assert sorted(results) == sorted(ids)
    statuses = [status for status, _ in results.values()]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= len(ids) // 2  # 2+ erasures of 3 per group are rare at p=0.25
    for rid, (status, result) in results.items():
        if status == 200:
            np.testing.assert_array_equal(result.as_numpy("digit_class"),
                                          tiny.logits(images[rid])["digit"].argmax(axis=1))
        else:
            assert "decoding needs any 2" in result


def test_parm_decodes_the_stragglers_primary_head_only(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, mode="parm", fault_straggler_per_group=True,
                           fault_delay_ms=1000.0, metrics_port=-1, max_queue_delay_ms=50.0)
    images = random_images(2, seed=800)  # one full group
    reference = tiny.logits(images)
    with ServerThread(config) as srv:
        client = triton.InferenceServerClient(srv.url)
        inp = triton.InferInput("INPUT", [2, 1, 4, 4], "UINT8")
        inp.set_data_from_numpy(images)
        result = client.infer("tiny", [inp])
    flags = result.as_numpy("reconstructed")  # the straggler's query: decoded, not waited for
    assert flags.sum() == 1
    # primary head: parity - sum of the other primary logits, exact for this linear model
    np.testing.assert_allclose(result.as_numpy("digit_logits"), reference["digit"], atol=1e-3)
    np.testing.assert_array_equal(result.as_numpy("digit_class"), reference["digit"].argmax(1))
    assert np.isnan(result.as_numpy("parity_logits")[flags]).all()
    assert result.as_numpy("parity_class")[flags].tolist() == [-1]
    np.testing.assert_allclose(result.as_numpy("parity_logits")[~flags],
                               reference["parity"][~flags], atol=1e-3)
    assert result.get_response()["parameters"]["unavailable_heads"] == "parity"


def test_systematic_grace_trades_latency_for_exact_answers(tiny: TinyModel) -> None:
    images = random_images(2, seed=900)  # one full group

    def serve(grace_ms: float, delay_ms: float) -> tuple[int, str]:
        config = server_config(tiny.bundle, fault_straggler_per_group=True,
                               fault_delay_ms=delay_ms, systematic_grace_ms=grace_ms,
                               max_queue_delay_ms=50.0)
        with ServerThread(config) as srv:
            client = triton.InferenceServerClient(srv.url)
            inp = triton.InferInput("INPUT", [2, 1, 4, 4], "UINT8")
            inp.set_data_from_numpy(images)
            result = client.infer("tiny", [inp])
            text = read_metrics(srv.metrics_url)
        np.testing.assert_array_equal(result.as_numpy("digit_class"),
                                      tiny.logits(images)["digit"].argmax(axis=1))
        return int(result.as_numpy("reconstructed").sum()), text

    # a straggler within the grace: waited for, its own exact result is used
    reconstructed, text = serve(grace_ms=2000.0, delay_ms=300.0)
    assert reconstructed == 0
    assert metric_value(text, "coded_erasures_total") == 0
    assert metric_value(text, "coded_decode_duration_seconds_count") == 0  # nothing decoded
    # a straggler beyond the grace: decoded after the grace, not waited for
    reconstructed, text = serve(grace_ms=100.0, delay_ms=3000.0)
    assert reconstructed == 1
    assert metric_value(text, "coded_erasures_total") == 1
    assert metric_value(text, "coded_decode_duration_seconds_count") == 1
