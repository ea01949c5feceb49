"""The dispatch loop (Scheduler + Batcher) with a fake mode and a fake clock: no server, no
workers, and nothing that depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import pytest
from runtime_harness import FakeClock, metric_sample, settle

from runtime.batcher import Answers, Batch, Batcher, Block
from runtime.errors import ServiceUnavailable
from runtime.metrics import Metrics
from runtime.scheduler import Scheduler

K = 2
SAFETY_S = 5.0  # bounds a wait that an event ends at once; never reached unless a test fails


@dataclass
class Dispatch:
    batch: Batch
    gate: asyncio.Future[None]  # the test ends the mode's work: result, or an exception

    def release(self) -> None:
        self.gate.set_result(None)

    @property
    def queries(self) -> list[Block]:
        return list(self.batch.blocks)


class FakeMode:
    """Records each dispatch and holds it until the test releases it; then answers it."""

    name = "fake"
    group_size = K

    def __init__(self) -> None:
        self.dispatches: list[Dispatch] = []
        self._changed = asyncio.Event()

    async def execute(self, batch: Batch) -> None:
        dispatch = Dispatch(batch, asyncio.get_running_loop().create_future())
        self.dispatches.append(dispatch)
        self._changed.set()
        await dispatch.gate
        batch.answer({"t": np.zeros((len(batch), 1), np.float32)}, np.zeros(len(batch), np.bool_))

    @property
    def running(self) -> int:
        return sum(not d.gate.done() for d in self.dispatches)

    async def dispatched(self, count: int) -> None:
        """Wait (on an event, not a clock) until `count` dispatches have been made."""
        while len(self.dispatches) < count:
            self._changed.clear()
            await self._changed.wait()


def _xs(count: int) -> np.ndarray:
    return np.zeros((count, 1, 2, 2), np.float32)


def _submit(scheduler: Scheduler, count: int) -> list[Block]:
    """`count` one-query requests."""
    return [scheduler.submit(_xs(1)) for _ in range(count)]


def _scheduler(*, inflight: int = 8, per_call: int = 1, delay_s: float = 10.0,
               queue: int = 64, clock: FakeClock | None = None
               ) -> tuple[Scheduler, FakeMode, Metrics, FakeClock]:
    clock = clock or FakeClock()
    mode = FakeMode()
    metrics = Metrics("tiny")
    batcher = Batcher(K, delay_s, queue, clock=clock)
    scheduler = Scheduler(mode, batcher, inflight, metrics, per_call)  # type: ignore[arg-type]
    return scheduler, mode, metrics, clock


def _count(metrics: Metrics, name: str) -> float:
    return metric_sample(metrics, name)


@pytest.mark.asyncio
async def test_inflight_groups_are_bounded_and_dispatched_in_order() -> None:
    scheduler, mode, metrics, _ = _scheduler(inflight=2)
    queries = _submit(scheduler, 5 * K)  # five complete groups
    await scheduler.start()
    await settle()
    assert len(mode.dispatches) == 2 and mode.running == 2  # the bound, not five
    for released, index in enumerate((1, 0, 2, 3, 4), start=1):  # finished out of order
        mode.dispatches[index].release()
        await settle()
        assert len(mode.dispatches) == min(5, 2 + released)  # one freed slot, one more group
        assert mode.running == min(2, 5 - released)
    for i, dispatch in enumerate(mode.dispatches):  # FIFO: group i holds queries 2i, 2i+1
        assert dispatch.queries == queries[i * K:(i + 1) * K]
    assert all(q.future.done() and q.future.exception() is None for q in queries)
    assert _count(metrics, "nv_inference_exec_count") == 5
    assert _count(metrics, "nv_inference_count") == 5 * K
    await scheduler.stop(timeout_s=0.0)


@pytest.mark.asyncio
async def test_queued_complete_groups_share_a_call_up_to_max_groups_per_call() -> None:
    scheduler, mode, metrics, clock = _scheduler(inflight=1, per_call=3, delay_s=0.05)
    clock.now_s = 100.0
    queries = _submit(scheduler, 3 * K + 3)  # 4 complete groups + 1
    await scheduler.start()
    await settle()
    assert [len(d.batch) for d in mode.dispatches] == [3 * K]  # capped at 3 groups
    mode.dispatches[0].release()
    await asyncio.wait_for(mode.dispatched(2), SAFETY_S)
    assert mode.dispatches[1].queries == queries[3 * K:4 * K]  # the one complete group left
    mode.dispatches[1].release()
    await settle()
    assert len(mode.dispatches) == 2  # the lone query waits for a companion or its deadline
    clock.now_s = 100.05  # its deadline, on the batcher's clock
    await asyncio.wait_for(mode.dispatched(3), SAFETY_S)
    assert mode.dispatches[2].queries == queries[-1:]  # a partial group, at the deadline
    assert queries[-1].dispatched_s == 100.05 and queries[0].dispatched_s == 100.0
    mode.dispatches[2].release()
    await settle()
    # queue time is measured on the batcher's clock: only the lone query waited (50 ms)
    assert _count(metrics, "nv_inference_queue_duration_us") == pytest.approx(0.05e6)
    assert _count(metrics, "nv_inference_exec_count") == 3
    await scheduler.stop(timeout_s=0.0)


@pytest.mark.asyncio
async def test_a_failing_mode_fails_exactly_its_group_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    scheduler, mode, metrics, _ = _scheduler(inflight=3)
    queries = _submit(scheduler, 3 * K)
    await scheduler.start()
    await settle()
    answered = Answers({}, np.ones(1, np.bool_))
    mode.dispatches[1].queries[0].future.set_result(answered)  # answered before the crash
    error = RuntimeError("bug in the mode")
    with caplog.at_level(logging.ERROR, logger="runtime.scheduler"):
        mode.dispatches[1].gate.set_exception(error)
        await settle()
    assert "dispatch of 2 queries failed in mode fake" in caplog.text
    assert queries[2].future.result() is answered
    assert queries[3].future.exception() is error
    for dispatch in (mode.dispatches[0], mode.dispatches[2]):
        assert not any(q.future.done() for q in dispatch.queries)  # untouched
        dispatch.release()
    later = _submit(scheduler, K)  # the loop still dispatches
    await asyncio.wait_for(mode.dispatched(4), SAFETY_S)
    mode.dispatches[3].release()
    await settle()
    assert all(q.future.exception() is None for q in [*queries[:2], *queries[4:], *later])
    assert _count(metrics, "nv_inference_exec_count") == 4
    await scheduler.stop(timeout_s=0.0)


@pytest.mark.asyncio
async def test_stop_fails_queued_queries_and_lets_inflight_groups_finish() -> None:
    scheduler, mode, _, _ = _scheduler(inflight=1)
    queries = _submit(scheduler, 3 * K)
    await scheduler.start()
    await settle()
    assert len(mode.dispatches) == 1
    # the in-flight group finishes while stop() waits for it (well within its 60 s)
    asyncio.get_running_loop().call_later(0.05, mode.dispatches[0].release)
    await asyncio.wait_for(scheduler.stop(timeout_s=60.0), SAFETY_S)
    assert len(mode.dispatches) == 1  # nothing dispatched after stop()
    assert all(q.future.exception() is None for q in queries[:K])  # the in-flight group
    for query in queries[K:]:  # the queued ones
        with pytest.raises(ServiceUnavailable, match="shut down before this query"):
            query.future.result()
    assert len(scheduler.batcher) == 0


@pytest.mark.asyncio
async def test_stop_fails_and_cancels_a_group_that_outlives_its_timeout() -> None:
    scheduler, mode, _, _ = _scheduler(inflight=2)
    queries = _submit(scheduler, K)
    await scheduler.start()
    await settle()
    (dispatch,) = mode.dispatches
    await scheduler.stop(timeout_s=0.0)  # the gate is never released
    for query in queries:
        with pytest.raises(ServiceUnavailable, match="shut down"):
            query.future.result()
    await settle()
    assert dispatch.gate.cancelled()  # the mode's work was cancelled, not left running


@pytest.mark.asyncio
async def test_queue_full_submit_is_all_or_nothing() -> None:
    scheduler, mode, metrics, _ = _scheduler(queue=4)
    scheduler.submit(_xs(3))
    assert _count(metrics, "nv_inference_pending_request_count") == 3
    with pytest.raises(ServiceUnavailable, match="3 queries queued, limit 4"):
        scheduler.submit(_xs(2))
    assert len(scheduler.batcher) == 3
    assert _count(metrics, "nv_inference_pending_request_count") == 3
    scheduler.submit(_xs(1))
    await scheduler.start()
    await settle()
    assert [len(d.batch) for d in mode.dispatches] == [K, K]  # the rejected two never run
    assert _count(metrics, "nv_inference_pending_request_count") == 0
    for dispatch in mode.dispatches:
        dispatch.release()
    await scheduler.stop(timeout_s=0.0)


@pytest.mark.asyncio
async def test_abandoned_queries_are_never_dispatched() -> None:
    scheduler, mode, _, _ = _scheduler()
    queries = _submit(scheduler, K + 1)
    queries[0].future.cancel()  # its request timed out while queued
    await scheduler.start()
    await settle()
    assert [d.queries for d in mode.dispatches] == [queries[1:]]
    mode.dispatches[0].release()
    await scheduler.stop(timeout_s=0.0)
    assert queries[0].future.cancelled()


@pytest.mark.asyncio
async def test_a_stalled_dispatch_gives_its_slot_to_the_next_one() -> None:
    scheduler, mode, _, _ = _scheduler(inflight=1)
    queries = _submit(scheduler, 2 * K)
    await scheduler.start()
    await settle()
    assert len(mode.dispatches) == 1  # the bound holds
    first = mode.dispatches[0]
    assert first.batch.on_stall is not None
    first.batch.on_stall()  # its mode saw only stragglers left (StragglerWatch)
    first.batch.on_stall()  # once is enough: the slot is not released twice
    await asyncio.wait_for(mode.dispatched(2), SAFETY_S)
    assert mode.running == 2
    _submit(scheduler, K)
    await settle()
    assert len(mode.dispatches) == 2  # one slot, taken by the second dispatch
    for dispatch in list(mode.dispatches):
        dispatch.release()
    await asyncio.wait_for(mode.dispatched(3), SAFETY_S)  # the first's end frees nothing more
    mode.dispatches[2].release()
    await settle()
    assert all(q.future.done() for q in queries)
    await scheduler.stop(timeout_s=0.0)


@pytest.mark.asyncio
async def test_without_a_stall_the_inflight_limit_holds() -> None:
    scheduler, mode, _, _ = _scheduler(inflight=1)
    _submit(scheduler, 2 * K)
    await scheduler.start()
    await settle()
    assert mode.running == 1 and len(mode.dispatches) == 1
    mode.dispatches[0].release()
    await asyncio.wait_for(mode.dispatched(2), SAFETY_S)
    mode.dispatches[1].release()
    await scheduler.stop(timeout_s=0.0)
