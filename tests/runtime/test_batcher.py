"""The batcher's group rule, blocks and batches, and the partial-group padding, without a
server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from runtime_harness import FakeClock, settle

from runtime.batcher import Batch, Batcher, Block
from runtime.errors import ServiceUnavailable
from runtime.modes.base import pad as _pad


def _xs(count: int) -> np.ndarray:
    return np.arange(count * 4, dtype=np.float32).reshape(count, 1, 2, 2)


SAFETY_S = 5.0  # bounds a wait that an event ends at once; never reached unless a test fails


def _rows(batch: Batch) -> list[tuple[Block, int, int]]:
    """A dispatch as (block, start, stop) pieces."""
    return [(p.block, p.start, p.stop) for p in batch.pieces]


def _answer(batch: Batch, rows: np.ndarray | None = None, flag: bool = False) -> int:
    """Answer batch rows with logits = the row's index in the batch (to see where it lands)."""
    idx = np.arange(len(batch)) if rows is None else rows
    logits = {"t": np.repeat(idx.astype(np.float32)[:, None], 2, axis=1)}
    return batch.answer(logits, np.full(len(idx), flag), rows=rows)


def test_full_group_leaves_before_the_deadline() -> None:
    async def run() -> None:
        clock = FakeClock(5.0)  # never moves: the 10 s deadline never comes
        batcher = Batcher(group_size=3, max_queue_delay_s=10.0, max_queue_size=10, clock=clock)
        first = batcher.submit(_xs(2))
        assert first.enqueued_s == 5.0  # the batcher's clock
        waiter = asyncio.create_task(batcher.next_group())
        await settle()
        assert not waiter.done()  # 2 < k and the deadline is 10 s away
        second = batcher.submit(_xs(2))
        batch = await asyncio.wait_for(waiter, SAFETY_S)  # left on the count, at t = 5
        assert _rows(batch) == [(first, 0, 2), (second, 0, 1)] and len(batcher) == 1
        np.testing.assert_array_equal(batch.x, np.concatenate([first.x, second.x[:1]]))

    asyncio.run(run())


def test_partial_group_leaves_at_the_deadline() -> None:
    async def run() -> None:
        clock = FakeClock(0.0)
        batcher = Batcher(group_size=4, max_queue_delay_s=0.08, max_queue_size=10, clock=clock)
        block = batcher.submit(_xs(1))
        waiter = asyncio.create_task(batcher.next_group())
        for now_s in (0.0, 0.04, 0.0799):  # before the deadline it keeps waiting
            clock.now_s = now_s
            await settle()
            assert not waiter.done(), now_s
        clock.now_s = 0.08
        batch = await asyncio.wait_for(waiter, SAFETY_S)
        assert _rows(batch) == [(block, 0, 1)]

    asyncio.run(run())


def test_the_deadline_is_the_oldest_live_querys() -> None:
    async def run() -> None:
        clock = FakeClock(0.0)
        batcher = Batcher(group_size=4, max_queue_delay_s=0.08, max_queue_size=10, clock=clock)
        oldest = batcher.submit(_xs(1))
        clock.now_s = 0.05
        younger = batcher.submit(_xs(1))
        clock.now_s = 0.08  # the oldest's deadline; the younger one waited only 30 ms
        batch = await asyncio.wait_for(batcher.next_group(), SAFETY_S)
        assert _rows(batch) == [(oldest, 0, 1), (younger, 0, 1)]
        # an abandoned oldest request no longer sets the deadline
        dead = batcher.submit(_xs(1))
        clock.now_s = 0.1
        live = batcher.submit(_xs(1))
        dead.future.cancel()
        clock.now_s = 0.16  # dead's deadline, not live's (0.18)
        waiter = asyncio.create_task(batcher.next_group())
        await settle()
        assert not waiter.done()
        clock.now_s = 0.18
        assert _rows(await asyncio.wait_for(waiter, SAFETY_S)) == [(live, 0, 1)]
        assert len(batcher) == 0  # the dead block's row left the count too

    asyncio.run(run())


