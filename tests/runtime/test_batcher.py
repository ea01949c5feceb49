"""The batcher's group rule and the partial-group padding, without a server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from runtime_harness import FakeClock, settle

from runtime.batcher import Batcher
from runtime.errors import ServiceUnavailable
from runtime.modes.base import pad as _pad


def _xs(count: int) -> np.ndarray:
    return np.arange(count * 4, dtype=np.float32).reshape(count, 1, 2, 2)


SAFETY_S = 5.0  # bounds a wait that an event ends at once; never reached unless a test fails


def test_full_group_leaves_before_the_deadline() -> None:
    async def run() -> None:
        clock = FakeClock(5.0)  # never moves: the 10 s deadline never comes
        batcher = Batcher(group_size=3, max_queue_delay_s=10.0, max_queue_size=10, clock=clock)
        first = batcher.submit(_xs(2))
        assert [q.enqueued_s for q in first] == [5.0, 5.0]  # the batcher's clock
        waiter = asyncio.create_task(batcher.next_group())
        await settle()
        assert not waiter.done()  # 2 < k and the deadline is 10 s away
        second = batcher.submit(_xs(2))
        group = await asyncio.wait_for(waiter, SAFETY_S)  # left on the count, at t = 5
        assert group == [*first, second[0]] and len(batcher) == 1

    asyncio.run(run())


def test_partial_group_leaves_at_the_deadline() -> None:
    async def run() -> None:
        clock = FakeClock(0.0)
        batcher = Batcher(group_size=4, max_queue_delay_s=0.08, max_queue_size=10, clock=clock)
        (query,) = batcher.submit(_xs(1))
        waiter = asyncio.create_task(batcher.next_group())
        for now_s in (0.0, 0.04, 0.0799):  # before the deadline it keeps waiting
            clock.now_s = now_s
            await settle()
            assert not waiter.done(), now_s
        clock.now_s = 0.08
        group = await asyncio.wait_for(waiter, SAFETY_S)
        assert group == [query]

    asyncio.run(run())


def test_the_deadline_is_the_oldest_live_querys() -> None:
    async def run() -> None:
        clock = FakeClock(0.0)
        batcher = Batcher(group_size=4, max_queue_delay_s=0.08, max_queue_size=10, clock=clock)
        (oldest,) = batcher.submit(_xs(1))
        clock.now_s = 0.05
        (younger,) = batcher.submit(_xs(1))
        clock.now_s = 0.08  # the oldest's deadline; the younger one waited only 30 ms
        assert await asyncio.wait_for(batcher.next_group(), SAFETY_S) == [oldest, younger]
        # an abandoned oldest query no longer sets the deadline
        (dead,) = batcher.submit(_xs(1))
        clock.now_s = 0.1
        (live,) = batcher.submit(_xs(1))
        dead.future.cancel()
        clock.now_s = 0.16  # dead's deadline, not live's (0.18)
        waiter = asyncio.create_task(batcher.next_group())
        await settle()
        assert not waiter.done()
        clock.now_s = 0.18
        assert await asyncio.wait_for(waiter, SAFETY_S) == [live]

    asyncio.run(run())


def test_abandoned_queries_are_skipped() -> None:
    async def run() -> None:
        batcher = Batcher(group_size=2, max_queue_delay_s=0.0, max_queue_size=10)
        queries = batcher.submit(_xs(3))
        queries[0].future.cancel()  # its request timed out before dispatch
        group = await batcher.next_group()
        assert group == queries[1:]

    asyncio.run(run())


def test_queue_limit_is_all_or_nothing() -> None:
    async def run() -> None:
        batcher = Batcher(group_size=2, max_queue_delay_s=1.0, max_queue_size=4)
        batcher.submit(_xs(3))
        with pytest.raises(ServiceUnavailable, match="3 queries queued, limit 4"):
            batcher.submit(_xs(2))
        assert len(batcher) == 3
        batcher.submit(_xs(1))
        assert len(batcher) == 4

    asyncio.run(run())


def test_partial_group_is_padded_with_the_last_query() -> None:
    xs = _xs(2)
    padded = _pad(xs, 4)
    assert padded.shape == (4, 1, 2, 2)
    np.testing.assert_array_equal(padded[:2], xs)
    np.testing.assert_array_equal(padded[2], xs[1])
    np.testing.assert_array_equal(padded[3], xs[1])
    assert _pad(xs, 2) is xs
    five = _xs(5)
    np.testing.assert_array_equal(_pad(five, 2)[5], five[4])  # 5 -> 3 groups of 2
    assert _pad(five, 2).shape[0] == 6


def test_queued_complete_groups_share_one_dispatch() -> None:
    async def run() -> None:
        batcher = Batcher(group_size=2, max_queue_delay_s=10.0, max_queue_size=20)
        batcher.submit(_xs(7))  # 3 complete groups + 1 query
        batch = await asyncio.wait_for(batcher.next_group(max_groups=2), SAFETY_S)
        assert len(batch) == 4  # capped at 2 groups
        batch = await asyncio.wait_for(batcher.next_group(max_groups=8), SAFETY_S)
        assert len(batch) == 2  # the lone 7th query waits for a companion or its deadline
        assert len(batcher) == 1

    asyncio.run(run())
