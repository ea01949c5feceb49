"""The batcher's group rule and the partial-group padding, without a server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from runtime.batcher import Batcher
from runtime.errors import ServiceUnavailable
from runtime.modes.base import pad as _pad


def _xs(count: int) -> np.ndarray:
    return np.arange(count * 4, dtype=np.float32).reshape(count, 1, 2, 2)


def test_full_group_leaves_before_the_deadline() -> None:
    async def run() -> float:
        batcher = Batcher(group_size=3, max_queue_delay_s=10.0, max_queue_size=10)
        batcher.submit(_xs(2))
        waiter = asyncio.create_task(batcher.next_group())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # 2 < k and the deadline is 10 s away
        t0 = time.perf_counter()
        batcher.submit(_xs(2))
        group = await asyncio.wait_for(waiter, 1.0)
        assert len(group) == 3 and len(batcher) == 1
        return time.perf_counter() - t0

    assert asyncio.run(run()) < 0.5


def test_partial_group_leaves_at_the_deadline() -> None:
    async def run() -> float:
        batcher = Batcher(group_size=4, max_queue_delay_s=0.08, max_queue_size=10)
        t0 = time.perf_counter()
        batcher.submit(_xs(1))
        group = await asyncio.wait_for(batcher.next_group(), 2.0)
        assert len(group) == 1
        return time.perf_counter() - t0

    waited_s = asyncio.run(run())
    assert 0.07 <= waited_s < 1.0


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
        batch = await asyncio.wait_for(batcher.next_group(max_groups=2), 1.0)
        assert len(batch) == 4  # capped at 2 groups
        batch = await asyncio.wait_for(batcher.next_group(max_groups=8), 1.0)
        assert len(batch) == 2  # the lone 7th query waits for a companion or its deadline
        assert len(batcher) == 1

    asyncio.run(run())
