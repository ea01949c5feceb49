"""The coded mode driven directly (tests/runtime/modes_rig.py): every arrival order, erasure
pattern, late result and grace."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from modes_rig import Rig, Run, decodable_prefix, flags, make_run, worker_result
from runtime_harness import settle, until

from kernels.coding import CodingScheme
from runtime.deadlines import DecodeWait
from runtime.decoders import HostDecoders
from runtime.errors import InjectedFailure, ServiceUnavailable, WorkerDead, WorkerError, WorkerOverdue
from runtime.models import ENCODER_THEN_F, WORKER_F
from runtime.modes import ModeOptions
from runtime.modes.coded import REDISPATCH_ROUNDS


# -- coded ---------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_coded_every_arrival_order_gives_the_same_answers(rig: Rig) -> None:
    k, n = rig.k, rig.n
    for order in itertools.permutations(range(n)):
        run = await make_run(rig, "coded", k).start()
        await run.land(order)
        await run.done()
        received = decodable_prefix(order, (), k)
        missing = set(range(k)) - set(received)
        run.check(flags(k, k, missing), f"arrival order {order}")
        # the results after the decodable one landed late: counted, nothing else changed
        late = order[len(received):]
        for worker in range(n):
            assert run.count("coded_late_results_dropped_total", worker=str(worker)) == (
                worker in late), order
            assert run.count("coded_erasures_total", worker=str(worker)) == (
                worker not in received), order
        run.check(flags(k, k, missing), f"arrival order {order}, after the late results")


@pytest.mark.asyncio
async def test_coded_results_landing_together_prefer_the_systematic_ones(rig: Rig) -> None:
    run = await make_run(rig, "coded", rig.k).start()
    for worker in reversed(range(rig.n)):  # parities first, all on the same loop turn
        run.pool.land(worker)
    await run.done()
    run.check([False] * rig.k)
    assert run.count("coded_erasures_total") == 0
    assert run.count("coded_late_results_dropped_total") == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("encoders_on_workers", [False, True], ids=["frontend-enc", "worker-enc"])
async def test_coded_erasures_up_to_n_minus_k_are_decoded_and_flagged(
        rig: Rig, encoders_on_workers: bool) -> None:
    k, n = rig.k, rig.n
    errors = [WorkerDead("dead"), WorkerOverdue("overdue"), InjectedFailure("injected"),
              WorkerError("crashed")]
    options = ModeOptions(encoders_on_workers=encoders_on_workers)
    for count in range(1, n - k + 1):
        for failed in itertools.combinations(range(n), count):
            for order in (tuple(range(n)), tuple(reversed(range(n)))):
                run = await make_run(rig, "coded", k, options=options).start()
                backups = [f"{ENCODER_THEN_F}{r}" for r in range(n - k)] \
                    if encoders_on_workers else [WORKER_F] * (n - k)
                assert [c.model for c in run.pool.calls[k:]] == backups
                assert run.frontend.encoded == (not encoders_on_workers)
                for i, worker in enumerate(order):
                    if worker in failed:
                        run.pool.fail(worker, errors[i % len(errors)])
                    else:
                        run.pool.land(worker)
                    await settle()
                await run.done()
                received = decodable_prefix(order, failed, k)
                run.check(flags(k, k, set(range(k)) - set(received)),
                          f"failed {failed}, order {order}")
                for worker in failed:
                    assert run.count("coded_erasures_total", worker=str(worker)) == 1


@pytest.mark.asyncio
async def test_coded_too_many_erasures_fail_every_query_once(rig: Rig) -> None:
    k, n = rig.k, rig.n
    for failed in itertools.combinations(range(n), n - k + 1):
        for order in (tuple(range(n)), tuple(reversed(range(n)))):
            run = await make_run(rig, "coded", 2 * k).start()  # two groups in one dispatch
            await run.land(order, failed)
            await run.done()
            for query in run.queries:
                with pytest.raises(ServiceUnavailable, match=f"decoding needs any {k}"):
                    query.future.result()
            assert run.frontend.classified == []  # nothing was classified, nothing answered
            assert run.count("coded_reconstructed_responses_total") == 0


@pytest.mark.asyncio
async def test_coded_late_results_change_nothing(tiny_rig: Rig) -> None:
    run = await make_run(tiny_rig, "coded", 2).start()
    await run.land([2, 0])  # parity + worker 0: decodable, slot 1 reconstructed
    await run.done()
    before = [{t: v.copy() for t, v in a.logits.items()} for a in run.answers()]
    run.pool.land(1)  # the straggler's exact result, too late
    await settle()
    run.check([False, True])
    for answer, logits in zip(run.answers(), before, strict=True):
        for task, values in logits.items():
            np.testing.assert_array_equal(answer.logits[task], values)
    assert run.count("coded_late_results_dropped_total", worker="1") == 1
    assert run.count("coded_erasures_total", worker="1") == 1
    assert run.frontend.classified == [2]  # the heads ran once


@pytest.mark.asyncio
async def test_coded_late_failures_and_cancelled_calls_are_not_late_results(tiny_rig: Rig) -> None:
    run = await make_run(tiny_rig, "coded", 2).start()
    await run.land([0, 1])
    await run.done()
    run.pool.fail(2)  # the unused parity fails after the answer
    await settle()
    assert run.count("coded_late_results_dropped_total") == 0
    run = await make_run(tiny_rig, "coded", 2).start()
    await run.land([0, 1])
    await run.done()
    run.pool.call(2).future.cancel()  # e.g. the pool shut down
    await settle()
    assert run.count("coded_late_results_dropped_total") == 0
    run.check([False, False])


@pytest.mark.asyncio
async def test_coded_systematic_grace_waits_for_the_exact_result(tiny_rig: Rig) -> None:
    # a grace far longer than the test: the missing systematic result lands within it
    run = await make_run(tiny_rig, "coded", 2, options=ModeOptions(systematic_grace_s=60.0)).start()
    await run.land([2, 0])  # decodable, slot 1 missing: the mode waits out the grace
    assert not run.task.done()
    await run.land([1])
    await run.done()
    run.check([False, False])  # its own exact result was used: no reconstruction
    assert run.count("coded_erasures_total") == 0
    assert run.count("coded_decode_duration_seconds_count") == 0  # nothing was decoded


@pytest.mark.asyncio
async def test_coded_systematic_grace_expires_then_decodes(tiny_rig: Rig) -> None:
    # a short grace; the straggler never lands before the test has its answers
    run = await make_run(tiny_rig, "coded", 2, options=ModeOptions(systematic_grace_s=0.01)).start()
    await run.land([2, 0])
    await asyncio.wait_for(asyncio.shield(run.task), 10.0)  # safety bound, not a threshold
    await run.done()
    run.check([False, True])
    assert run.count("coded_erasures_total", worker="1") == 1
    run.pool.land(1)
    await settle()
    assert run.count("coded_late_results_dropped_total", worker="1") == 1


@pytest.mark.asyncio
async def test_coded_systematic_grace_not_waited_when_it_cannot_help(tiny_rig: Rig) -> None:
    options = ModeOptions(systematic_grace_s=60.0)
    run = await make_run(tiny_rig, "coded", 2, options=options).start()
    await run.land([0, 1])  # nothing missing: nothing to wait for
    await run.done()
    run.check([False, False])
    run = await make_run(tiny_rig, "coded", 2, options=options).start()
    await run.land([1, 2, 0], failed={1})  # worker 1 already failed: nothing to wait for
    await run.done()  # within a few loop turns, not after 60 s
    run.check([False, True])
    run = await make_run(tiny_rig, "coded", 2, options=options).start()
    await run.land([2, 0])
    run.pool.fail(1)  # the awaited result fails during the grace: decode at once
    await run.done()
    run.check([False, True])


@pytest.mark.asyncio
async def test_coded_grace_keeps_a_systematic_result_that_came_in_time(wide_rig: Rig) -> None:
    run = await make_run(wide_rig, "coded", 3, options=ModeOptions(systematic_grace_s=60.0)).start()
    await run.land([0, 3, 4])  # decodable; slots 1 and 2 missing: the grace begins
    await run.land([1, 2], failed={2})  # 1's exact result lands within it, 2 fails
    await run.done()
    assert run.count("coded_erasures_total", worker="2") == 1
    assert run.count("coded_erasures_total", worker="1") == 0
    run.check([False, False, True])  # only slot 2 needed decoding


# -- learned decode wait and re-dispatch -----------------------------------------------------------
def _teach(run: Run, seconds: float, samples: int = 32) -> None:
    """Missing systematic results recently came `seconds` after decodability."""
    assert run.mode.lateness is not None
    for _ in range(samples):
        run.mode.lateness.observe(seconds)


@pytest.mark.asyncio
async def test_coded_learned_wait_waits_when_late_results_usually_come_soon(tiny_rig: Rig) -> None:
    # they came within the cap (here 120 s, far beyond the test): waiting pays
    run = make_run(tiny_rig, "coded", 2, options=ModeOptions(decode_wait=DecodeWait(cap_s=120.0)))
    _teach(run, 60.0)
    await run.start()
    await run.land([2, 0])  # decodable, slot 1 missing: the mode waits for it
    assert not run.task.done()
    await run.land([1])
    await run.done()
    run.check([False, False])  # exact: nothing was decoded
    assert run.count("coded_decode_waits_total", outcome="exact") == 1
    assert run.count("coded_decode_duration_seconds_count") == 0
    assert run.mode.lateness.samples == 33  # and this lateness was learned too


@pytest.mark.asyncio
async def test_coded_learned_wait_measures_lateness_below_a_millisecond(
        tiny_rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    # the wait's cap is 5 ms and most latenesses are under one: the loop clock's whole
    # milliseconds would read them as 0 or 1 ms
    run = make_run(tiny_rig, "coded", 2, options=ModeOptions(decode_wait=DecodeWait(cap_s=120.0)))
    _teach(run, 60.0)
    await run.start()
    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    await run.land([2, 0])  # decodable at 1000.0, slot 1 missing: the mode waits for it
    now[0] += 0.0004
    await run.land([1])
    await run.done()
    lateness = run.mode.lateness
    assert lateness.samples == 33
    assert lateness._values[32] == pytest.approx(0.0004, abs=1e-9)


@pytest.mark.asyncio
async def test_coded_learned_wait_decodes_at_once_when_waiting_does_not_pay(tiny_rig: Rig) -> None:
    # missing results recently never came within the cap (a worker that always straggles)
    run = make_run(tiny_rig, "coded", 2, options=ModeOptions(decode_wait=DecodeWait(cap_s=120.0)))
    _teach(run, 1000.0)
    await run.start()
    await run.land([2, 0])
    await run.done()  # within a few loop turns, no timer involved
    run.check([False, True])
    assert run.count("coded_decode_waits_total", outcome="exact") == 0
    run.pool.land(1)  # it lands late: learned as one more lateness
    await settle()
    assert run.mode.lateness.samples == 33


@pytest.mark.asyncio
async def test_coded_redispatches_missing_slots_when_undecodable_at_the_bound(tiny_rig: Rig) -> None:
    # scale 0, no floor: once the first result is in, the missing calls are stragglers
    options = ModeOptions(straggler_scale=0.0, straggler_min_s=0.0, redispatch=True)
    run = await make_run(tiny_rig, "coded", 2, options=options).start()
    await run.land([0])  # worker 0 answered; 1 and the parity straggle: 1 of 2 needed results
    # scale 0, no floor: each round's deadline is its start, so all rounds go out at once
    await until(lambda: len(run.pool.calls) == 3 + REDISPATCH_ROUNDS, "the re-dispatched calls")
    again = run.pool.calls[3:]
    for call in again:  # each on a worker that already answered, with slot 1's input
        assert call.worker == 0 and call.model == WORKER_F
        np.testing.assert_array_equal(call.batch, run.pool.call(1).batch)
    last = again[-1]
    last.future.set_result(worker_result(tiny_rig, last.model, last.batch))
    await run.done()
    run.check([False, False])  # slot 1's own f, computed on worker 0: exact
    assert run.count("coded_redispatched_calls_total") == REDISPATCH_ROUNDS
    assert run.count("coded_stalled_dispatches_total") == 1 and run.stalls == 1
    assert run.count("coded_erasures_total", worker="1") == 0  # its slot was answered
    run.pool.land(1)  # the original straggler lands late: dropped, counted
    await settle()
    assert run.count("coded_late_results_dropped_total", worker="1") == 1


@pytest.mark.asyncio
async def test_coded_does_not_redispatch_a_decodable_group(tiny_rig: Rig) -> None:
    run = await make_run(tiny_rig, "coded", 2, options=ModeOptions(
        straggler_scale=0.0, straggler_min_s=0.0, redispatch=True)).start()
    run.pool.land(0)
    run.pool.land(2)  # both on one loop turn: decodable with the parity, nothing to re-send
    await run.done()
    run.check([False, True])
    assert len(run.pool.calls) == 3 and run.count("coded_redispatched_calls_total") == 0


@pytest.mark.asyncio
async def test_coded_without_redispatch_only_frees_the_slot(tiny_rig: Rig) -> None:
    options = ModeOptions(straggler_scale=0.0, straggler_min_s=0.0, redispatch=False)
    run = await make_run(tiny_rig, "coded", 2, options=options).start()
    await run.land([0])
    await until(lambda: run.stalls == 1, "the dispatch reported stalled")
    assert len(run.pool.calls) == 3  # nothing re-sent
    await run.land([2])
    await run.done()
    run.check([False, True])


# -- decoder leases (runtime/decoders.py: persistent GPU decoders must come back) -----------------
class CountingDecoders(HostDecoders):
    """Host decoders that record every lease, so a test sees each one given back once."""

    def __init__(self, scheme: CodingScheme) -> None:
        super().__init__(scheme)
        self.out: list[object] = []
        self.returned: list[object] = []

    def acquire(self, shape: tuple[int, ...]):  # noqa: ANN201 - OnlineDecoder
        decoder = super().acquire(shape)
        self.out.append(decoder)
        return decoder

    def release(self, decoder) -> None:  # noqa: ANN001
        assert decoder in self.out and decoder not in self.returned, "released twice or never leased"
        self.returned.append(decoder)


def _counting(rig: Rig) -> CountingDecoders:
    return CountingDecoders(CodingScheme.from_dict(rig.manifest.coding.to_dict()))


@pytest.mark.asyncio
async def test_coded_gives_back_every_decoder_it_leases(tiny_rig: Rig) -> None:
    decoders = _counting(tiny_rig)
    run = await make_run(tiny_rig, "coded", 2, options=ModeOptions(decoders=decoders)).start()
    await run.land([2, 0])  # decoded
    await run.done()
    run.check([False, True])
    assert len(decoders.out) == 1 and decoders.returned == decoders.out

    decoders = _counting(tiny_rig)  # the grace refolds: two leases, both back
    run = await make_run(tiny_rig, "coded", 2,
                         options=ModeOptions(decoders=decoders, systematic_grace_s=60.0)).start()
    await run.land([2, 0])
    await run.land([1])
    await run.done()
    run.check([False, False])
    assert len(decoders.out) == 2 and sorted(map(id, decoders.returned)) == sorted(map(id, decoders.out))

    decoders = _counting(tiny_rig)  # undecodable: the dispatch fails, the lease comes back
    run = await make_run(tiny_rig, "coded", 2, options=ModeOptions(decoders=decoders)).start()
    await run.land([0, 1, 2], failed={0, 1, 2})
    await settle()
    for query in run.queries:
        with pytest.raises(ServiceUnavailable):
            query.future.result()
    assert len(decoders.out) == 1 and decoders.returned == decoders.out


# -- the encoders run beside the systematic calls ------------------------------------------------
class GatedEncoders:
    """Replaces a run's frontend.encode: it waits for `gate` (then encodes, or raises
    `error`), recording that it began and whether it ended."""

    def __init__(self, run: Run, error: BaseException | None = None) -> None:
        self.gate = asyncio.Event()
        self.began = self.ended = False
        self._encode, self._error = run.frontend.encode, error
        run.frontend.encode = self  # type: ignore[method-assign]

    async def __call__(self, groups: np.ndarray) -> list[np.ndarray]:
        self.began = True
        await self.gate.wait()
        self.ended = True
        if self._error is not None:
            raise self._error
        return await self._encode(groups)



@pytest.mark.asyncio
async def test_coded_systematic_calls_do_not_wait_for_the_encoders(rig: Rig) -> None:
    k, n = rig.k, rig.n
    run = make_run(rig, "coded", 2 * k)  # two groups: every worker runs a batch of 2
    encoders = GatedEncoders(run)
    run.begin()
    await until(lambda: encoders.began, "the encoders began")
    await settle()
    assert [(c.worker, c.model) for c in run.pool.calls] == [(i, WORKER_F) for i in range(k)]
    await run.land(range(k))  # every exact result lands while the encoders still run
    await run.done()
    run.check([False] * (2 * k))
    assert not encoders.ended and len(run.pool.calls) == k
    encoders.gate.set()  # the encoding ends after the answer: its parities are late results
    await until(lambda: len(run.pool.calls) == n, "the parity calls")
    await run.land(range(k, n))
    for worker in range(k, n):
        assert run.count("coded_late_results_dropped_total", worker=str(worker)) == 1
        assert run.count("coded_erasures_total", worker=str(worker)) == 1
    run.check([False] * (2 * k))


@pytest.mark.asyncio
async def test_coded_a_straggler_waits_for_the_encoded_parity(rig: Rig) -> None:
    k = rig.k
    run = make_run(rig, "coded", k)
    encoders = GatedEncoders(run)
    run.begin()
    await until(lambda: encoders.began, "the encoders began")
    await run.land(range(1, k))  # slot 0 straggles: the group needs a parity
    await settle()
    assert not run.task.done()
    encoders.gate.set()
    await until(lambda: len(run.pool.calls) == rig.n, "the parity calls")
    await run.land([k])
    await run.done()
    run.check(flags(k, k, {0}))


@pytest.mark.asyncio
async def test_coded_failed_encoders_are_erasures_not_a_failed_dispatch(rig: Rig) -> None:
    k, n = rig.k, rig.n
    run = make_run(rig, "coded", k)
    encoders = GatedEncoders(run, RuntimeError("encoder session broke"))
    encoders.gate.set()
    run.begin()
    await until(lambda: encoders.ended, "the encoders failed")
    await run.land(range(k))
    await run.done()
    run.check([False] * k)
    assert len(run.pool.calls) == k  # no parity was computed
    for worker in range(k, n):
        assert run.count("coded_erasures_total", worker=str(worker)) == 1

    run = make_run(rig, "coded", k)  # ... and with a systematic erasure too: undecodable
    encoders = GatedEncoders(run, RuntimeError("encoder session broke"))
    encoders.gate.set()
    run.begin()
    await until(lambda: encoders.ended, "the encoders failed")
    await run.land(range(k), failed={0})
    await run.done()
    for query in run.queries:
        with pytest.raises(ServiceUnavailable, match=f"decoding needs any {k}"):
            query.future.result()


@pytest.mark.asyncio
async def test_coded_cancelled_parities_skip_an_encoding_not_yet_done(rig: Rig) -> None:
    k = rig.k
    run = make_run(rig, "coded", k, options=ModeOptions(cancel_late_after_s=0.0))
    encoders = GatedEncoders(run)
    run.begin()
    await until(lambda: encoders.began, "the encoders began")
    await run.land(range(k))
    await run.done()
    run.check([False] * k)
    await until(lambda: run.count("coded_cancelled_calls_total") == rig.n - k,
                "the unused parity calls cancelled")
    encoders.gate.set()
    await settle()
    assert not encoders.ended and len(run.pool.calls) == k  # the encoding itself was cancelled


# -- late calls nobody reads are cancelled at once, not after the decode-wait cap ---------------
LONG_S = 3600.0  # the cancel delay of calls still read: never reached inside a test


@pytest.mark.asyncio
async def test_coded_unneeded_parities_are_cancelled_at_once(rig: Rig) -> None:
    k, n = rig.k, rig.n
    run = await make_run(rig, "coded", k, options=ModeOptions(cancel_late_after_s=LONG_S)).start()
    await run.land(range(k))  # every systematic result: exact answers, no parity read
    await run.done()
    run.check([False] * k)
    await settle()
    assert all(run.pool.call(w).future.cancelled() for w in range(k, n))
    assert run.count("coded_cancelled_calls_total") == n - k


@pytest.mark.asyncio
async def test_coded_a_missing_systematic_call_is_kept_for_the_decode_wait(wide_rig: Rig) -> None:
    rig = wide_rig  # two parities: one decodes, the other is never read
    k = rig.k
    options = ModeOptions(cancel_late_after_s=LONG_S, systematic_grace_s=0.0)
    run = await make_run(rig, "coded", k, options=options).start()
    await run.land([*range(1, k), k])  # slot 0 missing: decoded from the first parity
    await run.done()
    run.check(flags(k, k, {0}))
    await settle()
    assert run.pool.call(k + 1).future.cancelled()  # the second parity: nobody reads it
    assert not run.pool.call(0).future.done()  # still read: its lateness is learned
    assert run.count("coded_cancelled_calls_total") == 1


@pytest.mark.asyncio
async def test_coded_a_shadowed_groups_parity_is_kept(tiny_rig: Rig) -> None:
    from runtime.metrics import Metrics
    from runtime.shadow import ShadowConfig, ShadowMonitor

    rig = tiny_rig
    monitor = ShadowMonitor(ShadowConfig(fraction=1.0, seed=0), [h.task for h in rig.manifest.heads],
                            Metrics("tiny"), busy=lambda: False)
    options = ModeOptions(cancel_late_after_s=LONG_S, shadow=monitor)
    run = await make_run(rig, "coded", rig.k, options=options).start()
    await run.land(range(rig.k))
    await run.done()
    await settle()
    assert not run.pool.call(rig.k).future.done()  # the shadow decode waits for it
    assert run.count("coded_cancelled_calls_total") == 0


# -- a lone partial group: its padding repeats its last query -----------------------------------
@pytest.mark.asyncio
async def test_coded_a_lone_partial_group_answers_once_its_real_slots_are_in(rig: Rig) -> None:
    k, n = rig.k, rig.n
    for m in range(1, k):
        run = await make_run(rig, "coded", m, options=ModeOptions(cancel_late_after_s=LONG_S)).start()
        # the real slots before the last, then the LAST padded slot: it holds the last query
        await run.land([*range(m - 1), k - 1])
        await run.done()
        run.check([False] * m, f"m={m}")  # exact: nothing decoded, no parity waited for
        await settle()
        idle = [*range(m - 1, k - 1), *range(k, n)]  # the last query's own slot, the parities
        assert all(run.pool.call(w).future.cancelled() for w in idle), f"m={m}"
        assert run.count("coded_cancelled_calls_total") == len(idle), f"m={m}"


@pytest.mark.asyncio
async def test_coded_a_lone_partial_group_decodes_the_queries_its_padding_cannot_cover(
        wide_rig: Rig) -> None:
    rig = wide_rig  # k = 3: queries 0 and 1, slot 2 repeats query 1
    k = rig.k
    run = await make_run(rig, "coded", 2, options=ModeOptions(systematic_grace_s=0.0)).start()
    await run.land([0, 1, 2, k], failed={0, 1})  # the padding and a parity: query 0 decoded
    await run.done()
    run.check([True, False])


@pytest.mark.asyncio
async def test_coded_redispatches_a_lone_querys_slot_once_not_once_per_padded_slot(
        wide_rig: Rig) -> None:
    rig = wide_rig  # k = 3, n = 5, one query: slots 0, 1 and 2 all hold it
    k, n = rig.k, rig.n
    options = ModeOptions(straggler_scale=0.0, straggler_min_s=0.0, redispatch=True)
    run = await make_run(rig, "coded", 1, options=options).start()
    for w in range(k, n):  # only the two parities, on one loop turn: 2 of 3 needed, and
        run.pool.land(w)  # every slot straggles with two workers free to re-send it to
    await until(lambda: len(run.pool.calls) == n + REDISPATCH_ROUNDS, "the re-dispatched calls")
    await settle()
    again = run.pool.calls[n:]
    assert len(again) == REDISPATCH_ROUNDS  # one call per round, not one per padded slot
    for call in again:  # on a parity's worker, which runs f too
        assert call.worker in range(k, n) and call.model == WORKER_F
        np.testing.assert_array_equal(call.batch, run.pool.call(0).batch)
    again[0].future.set_result(worker_result(rig, again[0].model, again[0].batch))
    await run.done()
    run.check([False])


@pytest.mark.asyncio
async def test_coded_redispatch_copies_go_to_distinct_workers_and_the_first_counts(
        wide_rig: Rig) -> None:
    rig = wide_rig  # k = 3, n = 5, one query: slots 0, 1 and 2 all hold it
    k, n = rig.k, rig.n
    options = ModeOptions(straggler_scale=0.0, straggler_min_s=0.0, redispatch=True,
                          redispatch_copies=2, cancel_late_after_s=LONG_S)
    run = await make_run(rig, "coded", 1, options=options).start()
    for w in range(k, n):  # the two parities only: the slot straggles, two workers free
        run.pool.land(w)
    await until(lambda: len(run.pool.calls) == n + 2 * REDISPATCH_ROUNDS,
                "the re-dispatched calls")
    again = run.pool.calls[n:]
    for r in range(REDISPATCH_ROUNDS):  # each round: the slot on both free workers
        assert sorted(c.worker for c in again[2 * r:2 * r + 2]) == [k, k + 1]
    for call in again:
        assert call.model == WORKER_F
        np.testing.assert_array_equal(call.batch, run.pool.call(0).batch)
    again[1].future.set_result(worker_result(rig, again[1].model, again[1].batch))
    await run.done()
    run.check([False])  # the second copy's result, exact
    assert run.count("coded_redispatched_calls_total") == 2 * REDISPATCH_ROUNDS
    await settle()  # nothing reads the slot's other calls: cancelled at once, not after LONG_S
    others = [c for c in run.pool.calls[:k] + again if c is not again[1]]
    assert all(c.future.cancelled() for c in others)


@pytest.mark.asyncio
async def test_coded_learned_wait_takes_one_sample_per_missing_slot_not_per_copy(
        wide_rig: Rig) -> None:
    rig = wide_rig  # k = 3, n = 5, three queries
    options = ModeOptions(straggler_scale=0.0, straggler_min_s=0.0, redispatch=True,
                          decode_wait=DecodeWait(cap_s=120.0))
    run = make_run(rig, "coded", 3, options=options)
    _teach(run, 60.0)  # waits pay: the decodable group will wait for its missing slots
    await run.start()
    await run.land([0])  # slots 1 and 2 straggle: re-sent to worker 0, every round at once
    await until(lambda: len(run.pool.calls) == rig.n + 2 * REDISPATCH_ROUNDS, "the copies")
    copies = run.pool.calls[rig.n:]
    of_slot = {s: [c for c in copies if np.array_equal(c.batch, run.pool.call(s).batch)]
               for s in (1, 2)}
    await run.land([3, 4])  # decodable with slots 1 and 2 missing: it waits for them
    assert not run.task.done()
    for call in of_slot[1][:2]:  # slot 1: a copy, then another, then its original
        call.future.set_result(worker_result(rig, call.model, call.batch))
        await settle()
    run.pool.land(1)
    await settle()
    call = of_slot[2][0]
    call.future.set_result(worker_result(rig, call.model, call.batch))
    await run.done()
    run.check([False, False, False])  # both came during the wait: exact
    assert run.mode.lateness.samples == 32 + 2  # one per missing slot


@pytest.mark.asyncio
async def test_coded_redispatch_resends_every_missing_slot_even_to_one_free_worker(
        tiny_rig: Rig) -> None:
    options = ModeOptions(straggler_scale=0.0, straggler_min_s=0.0, redispatch=True,
                          redispatch_copies=2)
    run = await make_run(tiny_rig, "coded", 2, options=options).start()
    await run.land([2])  # only the parity: both systematic slots straggle, one worker free
    await until(lambda: len(run.pool.calls) >= 5, "the re-dispatched calls")
    first_round = run.pool.calls[3:5]
    assert [c.worker for c in first_round] == [2, 2]  # one copy each: one worker to send to
    for slot_index, call in enumerate(first_round):
        np.testing.assert_array_equal(call.batch, run.pool.call(slot_index).batch)
    for call in first_round:
        call.future.set_result(worker_result(tiny_rig, call.model, call.batch))
    await run.done()
    run.check([False, False])


def test_redispatch_copies_must_be_at_least_one() -> None:
    from runtime.config import ServerConfig
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="--redispatch-copies must be >= 1, got 0"):
        ServerConfig(bundle="b", redispatch_copies=0)


@pytest.mark.asyncio
async def test_coded_twins_landing_after_decodability_are_exact_results_not_a_wait(
        wide_rig: Rig) -> None:
    rig = wide_rig  # k = 3, queries 0 and 1: slots 1 and 2 are twins
    k = rig.k
    options = ModeOptions(systematic_grace_s=LONG_S)  # a wait would outlast the test
    run = await make_run(rig, "coded", 2, options=options).start()
    await run.land([k, 0, 1])  # slot 1's result makes it decodable, and fills slot 2 too
    await run.done()
    run.check([False, False])  # exact: nothing decoded, nothing waited for
    assert run.count("coded_decode_duration_seconds_count") == 0
    assert run.count("coded_decode_waits_total", outcome="decoded") == 0


@pytest.mark.asyncio
async def test_coded_learns_one_lateness_per_set_of_twins(wide_rig: Rig) -> None:
    rig = wide_rig  # k = 3, queries 0 and 1: slots 1 and 2 are twins
    k = rig.k
    options = ModeOptions(decode_wait=DecodeWait(cap_s=120.0), cancel_late_after_s=LONG_S)
    run = make_run(rig, "coded", 2, options=options)
    _teach(run, 60.0)
    await run.start()
    await run.land([0, k, k + 1])  # decodable; the twins 1 and 2 both missing: it waits
    assert not run.task.done()
    await run.land([2])  # one result for both
    await run.done()
    run.check([False, False])
    await settle()
    assert run.pool.call(1).future.cancelled()  # its twin answered for it
    assert run.mode.lateness.samples == 33  # one sample for the pair, not one per call
