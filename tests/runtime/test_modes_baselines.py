"""ParM, ApproxIFER, uncoded and replication driven directly, and what every mode shares:
partial groups, several groups per dispatch, cancelled queries."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from modes_rig import PRIMARY, TOLERANCE, Rig, Run, flags, make_run, one
from runtime_harness import CHW, TASKS, settle, until

from kernels.berrut import BerrutCode
from runtime.errors import ServiceUnavailable
from runtime.models import WORKER_F, WORKER_F_HEADS, WORKER_PARM
from runtime.modes import ModeOptions
from runtime.modes.base import padding_twins

# -- every mode: partial groups, several groups, cancelled requests -----------------------------
ALL_MODES = ["coded", "uncoded", "replication", "parm", "approxifer"]


def approxifer_expected(run: Run, indices: list[int]) -> dict[str, np.ndarray]:
    """ApproxIFER decodes affine workers as D_S E_S applied to the exact logits (the rows of
    the Berrut encoding matrix E sum to 1), per group; S = the workers whose results it used."""
    k, n = run.rig.k, run.rig.n
    code = BerrutCode(n=n, k=k)
    mix = code.decoding_matrix(indices) @ code.encoding_matrix()[indices]  # [k, k]
    m = len(run.queries)
    reference = run.reference()
    out = {}
    for task, logits in reference.items():
        padded = np.concatenate([logits, np.repeat(logits[-1:], -m % k, axis=0)])  # [G*k, cls]
        groups = padded.reshape(-1, k, padded.shape[1])  # [G, k, cls]
        out[task] = np.einsum("ij,gjc->gic", mix, groups).reshape(-1, padded.shape[1])[:m]
    return out


def check_approxifer(run: Run, indices: list[int]) -> None:
    expected = approxifer_expected(run, indices)
    for q, answer in enumerate(run.answers()):
        assert answer.reconstructed  # every ApproxIFER answer is decoded
        for task in TASKS:
            np.testing.assert_allclose(answer.logits[task], expected[task][q], **TOLERANCE,
                                       err_msg=f"query {q}, head {task}, workers {indices}")
    assert run.count("coded_reconstructed_responses_total") == len(run.queries)


@pytest.mark.asyncio
async def test_parm_every_arrival_order(rig: Rig) -> None:
    k = rig.k
    for order in itertools.permutations(range(k + 1)):
        run = await make_run(rig, "parm", k).start()
        await run.land(order)
        await run.done()
        check_parm(run, parm_missing(order, k), f"order {order}")


def parm_missing(order: Any, k: int) -> set[int]:
    """The primary slot ParM decodes when results land in `order` (k - 1 primaries and the
    parity, worker k, before the last primary), else none."""
    landed: set[int] = set()
    for worker in order:
        landed.add(worker)
        primaries = landed - {k}
        if len(primaries) == k:
            return set()
        if len(primaries) == k - 1 and k in landed:
            return set(range(k)) - primaries
    raise AssertionError(f"order {order} never decodes")


def check_parm(run: Run, missing: set[int], context: str) -> None:
    k, reference = run.rig.k, run.reference()
    for q, answer in enumerate(run.answers()):
        decoded = q % k in missing
        assert answer.reconstructed == decoded, context
        np.testing.assert_allclose(answer.logits[PRIMARY], reference[PRIMARY][q], **TOLERANCE,
                                   err_msg=context)
        for task in TASKS:
            if task == PRIMARY:
                continue
            if decoded:  # only the primary head can be decoded from the parity
                assert np.isnan(answer.logits[task]).all(), context
                assert answer.unavailable_heads == (task,), context
            else:
                np.testing.assert_allclose(answer.logits[task], reference[task][q], **TOLERANCE,
                                           err_msg=context)
                assert answer.unavailable_heads == (), context


@pytest.mark.asyncio
async def test_parm_one_erasure_at_each_position_and_too_many(rig: Rig) -> None:
    k = rig.k
    for failed in range(k + 1):
        run = await make_run(rig, "parm", k).start()
        await run.land(range(k + 1), failed={failed})
        await run.done()
        check_parm(run, {failed} - {k}, f"worker {failed} failed")
    run = await make_run(rig, "parm", k).start()
    await run.land(range(k + 1), failed={0, k})
    await run.done()
    for query in run.queries:
        with pytest.raises(ServiceUnavailable, match=f"ParM needs k={k}"):
            query.future.result()


@pytest.mark.asyncio
async def test_approxifer_decodes_from_the_first_k_results(rig: Rig) -> None:
    k, n = rig.k, rig.n
    for order in itertools.permutations(range(n)):
        run = await make_run(rig, "approxifer", k).start()
        await run.land(order)
        await run.done()
        check_approxifer(run, sorted(order[:k]))
        assert run.count("coded_late_results_dropped_total") == n - k
    run = await make_run(rig, "approxifer", k).start()
    await run.land(range(n), failed=set(range(n - k + 1)))  # k - 1 results: not enough
    await run.done()
    for query in run.queries:
        with pytest.raises(ServiceUnavailable, match=f"waits for {k} of {n} results"):
            query.future.result()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["uncoded", "replication"])
async def test_uncoded_answers_each_query_from_its_own_worker(rig: Rig, mode: str) -> None:
    k = rig.k
    replicas = 2 if mode == "replication" else 1
    run = await make_run(rig, mode, 2 * k + 1).start()  # several queries per worker
    for call in run.pool.calls:
        slot = call.worker % k
        np.testing.assert_array_equal(call.batch, run.xs[slot::k])
        assert call.group is run.pool.groups[0]
    assert run.pool.groups[0].systematic == tuple(range(k))
    if mode == "uncoded":  # no other copy: slot 0's queries wait for worker 0, no others do
        await run.land(range(1, k))
        assert [q.future.done() for q in run.queries] == [q % k != 0 for q in range(2 * k + 1)]
        await run.land([0])
    else:  # the second copies land first and answer
        await run.land(reversed(range(k * replicas)))
    await run.done()
    run.check([False] * (2 * k + 1))
    # replication: the second copy of each slot lands late and is dropped
    assert run.count("coded_late_results_dropped_total") == k * (replicas - 1)
    # each worker runs f and the heads in one call: the event loop classifies nothing
    assert {c.model for c in run.pool.calls} == {WORKER_F_HEADS}
    assert run.frontend.classified == []


@pytest.mark.asyncio
async def test_uncoded_erasure_fails_only_that_workers_queries(rig: Rig) -> None:
    k = rig.k
    for failed in range(k):
        run = await make_run(rig, "uncoded", k).start()
        await run.land(range(k), failed={failed})
        await run.done()
        for q, query in enumerate(run.queries):
            if q == failed:
                with pytest.raises(ServiceUnavailable, match="no other copy"):
                    query.future.result()
            else:
                assert not one(query).reconstructed


@pytest.mark.asyncio
async def test_replication_survives_one_copy_per_query(rig: Rig) -> None:
    k = rig.k
    for slot in range(k):
        run = await make_run(rig, "replication", k).start()
        await run.land(range(2 * k), failed={slot, (slot + 1) % k + k})  # one copy of two slots
        await run.done()
        run.check([False] * k)
    run = await make_run(rig, "replication", k).start()
    await run.land(range(2 * k), failed={0, k})  # both copies of slot 0
    await run.done()
    with pytest.raises(ServiceUnavailable, match="no other copy"):
        run.queries[0].future.result()
    assert all(not one(q).reconstructed for q in run.queries[1:])


@pytest.mark.asyncio
async def test_uncoded_rotates_partial_dispatches_over_the_workers(tiny_rig: Rig) -> None:
    mode = make_run(tiny_rig, "uncoded", 1).mode
    used = []
    for seed in range(3):  # one lone query per dispatch, on the same mode
        run = make_run(tiny_rig, "uncoded", 1, seed=seed)
        run.mode = mode
        mode.pool = run.pool  # type: ignore[assignment]
        mode.metrics = run.metrics
        await run.start()
        (call,) = run.pool.calls
        used.append(call.worker)
        await run.land([call.worker])
        await run.done()
        run.check([False])
    assert used == [0, 1, 0]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ALL_MODES)
async def test_partial_group_is_padded_and_padding_never_answered(rig: Rig, mode: str) -> None:
    k = rig.k
    for m in range(1, k):
        run = await make_run(rig, mode, m).start()
        padded = np.concatenate([run.xs, np.repeat(run.xs[-1:], k - m, axis=0)])  # [k, C, H, W]
        # one tag per dispatch; its systematic workers: uncoded uses only the real queries' ones
        systematic = tuple(range(m)) if mode in ("uncoded", "replication") else tuple(range(k))
        assert [g.systematic for g in run.pool.groups] == [systematic]
        assert all(c.group is run.pool.groups[0] for c in run.pool.calls)
        for call in run.pool.calls:
            if mode in ("uncoded", "replication"):  # only the real queries are sent
                np.testing.assert_array_equal(call.batch, run.xs[call.worker % k][None])
            elif call.model == WORKER_F and call.worker < k:  # slot i of the padded group
                np.testing.assert_array_equal(call.batch, padded[call.worker][None])
            elif call.model == WORKER_PARM:
                np.testing.assert_array_equal(call.batch, padded[None])
            elif mode == "approxifer":  # Berrut-coded inputs of the padded group
                coded = BerrutCode(n=rig.n, k=k).encode(padded)
                np.testing.assert_allclose(call.batch[0], coded[call.worker], rtol=1e-6, atol=1e-6)
        workers = sorted(c.worker for c in run.pool.calls)
        # coded, ParM: the first query's worker is erased; decoded from padding + parity,
        # but for a lone query: the padding repeats it, so a padded slot's result is its own
        failed = {0} if mode in ("coded", "parm") else set()
        lost = failed - set(padding_twins(m, k))
        await run.land(workers, failed=failed)
        await run.done()
        assert len(run.answers()) == m
        if mode == "approxifer":
            check_approxifer(run, workers[:k])
        elif mode == "parm":
            check_parm(run, lost, f"m={m}")
        else:
            run.check(flags(m, k, lost))
        partial = mode not in ("uncoded", "replication")
        assert run.count("coded_partial_groups_total") == partial
        assert run.count("coded_padded_queries_total") == (k - m) * partial
        if mode == "coded":
            assert run.frontend.classified == [m]  # padded slots are never classified


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["coded", "parm", "approxifer"])
async def test_several_groups_share_one_dispatch(rig: Rig, mode: str) -> None:
    k = rig.k
    m = 2 * k + 1  # G = 3 groups, the last one partial
    run = await make_run(rig, mode, m).start()
    padded = np.concatenate([run.xs, np.repeat(run.xs[-1:], -m % k, axis=0)])
    groups = padded.reshape(3, k, *CHW)
    assert len(run.pool.groups) == 1 and run.pool.groups[0].systematic == tuple(range(k))
    for call in run.pool.calls:
        assert call.group is run.pool.groups[0]
        assert len(call.batch) == 3  # one worker call carries its slot of every group
        if call.model == WORKER_F and call.worker < k:
            np.testing.assert_array_equal(call.batch, groups[:, call.worker])
    workers = sorted(c.worker for c in run.pool.calls)
    await run.land(workers, failed={1})
    await run.done()
    if mode == "coded":
        run.check(flags(m, k, {1}))
    elif mode == "parm":
        check_parm(run, {1}, "G=3")
    else:
        check_approxifer(run, [w for w in workers if w != 1][:k])


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ALL_MODES)
async def test_cancelled_queries_are_not_answered(tiny_rig: Rig, mode: str) -> None:
    run = await make_run(tiny_rig, mode, 4).start()
    run.queries[1].future.cancel()  # its request timed out while the workers ran
    workers = sorted({c.worker for c in run.pool.calls})
    # coded/ParM: slot 1's worker is erased, so query 1 would have been reconstructed
    await run.land(workers, failed={1} if mode in ("coded", "parm") else set())
    await run.done()
    assert run.queries[1].future.cancelled()
    live = [q for i, q in enumerate(run.queries) if i != 1]
    assert all(q.future.done() and not q.future.cancelled() for q in live)
    reconstructed = sum(one(q).reconstructed for q in live)
    assert run.count("coded_reconstructed_responses_total") == reconstructed
    if mode in ("coded", "parm"):
        assert [one(q).reconstructed for q in live] == [False, False, True]


@pytest.mark.asyncio
async def test_cancelled_queries_are_not_failed_either(tiny_rig: Rig) -> None:
    run = await make_run(tiny_rig, "coded", 2).start()
    run.queries[0].future.cancel()
    await run.land(range(3), failed={0, 1})
    await run.done()
    assert run.queries[0].future.cancelled()
    with pytest.raises(ServiceUnavailable):
        run.queries[1].future.result()


@pytest.mark.asyncio
async def test_uncoded_dispatch_with_a_straggling_slot_frees_its_slot(tiny_rig: Rig) -> None:
    options = ModeOptions(straggler_scale=0.0, straggler_min_s=0.0)
    run = await make_run(tiny_rig, "uncoded", 2, options=options).start()
    await run.land([0])  # slot 1 is now `scale` times later than the dispatch's first result
    await until(lambda: run.stalls == 1, "the dispatch reported stalled")
    assert run.count("coded_stalled_dispatches_total") == 1
    await run.land([1])  # uncoded still waits for it: nothing else can answer query 1
    await run.done()
    run.check([False, False])


@pytest.mark.asyncio
async def test_straggler_watch_is_relative_to_the_first_result() -> None:
    from runtime.metrics import Metrics
    from runtime.modes.base import StragglerWatch

    fired: list[int] = []
    watch = StragglerWatch(4.0, 0.002, lambda: fired.append(1), Metrics("tiny"))
    assert watch.deadline_s() is None  # nothing landed: no reference yet
    watch.launched_s -= 0.010  # the first result lands 10 ms after the launch
    watch.landed()
    assert watch.deadline_s() == pytest.approx(watch.launched_s + 4 * watch.first_s)
    assert watch.first_s == pytest.approx(0.010, abs=0.005)
    watch.first_s = 0.0001  # a very fast first result: the floor holds
    assert watch.deadline_s() == pytest.approx(watch.launched_s + 0.002)
    watch.stalled()
    watch.stalled()
    assert fired == [1]  # once per dispatch
    assert StragglerWatch(None, 0.0, None, Metrics("tiny")).deadline_s() is None


@pytest.mark.asyncio
async def test_straggler_watch_reads_a_sub_millisecond_clock(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    import time

    from runtime.metrics import Metrics
    from runtime.modes.base import StragglerWatch

    # uvloop's loop clock counts whole milliseconds: a first result after 1.3 ms read as 1
    # (or 2), and four first-result times moved the deadline by up to 4 ms
    now = [500.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    watch = StragglerWatch(4.0, 0.0, None, Metrics("tiny"))
    now[0] += 0.0013
    watch.landed()
    assert watch.first_s == pytest.approx(0.0013, abs=1e-9)
    assert watch.deadline_s() == pytest.approx(500.0 + 4 * 0.0013, abs=1e-9)


@pytest.mark.asyncio
async def test_straggler_watch_waits_for_the_dispatchs_own_compute_waves(tiny_rig: Rig) -> None:
    from runtime.batcher import Batch, Piece

    # 5 calls on 2 shared compute threads run in 3 waves: the last is due 2 first-result
    # times after the first, so the bound moves from scale to scale + 2 first-result times
    run = make_run(tiny_rig, "coded", tiny_rig.k, options=ModeOptions(
        straggler_scale=2.0, straggler_min_s=0.0, compute_slots=2))
    batch = Batch([Piece(run.queries[0], 0, 1, 0)])
    watch = run.mode.watch(batch, 5)
    assert watch.waves == 3
    watch.launched_s -= 0.010
    watch.landed()
    assert watch.deadline_s() == pytest.approx(watch.launched_s + 4 * watch.first_s)
    assert run.mode.watch(batch, 2).waves == 1  # every call has a thread
    # workers with their own compute (Ray actors): one wave, whatever the number of calls
    own = make_run(tiny_rig, "coded", tiny_rig.k, options=ModeOptions(straggler_scale=2.0))
    assert own.mode.watch(batch, 5).waves == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["replication", "parm", "approxifer"])
async def test_late_calls_nobody_reads_are_cancelled_at_once(tiny_rig: Rig, mode: str) -> None:
    rig, k = tiny_rig, tiny_rig.k
    options = ModeOptions(cancel_late_after_s=3600.0)  # the delay for calls still read
    run = await make_run(rig, mode, k, options=options).start()
    answering = range(k)  # enough for each: the first copies, the primaries, any k of n
    await run.land(answering)
    await run.done()
    await settle()
    late = [c for c in run.pool.calls if c.worker not in answering]
    assert late and all(c.future.cancelled() for c in late)
    assert run.count("coded_cancelled_calls_total") == len(late)
