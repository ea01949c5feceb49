"""Coded-InvNet: k systematic workers + n-k backup workers fed by learned encoders."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from kernels.coding import CodingScheme
from runtime.batcher import Batch
from runtime.deadlines import NEVER, Lateness
from runtime.decoders import Decoder, HostDecoders
from runtime.errors import ConfigError, ServiceUnavailable
from runtime.gpu_decode import to_host
from runtime.manifest import Manifest
from runtime.models import WORKER_F, encoder_then_f
from runtime.modes.base import Arrivals, Mode, as_groups, padding_twins, slot
from runtime.shadow import ShadowMonitor, ShadowOutcome, rebuild_slot

REDISPATCH_ROUNDS = 3  # re-sent calls may straggle too; each round costs only then

logger = logging.getLogger(__name__)


class CodedMode(Mode):
    name = "coded"
    shadows = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheme = CodingScheme.from_dict(self.manifest.coding.to_dict())
        self.n = self.scheme.n
        # runtime.gpu_decode provides persistent CUDA decoders for device results
        self.decoders = self.options.decoders or HostDecoders(self.scheme)
        policy = self.options.decode_wait
        self.lateness = None if policy is None else Lateness(policy)

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        if len(manifest.encoders) != manifest.coding.n - manifest.coding.k:
            raise ConfigError(
                f"--mode coded needs {manifest.coding.n - manifest.coding.k} encoder(s) in the "
                f"bundle, it has {len(manifest.encoders)}; use --mode uncoded or re-export")
        return manifest.coding.n

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        if encoders_on_workers and index >= manifest.coding.k:
            return [encoder_then_f(index - manifest.coding.k)]
        return [WORKER_F]

    @classmethod
    def frontend_encoders(cls, manifest: Manifest, encoders_on_workers: bool) -> bool:
        return not encoders_on_workers

    @classmethod
    def can_answer(cls, manifest: Manifest, up: set[int]) -> bool:
        return len(up) >= manifest.coding.k  # any k of n decode

    async def execute(self, batch: Batch) -> None:
        k, n, m = self.k, self.n, len(batch)
        self.count_partial(m)
        groups = as_groups(batch.x, k)  # [G, k, C, H, W]
        calls = [(i, WORKER_F, slot(groups, i)) for i in range(k)]
        if self.options.encoders_on_workers:
            calls += [(k + r, encoder_then_f(r), groups) for r in range(n - k)]
        arrivals = self.launch(calls, systematic=range(k), batch=batch,
                               later=0 if self.options.encoders_on_workers else n - k,
                               twins=padding_twins(m, k))
        if not self.options.encoders_on_workers:
            self._launch_parities(arrivals, groups)

        # One decoder for all G groups: a worker's batch lands at once, so they share the
        # erasure pattern and decode as one (G, *embedding_shape) result per worker.
        shape = (len(groups), *self.manifest.embedding_shape)
        decoders = self.decoders
        decoder = decoders.acquire(shape)
        try:
            redispatch = ((lambda round_: self._redispatch(arrivals, calls, round_))
                          if self.options.redispatch else None)
            if not await arrivals.until(decoder.add, redispatch, REDISPATCH_ROUNDS):
                batch.fail(ServiceUnavailable(
                    f"only {len(decoder.received)} of {n} workers answered (workers "
                    f"{sorted(decoder.received)}); decoding needs any {k}. Retry shortly: failed "
                    "workers are being restarted"))
                return
            if set(decoder.missing) & arrivals.received:
                # twins landed with the result that made the group decodable, after it: the
                # decoder ignored them, but they are exact results, not slots to decode
                decoder = self._refold(arrivals, shape, decoder)
            waited = await self._wait_for_systematic(arrivals, set(decoder.missing))
            if waited:  # use what came in time, decode the rest
                decoder = self._refold(arrivals, shape, decoder)
            missing = set(decoder.missing)
            shadow = self.options.shadow
            shadowing = not missing and shadow is not None and shadow.wants()
            # a group the wait made whole lost nothing: its parities were never needed. Late
            # systematic results still teach the decode wait; a parity is read only to shadow
            arrivals.finish(count_erasures=not (waited and not missing),
                            keep=range(n) if shadowing else range(k))
            # every systematic result in: the decoder holds exact copies, nothing is solved
            t0 = time.perf_counter()
            zs = await decoders.finalize(decoder)  # [k, G, *embedding_shape], host
            if missing:
                self.metrics.decode_seconds.observe(time.perf_counter() - t0)
            # the decoder's answer is only valid until release: keep a copy to shadow it
            exact = np.array(zs) if shadowing else None
            zs = zs.swapaxes(0, 1).reshape(-1, *zs.shape[2:])[:m]  # [m, *emb] (may be a view)
            logits = await self.frontend.classify(zs)  # padded slots are never classified
        finally:
            decoders.release(decoder)
        reconstructed = np.isin(np.arange(m) % k, sorted(missing))  # [m]
        self.answer(batch, logits, reconstructed)
        if exact is not None and shadow is not None:
            try:  # after the answer; a monitor bug must not fail the dispatch
                self._shadow(shadow, arrivals, exact, logits, m)
            except Exception:  # noqa: BLE001
                logger.exception("queuing a shadow decode failed")

    def _launch_parities(self, arrivals: Arrivals, groups: np.ndarray) -> None:
        """The backup calls of a frontend-encoded group, as calls of `arrivals` that first
        wait for the encoders: the systematic calls are already out, so exact answers never
        wait for the encoders, and a group whose systematic results all land answers
        without them. An encoder that fails makes its parity slots erasures (logged), not
        the dispatch a failure; once every parity call is cancelled (--cancel-late-calls)
        an encoding not yet started is skipped."""
        k, n = self.k, self.n
        encoded = asyncio.ensure_future(self._encode(groups))  # n-k x [G, C, H, W]
        encoded.add_done_callback(_log_encoder_failure)

        async def parity(r: int) -> np.ndarray:
            parities = await asyncio.shield(encoded)  # one encoding feeds every parity
            return await self.pool.submit(k + r, WORKER_F, parities[r], arrivals.group)

        calls = [asyncio.ensure_future(parity(r)) for r in range(n - k)]

        def cancelled(_: asyncio.Future[Any]) -> None:
            if all(c.cancelled() for c in calls):
                encoded.cancel()  # a no-op once it has ended

        for r, call in enumerate(calls):
            call.add_done_callback(cancelled)
            arrivals.add(call, k + r)

    async def _encode(self, groups: np.ndarray) -> list[np.ndarray]:
        t0 = time.perf_counter()
        parities = await self.frontend.encode(groups)
        self.metrics.encode_seconds.observe(time.perf_counter() - t0)
        return parities

    def _shadow(self, shadow: ShadowMonitor, arrivals: Arrivals, exact: np.ndarray,
                logits: dict[str, np.ndarray], m: int) -> None:
        """Queue a job that rebuilds one systematic slot of these exact answers from the
        others and a parity, and compares (runtime/shadow.py)."""
        k = self.k
        s = shadow.pick(k)
        groups = np.arange(exact.shape[1])
        real = groups[groups * k + s < m]  # groups whose slot s is a query, not padding
        if not len(real):
            return
        queries = real * k + s
        exact_classes = {t: v[queries].argmax(axis=1) for t, v in logits.items()}
        true_z = exact[s][real]

        def submit(worker: int, parity: Any) -> None:
            async def job() -> ShadowOutcome:
                rebuilt = rebuild_slot(self.scheme, exact, s, worker, to_host(parity))[real]
                out = await self.frontend.classify(rebuilt)
                axes = tuple(range(1, rebuilt.ndim))
                errors = (np.sqrt(((rebuilt - true_z) ** 2).sum(axis=axes))
                          / np.maximum(np.sqrt((true_z ** 2).sum(axis=axes)), 1e-12))
                return ShadowOutcome({t: out[t].argmax(axis=1) == exact_classes[t] for t in out},
                                     errors)

            shadow.submit(job)

        self.shadow_parity(arrivals, k, submit)

    async def _wait_for_systematic(self, arrivals: Arrivals, missing: set[int]) -> bool:
        """A decodable group with systematic results missing waits for them (exact answers):
        as long as such waits have recently paid (runtime.deadlines, --decode-wait-*), or
        --systematic-grace-ms; True when any came in time."""
        waiting = {arrivals.tasks[t] for t in arrivals.pending} & missing
        if not waiting:
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.lateness is not None:
            # measured on perf_counter: the loop clock counts whole milliseconds, the wait's
            # cap is 5 and most latenesses are under one
            decodable_s = time.perf_counter()
            lateness = self.lateness

            # One sample per missing result, however many calls may bring it (twins, a slot's
            # re-sent copies): from the first to land, or NEVER once every one has failed.
            # A cancelled call (--cancel-late-calls) was still missing past the longest
            # wait: its lateness is at least the time it was cancelled at.
            carriers: dict[Any, list[asyncio.Task[Any]]] = {}
            for task in arrivals.pending:
                slot_index = arrivals.tasks[task]
                if slot_index in waiting:
                    key = "twins" if slot_index in arrivals.twins else slot_index
                    carriers.setdefault(key, []).append(task)
            for tasks in carriers.values():
                left = [len(tasks)]

                def observe(task: asyncio.Task[Any], left: list[int] = left) -> None:
                    left[0] -= 1  # during the wait or long after it
                    failed = not task.cancelled() and task.exception() is not None
                    if left[0] >= 0 and (not failed or left[0] == 0):
                        left[0] = -1  # observed
                        lateness.observe(NEVER if failed
                                         else time.perf_counter() - decodable_s)

                for task in tasks:
                    task.add_done_callback(observe)
            wait_s = lateness.wait_s()
        else:
            wait_s = self.options.systematic_grace_s
        if wait_s <= 0:
            return False
        arrived = await arrivals.wait_for(waiting, now + wait_s)
        self.metrics.decode_waits.labels(outcome="exact" if arrived >= waiting
                                         else "decoded").inc()
        return bool(arrived)

    def _redispatch(self, arrivals: Arrivals, calls: list[tuple[int, str, np.ndarray]],
                    round_: int) -> bool:
        """The group is undecodable when its missing calls became stragglers (more of them
        than parities): re-send each missing systematic slot to `redispatch_copies` workers
        that have already answered this group (a second line of defence, paid only when
        needed; its first result counts). Two copies because a re-sent call straggles as
        often as any: with independent delays of probability p a slot stays missing with p
        per round on one copy, p**2 on two, and p = 0.1 put 0.8 % of dispatches, a p99.9's
        worth, into a second round. A later round starts on other workers. True when
        anything was sent."""
        free = [w for w in sorted(arrivals.received - arrivals.filled)
                if w < self.k or not self.options.encoders_on_workers]  # workers that run f
        missing = arrivals.missing(range(self.k))
        if not free or not missing:
            return False
        copies = min(self.options.redispatch_copies, len(free))
        start = round_ * copies % len(free)  # a later round starts past this one's workers
        free = free[start:] + free[:start]
        group = self.pool.new_group(())  # no systematic: fault injection's straggler is per group
        # copy j of the i-th missing slot on free[i + j]: a slot's copies on distinct workers
        pairs = [(s, free[(i + j) % len(free)])
                 for i, s in enumerate(missing) for j in range(copies)]
        for slot_index, worker in pairs:
            task = self.pool.submit(worker, WORKER_F, calls[slot_index][2], group)
            arrivals.add(task, slot_index)
            self.metrics.redispatched.inc()
        return True

    def _refold(self, arrivals: Arrivals, shape: tuple[int, ...], old: Decoder) -> Decoder:
        """A decoder fed every received result, systematic ones first, so that the fewest
        slots are decoded, in place of `old` (released once it is; the caller releases the
        new one, or still `old` if this raises)."""
        decoder = self.decoders.acquire(shape)
        try:
            for worker, result in sorted(arrivals.results().items()):
                if decoder.add(worker, result):
                    break
        except BaseException:
            self.decoders.release(decoder)
            raise
        self.decoders.release(old)
        return decoder


def _log_encoder_failure(encoded: asyncio.Future[Any]) -> None:
    if not encoded.cancelled() and encoded.exception() is not None:
        logger.error("the encoders failed; this dispatch's parity slots are erasures",
                     exc_info=encoded.exception())
