"""The shadow-decode monitor (runtime/shadow.py): the interval, the window and the alert, the
bounded queue, and the coded and ParM modes' jobs on the exact tiny bundles (modes_rig.py:
no server, the test lands each worker's result), where the rebuilt answer's error is known."""

from __future__ import annotations

import json
import random
import time
import urllib.request

import numpy as np
import pytest
from modes_rig import PRIMARY, Rig, f_numpy, make_run
from runtime_harness import TASKS, ServerThread, TinyModel, metric_sample, random_images, server_config, settle

from runtime.metrics import Metrics
from runtime.modes import ModeOptions
from runtime.shadow import ShadowConfig, ShadowMonitor, ShadowOutcome, wilson_interval


def _monitor(metrics: Metrics, **config: object) -> ShadowMonitor:
    options = {"fraction": 1.0, "seed": 0, **config}
    return ShadowMonitor(ShadowConfig(**options), list(TASKS), metrics, busy=lambda: False)


def test_the_wilson_interval_holds_the_estimate_and_narrows_with_more_samples() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    previous = 1.0
    for total in (10, 100, 1000, 10000):
        low, high = wilson_interval(int(0.9 * total), total)
        assert low < 0.9 < high and high - low < previous
        previous = high - low
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high)  # symmetric about 1/2
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_the_window_alerts_below_the_threshold_and_recovers(caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    metrics = Metrics("tiny")
    monitor = _monitor(metrics, window=10, min_samples=5, alert_below=0.8)
    both = list(TASKS)

    def outcome(agree: list[bool]) -> ShadowOutcome:
        return ShadowOutcome({t: np.array(agree) for t in both}, np.array([0.1] * len(agree)))

    monitor.record(outcome([False] * 4))  # below, but too few samples to say
    assert not monitor.alerting and metric_sample(metrics, "coded_shadow_alert") == 0
    with caplog.at_level("WARNING", logger="runtime.shadow"):
        monitor.record(outcome([True]))  # 1 of 5 agree
    assert monitor.alerting and metric_sample(metrics, "coded_shadow_alert") == 1
    assert "below --shadow-alert-below 0.80 with 95% confidence" in caplog.text
    monitor.record(outcome([True] * 4))  # 5 of 9: below 0.8, but not with confidence
    assert not monitor.alerting
    monitor.record(outcome([True] * 10))  # the window forgets the bad ones
    assert not monitor.alerting and metric_sample(metrics, "coded_shadow_alert") == 0
    stats = monitor.statistics()
    head = stats["heads"][both[0]]  # type: ignore[index]
    assert stats["decodes"] == 4 and head["agreement"] == 1.0 and head["window"] == 10
    low, high = wilson_interval(10, 10)
    assert head["interval_95"] == [round(low, 4), round(high, 4)]
    assert metric_sample(metrics, "coded_shadow_decodes_total") == 4
    assert metric_sample(metrics, "coded_shadow_agreements_total", head=both[0]) == 15
    assert metric_sample(metrics, "coded_shadow_compared_total", head=both[0]) == 19
    assert metric_sample(metrics, "coded_shadow_embedding_rel_error_count") == 19


@pytest.mark.asyncio
async def test_a_full_queue_drops_and_counts() -> None:
    metrics = Metrics("tiny")
    monitor = _monitor(metrics, queue_size=2)  # not started: nothing takes jobs out

    async def job() -> ShadowOutcome:
        raise AssertionError("never run")

    for _ in range(5):
        monitor.submit(job)
    assert metric_sample(metrics, "coded_shadow_dropped_total") == 3


def _options(monitor: ShadowMonitor) -> ModeOptions:
    return ModeOptions(shadow=monitor)


async def _drain(monitor: ShadowMonitor) -> None:
    monitor.start()
    for _ in range(200):
        await settle()
        if monitor._queue.empty() and monitor.decodes:  # noqa: SLF001 - the test's view
            break
    await monitor.stop()


@pytest.mark.asyncio
async def test_coded_shadow_rebuilds_a_known_answer_exactly_after_answering(rig: Rig) -> None:
    metrics = Metrics("tiny")
    monitor = _monitor(metrics)
    m = 2 * rig.k  # two full groups
    run = await make_run(rig, "coded", m, options=_options(monitor)).start()
    await run.land(range(rig.n))  # systematic first: exact answers, the parities after
    await run.done()
    run.check([False] * m)
    # the answers left before the job ran: it waits in the queue
    assert monitor.decodes == 0 and monitor._queue.qsize() == 1  # noqa: SLF001
    await _drain(monitor)
    assert monitor.decodes == 1
    for task in TASKS:  # one slot of each of the 2 groups, rebuilt exactly: all agree
        assert metric_sample(metrics, "coded_shadow_compared_total", head=task) == 2
        assert metric_sample(metrics, "coded_shadow_agreements_total", head=task) == 2
    assert metric_sample(metrics, "coded_shadow_embedding_rel_error_sum") < 1e-4


@pytest.mark.asyncio
async def test_coded_shadow_error_is_the_parity_error_it_was_given(tiny_rig: Rig) -> None:
    """A parity off by a known factor rebuilds slot s off by exactly that much."""
    rig, metrics = tiny_rig, Metrics("tiny")
    monitor = _monitor(metrics)
    run = await make_run(rig, "coded", rig.k, options=_options(monitor), seed=3).start()
    await run.land(range(rig.k))
    await run.done()  # all systematic in: answered exactly, the parity still out
    assert monitor._queue.qsize() == 0  # noqa: SLF001 - queued only once a parity lands
    parity_call = run.pool.call(rig.k)
    coefficients = np.asarray(rig.manifest.coding.coefficients[0], np.float64)
    z = f_numpy(rig.model, run.xs)  # [k, *EMB]
    parity = np.einsum("j,j...->...", coefficients, z)[None]  # [1, *EMB]
    epsilon = 0.25
    parity_call.future.set_result(((1 + epsilon) * parity).astype(np.float32))
    await settle()
    assert monitor._queue.qsize() == 1  # noqa: SLF001
    await _drain(monitor)
    draws = random.Random(0)  # the monitor's seed: one draw for wants(), one for pick(k)
    draws.random()
    s = draws.randrange(rig.k)
    # rebuilt z_s = (p' - sum_{j != s} c_j z_j) / c_s, so z_s' - z_s = eps * p / c_s
    expected = np.linalg.norm(epsilon * parity[0] / coefficients[s]) / np.linalg.norm(z[s])
    error = metric_sample(metrics, "coded_shadow_embedding_rel_error_sum")
    assert error == pytest.approx(expected, rel=1e-3)


@pytest.mark.asyncio
async def test_parm_shadow_rebuilds_the_primary_logits(tiny_rig: Rig) -> None:
    rig, metrics = tiny_rig, Metrics("tiny")
    monitor = _monitor(metrics)
    run = await make_run(rig, "parm", rig.k, options=_options(monitor)).start()
    await run.land(range(rig.k + 1))
    await run.done()
    await _drain(monitor)
    assert monitor.decodes == 1
    assert metric_sample(metrics, "coded_shadow_compared_total", head=PRIMARY) == 1
    assert metric_sample(metrics, "coded_shadow_agreements_total", head=PRIMARY) == 1
    assert metric_sample(metrics, "coded_shadow_embedding_rel_error_count") == 0  # logits only


@pytest.mark.asyncio
async def test_a_reconstructed_group_is_not_shadowed(tiny_rig: Rig) -> None:
    rig, metrics = tiny_rig, Metrics("tiny")
    monitor = _monitor(metrics)
    run = await make_run(rig, "coded", rig.k, options=_options(monitor)).start()
    await run.land([1, 2], failed=())  # slot 0 missing: decoded, no exact answer to check
    run.pool.fail(0)
    await run.done()
    await settle()
    assert monitor._queue.qsize() == 0  # noqa: SLF001


def test_the_statistics_endpoint_reports_the_running_agreement(tiny: TinyModel) -> None:
    config = server_config(tiny.bundle, shadow_decode_fraction=1.0, max_queue_delay_ms=5.0)
    with ServerThread(config) as srv:
        import tritonclient.http as triton

        client = triton.InferenceServerClient(srv.url)
        deadline = time.monotonic() + 30.0
        shadow: dict = {}
        while time.monotonic() < deadline:
            images = random_images(2, seed=int(time.monotonic() * 1e3) % 1000)
            inp = triton.InferInput("INPUT", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images)
            client.infer("tiny", [inp])
            with urllib.request.urlopen(f"http://{srv.url}/v2/models/tiny/stats") as response:
                shadow = json.load(response)["model_stats"][0]["coded"]["shadow"]
            if shadow["decodes"] >= 3:
                break
            time.sleep(0.01)
    assert shadow["decodes"] >= 3 and shadow["fraction"] == 1.0 and not shadow["alert"]
    for head in TASKS:  # the tiny code is exact: every rebuilt answer agrees
        assert shadow["heads"][head]["agreement"] == 1.0
        low, high = shadow["heads"][head]["interval_95"]
        assert low < 1.0 and high == 1.0


@pytest.mark.asyncio
async def test_parm_never_shadows_a_group_with_a_primary_missing(tiny_rig: Rig) -> None:
    """The only missing primary serves a padded slot: the answer needs nothing rebuilt, but
    the parity sums all k primaries, so a shadow job would compare the wrong thing."""
    rig, metrics = tiny_rig, Metrics("tiny")
    monitor = _monitor(metrics)
    run = await make_run(rig, "parm", 1, options=_options(monitor)).start()  # slot 1 is padding
    await run.land([0, rig.k])
    run.pool.fail(1)
    await run.done()
    await settle()
    assert monitor._queue.qsize() == 0  # noqa: SLF001


def test_a_window_shorter_than_min_samples_can_still_alert() -> None:
    metrics = Metrics("tiny")
    monitor = _monitor(metrics, window=10, min_samples=50, alert_below=0.8)
    monitor.record(ShadowOutcome({t: np.zeros(10, bool) for t in TASKS}))
    assert monitor.alerting
