"""Serving modes: how one group of up to k queries becomes answers.

Every mode sets each query's future exactly once (`_answer` / `_fail` ignore futures that
are already done, e.g. because the request timed out). Worker calls go through
`WorkerPool.call`; a call that raises is an erasure.

One call to `execute` carries G >= 1 coding groups (the batcher adds complete queued
groups under load); query q is slot q % k of group q // k, and worker i runs slot i of
all G groups as one [G, ...] batch.

Partial groups (fewer than k queries at the batcher's deadline): coded, ParM and
ApproxIFER pad the group to k with repeats of its last query, so every worker and the
encoders see in-distribution inputs (zeros would be far from the training data for the
learned encoders); padded slots' answers are never computed by the heads or returned.
Uncoded and replication send only the real queries.

Model names a worker can be asked to run (see `worker_models`):
  "f"         x [G, C, H, W]    -> z [G, *embedding_shape]
  "enc_f/<r>" x [G, k, C, H, W] -> z of encoder r's output (paper Remark 3)
  "parm"      x [G, k, C, H, W] -> logits_sum [G, classes of the primary head]
  "f_heads"   x [G, C, H, W]    -> every head's logits side by side [G, sum(classes)]
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np

from kernels.berrut import BerrutCode
from kernels.coding import CodingScheme, OnlineDecoder
from runtime.batcher import Query, QueryAnswer
from runtime.engines import ModelRunner
from runtime.errors import ConfigError, ServiceUnavailable
from runtime.gpu_decode import to_host
from runtime.manifest import Manifest
from runtime.metrics import Metrics
from runtime.worker import WorkerPool

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Frontend:
    """Models the frontend runs itself: encoders and heads.

    They run on the shared thread pool, unless warm-up measured them cheaper than
    `inline_below_s`: then they run on the event loop, because a thread hop (wake a thread,
    hand back the GIL) costs more than a ~0.1 ms head on a busy 2-core machine."""

    def __init__(
        self,
        heads: Mapping[str, ModelRunner],
        encoders: Mapping[int, ModelRunner],
        executor: Executor,
    ) -> None:
        self.heads = dict(heads)  # task -> runner, primary head first
        self.encoders = dict(encoders)  # parity row -> runner
        self._executor = executor
        self.inline = False

    def warm_up(self, group: np.ndarray, zs: np.ndarray, inline_below_s: float) -> float:
        """Run every model a few times (blocking); returns the median frontend time per group.

        group [1, k, C, H, W] and zs [k, *embedding_shape] are zero dummies."""
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for encoder in self.encoders.values():
                encoder.run(group)
            for head in self.heads.values():
                head.run(zs)
            times.append(time.perf_counter() - t0)
        median_s = sorted(times)[len(times) // 2]
        self.inline = median_s < inline_below_s
        return median_s

    async def _call(self, fn: Callable[[], T]) -> T:
        if self.inline:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def encode(self, groups: np.ndarray) -> list[np.ndarray]:
        """groups [G, k, C, H, W] -> one parity input [G, C, H, W] per encoder row."""
        return await self._call(lambda: [self.encoders[r].run(groups) for r in sorted(self.encoders)])

    async def classify(self, zs: np.ndarray) -> dict[str, np.ndarray]:
        """zs [m, *embedding_shape] -> task -> logits [m, classes]."""
        return await self._call(lambda: {task: head.run(zs) for task, head in self.heads.items()})


def _answer(query: Query, answer: QueryAnswer) -> bool:
    if query.future.done():
        return False
    query.future.set_result(answer)
    return True


def _fail(queries: Iterable[Query], error: BaseException) -> None:
    for query in queries:
        if not query.future.done():
            query.future.set_exception(error)


def _pad(xs: np.ndarray, k: int) -> np.ndarray:
    """[m, C, H, W] -> [ceil(m / k) * k, C, H, W], repeating the last query (the
    partial-group rule)."""
    total = -(-len(xs) // k) * k
    if len(xs) == total:
        return xs
    return np.concatenate([xs, np.repeat(xs[-1:], total - len(xs), axis=0)])


def _groups(queries: list[Query], k: int) -> np.ndarray:
    """The queries as coding groups [G, k, C, H, W] (query q is group q // k, slot q % k)."""
    xs = _pad(np.stack([q.x for q in queries]), k)  # [G*k, C, H, W]
    return xs.reshape(len(xs) // k, k, *xs.shape[1:])


def _slot(groups: np.ndarray, i: int) -> np.ndarray:
    """Slot i of every group, contiguous for the engine: [G, C, H, W]."""
    return np.ascontiguousarray(groups[:, i])


class Mode:
    name = "base"

    def __init__(self, manifest: Manifest, pool: WorkerPool, frontend: Frontend,
                 metrics: Metrics, *, encoders_on_workers: bool = False,
                 systematic_grace_s: float = 0.0) -> None:
        self.manifest = manifest
        self.systematic_grace_s = systematic_grace_s
        self.pool = pool
        self.frontend = frontend
        self.metrics = metrics
        self.k = manifest.coding.k
        self.encoders_on_workers = encoders_on_workers
        self.tasks = [h.task for h in manifest.heads]

    # What the server needs to know before the pool exists -----------------------------------
    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        raise NotImplementedError

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        return ["f"]

    @classmethod
    def frontend_encoders(cls, manifest: Manifest, encoders_on_workers: bool) -> bool:
        return False

    @property
    def group_size(self) -> int:
        return self.k

    async def execute(self, queries: list[Query]) -> None:
        """Answer 1..max_groups_per_call*k queries: groups of k, the last possibly partial."""
        raise NotImplementedError

    # Shared helpers -------------------------------------------------------------------------
    def _count_partial(self, m: int) -> None:
        padded = -m % self.k
        if padded:
            self.metrics.partial_groups.labels(**self.metrics.labels).inc()
            self.metrics.padded_queries.labels(**self.metrics.labels).inc(padded)

    def _drop_late(self, tasks: Mapping[asyncio.Task[np.ndarray], int],
                   pending: Iterable[asyncio.Task[np.ndarray]]) -> None:
        """Results still in flight when a group is answered are dropped and counted."""
        for task in pending:
            worker = tasks[task]

            def late(t: asyncio.Task[np.ndarray], worker: int = worker) -> None:
                if not t.cancelled() and t.exception() is None:
                    self.metrics.late_dropped.labels(worker=str(worker)).inc()

            task.add_done_callback(late)

    def _erasures(self, workers: Iterable[int]) -> None:
        for worker in workers:
            self.metrics.erasures.labels(worker=str(worker)).inc()

    def _launch(self, calls: list[tuple[int, str, np.ndarray]], straggler: int | None
                ) -> dict[asyncio.Task[np.ndarray], int]:
        return {self.pool.submit(i, model, batch, straggler=straggler): i
                for i, model, batch in calls}


class CodedMode(Mode):
    """Coded-InvNet: k systematic workers + n-k backup workers fed by learned encoders."""

    name = "coded"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.scheme = CodingScheme.from_dict(self.manifest.coding.to_dict())
        self.n = self.scheme.n
        # shape -> decoder; runtime.gpu_decode swaps in the CUDA decoder on device results
        self.new_decoder: Callable[[tuple[int, ...]], Any] = (
            lambda shape: OnlineDecoder(self.scheme, shape))

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
            return [f"enc_f/{index - manifest.coding.k}"]
        return ["f"]

    @classmethod
    def frontend_encoders(cls, manifest: Manifest, encoders_on_workers: bool) -> bool:
        return not encoders_on_workers

    async def execute(self, queries: list[Query]) -> None:
        k, n, m = self.k, self.n, len(queries)
        self._count_partial(m)
        groups = _groups(queries, k)  # [G, k, C, H, W]
        calls = [(i, "f", _slot(groups, i)) for i in range(k)]
        if self.encoders_on_workers:
            calls += [(k + r, f"enc_f/{r}", groups) for r in range(n - k)]
        else:
            t0 = time.perf_counter()
            parities = await self.frontend.encode(groups)  # n-k x [G, C, H, W]
            self.metrics.encode_seconds.observe(time.perf_counter() - t0)
            calls += [(k + r, "f", parities[r]) for r in range(n - k)]
        tasks = self._launch(calls, self.pool.plan_stragglers(k))

        # One decoder for all G groups: a worker's batch lands at once, so they share the
        # erasure pattern and decode as one (G, *embedding_shape) result per worker.
        decoder = self.new_decoder((len(groups), *self.manifest.embedding_shape))
        pending: set[asyncio.Task[np.ndarray]] = set(tasks)
        ready = False
        while pending and not ready:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # fold each result in as it lands; systematic first, so that a systematic result
            # landing together with a parity is used as is, not decoded
            for task in sorted(done, key=tasks.__getitem__):
                if task.exception() is None and decoder.add(tasks[task], task.result()):
                    ready = True
        if not ready:
            _fail(queries, ServiceUnavailable(
                f"only {len(decoder.received)} of {n} workers answered (workers "
                f"{sorted(decoder.received)}); decoding needs any {k}. Retry shortly: failed "
                "workers are being restarted"))
            return
        systematic = await self._grace(tasks, pending, decoder.missing)
        if systematic is not None:  # every missing systematic result came within the grace
            zs, missing = np.stack([to_host(z) for z in systematic]), set()  # [k, G, *emb]
            self._drop_late(tasks, {t for t in pending if not t.done()})
        else:
            self._drop_late(tasks, pending)
            self._erasures(i for i in range(n) if i not in decoder.received)
            t0 = time.perf_counter()
            zs = decoder.finalize()  # [k, G, *embedding_shape]
            self.metrics.decode_seconds.observe(time.perf_counter() - t0)
            missing = set(decoder.missing)
        zs = zs.swapaxes(0, 1).reshape(-1, *zs.shape[2:])[:m]  # [m, *embedding_shape]
        logits = await self.frontend.classify(zs)  # padded slots are never classified
        for q, query in enumerate(queries):
            reconstructed = q % k in missing
            if _answer(query, QueryAnswer({t: v[q] for t, v in logits.items()}, reconstructed)):
                if reconstructed:
                    self.metrics.reconstructed.labels(**self.metrics.labels).inc()

    async def _grace(self, tasks: Mapping[asyncio.Task[np.ndarray], int],
                     pending: set[asyncio.Task[np.ndarray]], missing: tuple[int, ...]
                     ) -> list[np.ndarray] | None:
        """With --systematic-grace-ms > 0, wait that long for missing systematic results
        (exact answers) before decoding; returns all k systematic results, or None."""
        waiting = {t for t in pending if tasks[t] in missing}
        if not missing or self.systematic_grace_s <= 0 or len(waiting) != len(missing):
            return None
        done, _ = await asyncio.wait(waiting, timeout=self.systematic_grace_s)
        if len(done) != len(waiting) or any(t.exception() is not None for t in done):
            return None
        by_worker = {tasks[t]: t.result() for t in tasks if t.done() and not t.cancelled()
                     and t.exception() is None}
        return [by_worker[i] for i in range(self.k)]


class UncodedMode(Mode):
    """k workers, no redundancy: each query waits for its own worker."""

    name = "uncoded"
    replicas = 1

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._offset = 0  # rotate slots so partial groups do not all land on worker 0

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        return manifest.coding.k * cls.replicas

    async def execute(self, queries: list[Query]) -> None:
        k = self.k
        offset, self._offset = self._offset, (self._offset + len(queries)) % k
        by_slot: dict[int, list[Query]] = {}
        for q, query in enumerate(queries):  # each worker gets its queries as one batch
            by_slot.setdefault((offset + q) % k, []).append(query)
        # the paper's straggler hits one of the workers this dispatch actually uses
        slot = self.pool.plan_stragglers(min(len(queries), k))
        straggler = None if slot is None else (offset + slot) % k
        await asyncio.gather(*(self._one(batch, s, straggler) for s, batch in by_slot.items()))

    async def _one(self, queries: list[Query], slot: int, straggler: int | None) -> None:
        xs = np.stack([q.x for q in queries])  # [b, C, H, W]
        replicas = [slot + r * self.k for r in range(self.replicas)]
        tasks = self._launch([(w, "f", xs) for w in replicas], straggler)
        pending: set[asyncio.Task[np.ndarray]] = set(tasks)
        zs: np.ndarray | None = None
        while pending and zs is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            zs = next((t.result() for t in done if t.exception() is None), None)
        if zs is None:
            _fail(queries, ServiceUnavailable(
                f"worker(s) {replicas} failed and --mode {self.name} has no other copy of "
                "these queries; retry shortly"))
            return
        self._drop_late(tasks, pending)
        self._erasures(tasks[t] for t in pending)
        logits = await self.frontend.classify(zs)
        for q, query in enumerate(queries):
            _answer(query, QueryAnswer({t: v[q] for t, v in logits.items()}, reconstructed=False))


class ReplicationMode(UncodedMode):
    """2k workers: each query runs on two, the first answer wins."""

    name = "replication"
    replicas = 2


class ParMMode(Mode):
    """ParM: k primaries run f (+ heads at the frontend); one parity worker runs parm.onnx.

    A missing query's PRIMARY head logits = parity - sum of the other k-1 primary logits;
    its other heads cannot be decoded and are reported as unavailable (NaN logits)."""

    name = "parm"

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        if manifest.parm is None:
            raise ConfigError("--mode parm needs a parity model; this bundle has none "
                              "(manifest \"parm\": null)")
        return manifest.coding.k + 1

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        return ["parm"] if index == manifest.coding.k else ["f"]

    async def execute(self, queries: list[Query]) -> None:
        k, m = self.k, len(queries)
        self._count_partial(m)
        groups = _groups(queries, k)  # [G, k, C, H, W]
        calls = [(i, "f", _slot(groups, i)) for i in range(k)] + [(k, "parm", groups)]
        tasks = self._launch(calls, self.pool.plan_stragglers(k))
        pending: set[asyncio.Task[np.ndarray]] = set(tasks)
        results: dict[int, np.ndarray] = {}  # primary: [G, *emb]; parity: [G, classes]

        def decodable() -> bool:
            primaries = sum(1 for i in results if i < k)
            return primaries == k or (primaries == k - 1 and k in results)

        while pending and not decodable():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    results[tasks[task]] = task.result()
        if not decodable():
            _fail(queries, ServiceUnavailable(
                f"ParM needs k={k} of the {k + 1} results, got workers {sorted(results)}; "
                "retry shortly"))
            return
        self._drop_late(tasks, pending)
        received = sorted(i for i in results if i < k)
        self._erasures(i for i in range(k + 1) if i not in results)
        zs = np.concatenate([results[i] for i in received])  # [r*G, *emb], worker-major
        flat = await self.frontend.classify(zs)
        G = len(groups)
        logits = {t: v.reshape(len(received), G, -1) for t, v in flat.items()}  # [r, G, cls]
        row = {i: j for j, i in enumerate(received)}
        primary = self.tasks[0]
        missing = next((i for i in range(k) if i not in row), None)
        for q, query in enumerate(queries):
            g, j = divmod(q, k)
            if j != missing:
                _answer(query, QueryAnswer({t: v[row[j], g] for t, v in logits.items()}, False))
                continue
            t0 = time.perf_counter()
            decoded = results[k][g] - logits[primary][:, g].sum(axis=0)  # [classes]
            self.metrics.decode_seconds.observe(time.perf_counter() - t0)
            answer = {t: np.full(v.shape[2], np.nan, np.float32) for t, v in logits.items()}
            answer[primary] = decoded.astype(np.float32)
            if _answer(query, QueryAnswer(answer, True, tuple(self.tasks[1:]))):
                self.metrics.reconstructed.labels(**self.metrics.labels).inc()


class ApproxIFERMode(Mode):
    """ApproxIFER: Berrut-coded inputs on n workers running f and every head; the k
    queries' logits are interpolated from the first k results (all answers are decoded)."""

    name = "approxifer"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.n = self.manifest.coding.n
        self.code = BerrutCode(n=self.n, k=self.k)
        self.splits = np.cumsum([len(h.classes) for h in self.manifest.heads])[:-1]

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        return max(manifest.coding.n, 2)

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        return ["f_heads"]

    async def execute(self, queries: list[Query]) -> None:
        k, n, m = self.k, self.n, len(queries)
        self._count_partial(m)
        groups = _groups(queries, k)  # [G, k, C, H, W]
        t0 = time.perf_counter()
        coded = np.stack([self.code.encode(g) for g in groups]).astype(np.float32)  # [G, n, C, H, W]
        self.metrics.encode_seconds.observe(time.perf_counter() - t0)
        tasks = self._launch([(i, "f_heads", _slot(coded, i)) for i in range(n)],
                             self.pool.plan_stragglers(k))
        pending: set[asyncio.Task[np.ndarray]] = set(tasks)
        results: dict[int, np.ndarray] = {}  # worker -> [G, sum(classes)]
        needed = min(k, n)
        while pending and len(results) < needed:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    results[tasks[task]] = task.result()
        if len(results) < needed:
            _fail(queries, ServiceUnavailable(
                f"ApproxIFER waits for {needed} of {n} results, got workers {sorted(results)}; "
                "retry shortly"))
            return
        self._drop_late(tasks, pending)
        self._erasures(i for i in range(n) if i not in results)
        indices = sorted(results)
        t0 = time.perf_counter()
        decoded = self.code.decode(indices, np.stack([results[i] for i in indices]))  # [k, G, L]
        self.metrics.decode_seconds.observe(time.perf_counter() - t0)
        per_head = np.split(decoded.astype(np.float32), self.splits, axis=2)  # [k, G, cls]
        for q, query in enumerate(queries):
            g, j = divmod(q, k)
            answer = {t: v[j, g] for t, v in zip(self.tasks, per_head, strict=True)}
            if _answer(query, QueryAnswer(answer, True)):
                self.metrics.reconstructed.labels(**self.metrics.labels).inc()


MODES: dict[str, type[Mode]] = {
    "coded": CodedMode,
    "uncoded": UncodedMode,
    "replication": ReplicationMode,
    "parm": ParMMode,
    "approxifer": ApproxIFERMode,
}
