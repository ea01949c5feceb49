"""Admission control: room from headers, a bounded FIFO waiting room, refusals counted."""

from __future__ import annotations

import asyncio

import pytest
from runtime_harness import settle

from runtime.admission import AdmissionControl
from runtime.errors import ServiceUnavailable
from runtime.metrics import Metrics


class Queue:
    def __init__(self) -> None:
        self.queued = 0


def _control(queue: Queue, *, limit: int = 2, wait_s: float = 60.0, max_waiting: int = 8
             ) -> tuple[AdmissionControl, Metrics]:
    metrics = Metrics("m")
    return AdmissionControl(lambda: queue.queued, limit, wait_s=wait_s, max_waiting=max_waiting,
                            metrics=metrics), metrics


def _rejected(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("coded_admission_rejected_total",
                                             {"model": "m", "version": "1"}) or 0.0


@pytest.mark.asyncio
async def test_admitted_requests_hold_room_until_they_queue() -> None:
    queue = Queue()
    control, _ = _control(queue, limit=2, wait_s=0)
    first, second = await control.admit(), await control.admit()
    with pytest.raises(ServiceUnavailable, match="2 requests being read"):
        await control.admit()  # two admitted, none queued yet: the room is taken
    first.release()
    queue.queued = 1  # its one query queued: still full
    with pytest.raises(ServiceUnavailable):
        await control.admit()
    second.release()  # gave up without queuing: one place free again
    assert not (await control.admit()).released


@pytest.mark.asyncio
async def test_waiters_are_admitted_in_arrival_order_as_room_frees() -> None:
    queue = Queue()
    queue.queued = 2
    control, _ = _control(queue, limit=2)
    order: list[str] = []

    async def client(name: str) -> None:
        await control.admit()
        order.append(name)

    tasks = [asyncio.create_task(client(n)) for n in ("a", "b", "c")]
    await asyncio.sleep(0)
    assert control.waiting == 3 and order == []
    queue.queued = 1  # one query dispatched
    control.room_changed()
    await settle()
    assert order == ["a"]
    queue.queued = 0  # the other too: one place is a's, one goes to b
    control.room_changed()
    await settle()
    assert order == ["a", "b"] and control.waiting == 1
    tasks[2].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert control.waiting == 0


@pytest.mark.asyncio
async def test_full_waiting_room_and_expired_waits_are_refused_and_counted() -> None:
    queue = Queue()
    queue.queued = 2
    control, metrics = _control(queue, limit=2, wait_s=0.01, max_waiting=1)
    waiter = asyncio.create_task(control.admit())
    await asyncio.sleep(0)
    with pytest.raises(ServiceUnavailable, match="waiting room is full"):
        await control.admit()
    with pytest.raises(ServiceUnavailable, match="no room within 10 ms"):
        await waiter
    assert _rejected(metrics) == 2 and control.waiting == 0


@pytest.mark.asyncio
async def test_a_newcomer_does_not_overtake_waiters() -> None:
    queue = Queue()
    queue.queued = 2
    control, _ = _control(queue, limit=2, wait_s=0)
    control.wait_s = 60.0
    waiting = asyncio.create_task(control.admit())
    await asyncio.sleep(0)
    queue.queued = 1  # room appears, but the waiter was first
    control.wait_s = 0
    with pytest.raises(ServiceUnavailable):
        await control.admit()
    control.room_changed()
    assert not (await waiting).released


@pytest.mark.asyncio
async def test_requests_hold_room_for_as_many_queries_as_recent_ones_carried() -> None:
    queue = Queue()
    control, _ = _control(queue, limit=16, wait_s=0)
    for _ in range(200):  # a stream of batch-8 requests
        (await control.admit()).release(queries=8)
    held = [await control.admit(), await control.admit()]  # 2 x 8 = the whole queue
    assert [a.reserved for a in held] == [8, 8]
    with pytest.raises(ServiceUnavailable):
        await control.admit()


@pytest.mark.asyncio
async def test_closing_refuses_every_waiter() -> None:
    queue = Queue()
    queue.queued = 2
    control, _ = _control(queue, limit=2)
    waiters = [asyncio.create_task(control.admit()) for _ in range(3)]
    await settle()
    control.close(ServiceUnavailable("server is shutting down"))
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ServiceUnavailable) for r in results) and control.waiting == 0
    queue.queued = 0
    assert not (await control.admit()).released  # room accounting untouched


@pytest.mark.asyncio
async def test_abandoned_queries_do_not_hold_room() -> None:
    queue = Queue()
    queue.queued = 2  # two queries queued, but their requests gave up
    metrics = Metrics("m")
    control = AdmissionControl(lambda: queue.queued, 2, wait_s=0, live=lambda: 0,
                               max_waiting=8, metrics=metrics)
    assert not (await control.admit()).released