def test_abandoned_requests_are_skipped_and_not_counted_live() -> None:
    async def run() -> None:
        batcher = Batcher(group_size=2, max_queue_delay_s=0.0, max_queue_size=10)
        first, second, third = (batcher.submit(_xs(b)) for b in (1, 2, 1))
        second.future.cancel()  # its request timed out before dispatch
        assert batcher.live_count() == 2 and len(batcher) == 4
        batch = await batcher.next_group()
        assert _rows(batch) == [(first, 0, 1), (third, 0, 1)] and len(batcher) == 0

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
        block = batcher.submit(_xs(7))  # 3 complete groups + 1 query
        batch = await asyncio.wait_for(batcher.next_group(max_groups=2), SAFETY_S)
        assert _rows(batch) == [(block, 0, 4)]  # capped at 2 groups
        batch = await asyncio.wait_for(batcher.next_group(max_groups=8), SAFETY_S)
        assert _rows(batch) == [(block, 4, 6)]  # the rest of the block stays first in line
        assert len(batcher) == 1  # the lone 7th query waits for a companion or its deadline

    asyncio.run(run())


def test_a_block_split_across_dispatches_is_answered_once_every_row_is_in() -> None:
    async def run() -> None:
        batcher = Batcher(group_size=2, max_queue_delay_s=0.0, max_queue_size=20)
        a, b = batcher.submit(_xs(3)), batcher.submit(_xs(3))
        first = await batcher.next_group(max_groups=2)  # a[0:3] + b[0:1]
        second = await batcher.next_group(max_groups=2)  # b[1:3]
        assert _rows(first) == [(a, 0, 3), (b, 0, 1)] and _rows(second) == [(b, 1, 3)]
        assert _answer(second, flag=True) == 2  # b's later rows land first
        assert a.future.done() is False and b.future.done() is False
        assert _answer(first) == 0
        answers = b.future.result()
        # each row holds the index it had in its own dispatch: b[0] was row 3 of `first`
        np.testing.assert_array_equal(answers.logits["t"][:, 0], [3, 0, 1])
        np.testing.assert_array_equal(answers.reconstructed, [False, True, True])
        np.testing.assert_array_equal(a.future.result().logits["t"][:, 0], [0, 1, 2])

    asyncio.run(run())


def test_a_block_answered_whole_takes_its_dispatchs_arrays_without_a_copy() -> None:
    async def run() -> None:
        batcher = Batcher(group_size=4, max_queue_delay_s=0.0, max_queue_size=20)
        a, b = batcher.submit(_xs(2)), batcher.submit(_xs(2))
        batch = await batcher.next_group()
        logits = {"t": np.arange(8, dtype=np.float32).reshape(4, 2)}
        assert batch.answer(logits, np.array([False, True, False, False])) == 1
        got = a.future.result().logits["t"]
        np.testing.assert_array_equal(got, [[0, 1], [2, 3]])
        assert np.shares_memory(got, logits["t"])  # a view of the dispatch's answer
        np.testing.assert_array_equal(b.future.result().logits["t"], [[4, 5], [6, 7]])
        np.testing.assert_array_equal(a.future.result().reconstructed, [False, True])

    asyncio.run(run())


def test_rows_of_a_batch_answer_and_fail_only_their_own_requests() -> None:
    async def run() -> None:
        batcher = Batcher(group_size=4, max_queue_delay_s=0.0, max_queue_size=20)
        a, b, c = (batcher.submit(_xs(n)) for n in (2, 1, 1))
        batch = await batcher.next_group()
        assert _answer(batch, rows=np.array([0, 2]), flag=True) == 2  # a[0] and b[0]
        assert b.future.done() and not a.future.done()
        batch.fail(ServiceUnavailable("slot lost"), rows=np.array([1]))  # a[1]
        with pytest.raises(ServiceUnavailable):
            a.future.result()
        assert not c.future.done()
        c.future.cancel()  # a request that gave up is never answered, nor counted
        assert _answer(batch, rows=np.array([3]), flag=True) == 0

    asyncio.run(run())


def test_given_up_requests_do_not_hold_queue_room() -> None:
    async def run() -> None:
        cancelled: list[int] = []
        batcher = Batcher(group_size=2, max_queue_delay_s=1.0, max_queue_size=4,
                          on_cancelled=cancelled.append)
        live = batcher.submit(_xs(1))
        gone = batcher.submit(_xs(3))  # the queue is full ...
        gone.future.cancel()  # ... until this request gives up (a client went away)
        block = batcher.submit(_xs(3))  # room again: the dead rows were purged, not refused
        assert len(batcher) == 4 and cancelled == [3]
        with pytest.raises(ServiceUnavailable, match="4 queries queued, limit 4"):
            batcher.submit(_xs(1))  # live rows really fill the queue now
        batch = await batcher.next_group(max_groups=2)
        assert _rows(batch) == [(live, 0, 1), (block, 0, 3)]

    asyncio.run(run())
