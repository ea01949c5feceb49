"""The baselines without coding: uncoded (k workers) and replication (each query on two)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from runtime.batcher import Batch
from runtime.errors import ServiceUnavailable
from runtime.manifest import Manifest
from runtime.models import WORKER_F_HEADS
from runtime.modes.base import Arrivals, Mode, StragglerWatch


class UncodedMode(Mode):
    """k workers, no redundancy: each query waits for its own worker. A worker runs f and
    the heads in one call (nothing here needs the embedding), so the heads run on its
    compute thread, warm from f, not on the event loop."""

    name = "uncoded"
    replicas = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offset = 0  # rotate slots so partial groups do not all land on worker 0

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        return manifest.coding.k * cls.replicas

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        return [WORKER_F_HEADS]

    @classmethod
    def can_answer(cls, manifest: Manifest, up: set[int]) -> bool:
        k = manifest.coding.k  # every slot needs one live copy
        return all(any(s + r * k in up for r in range(cls.replicas)) for s in range(k))

    async def execute(self, batch: Batch) -> None:
        k, m = self.k, len(batch)
        offset, self._offset = self._offset, (self._offset + m) % k
        # each worker gets its queries as one batch: rows q with (offset + q) % k == slot
        slots = [(s, np.arange((s - offset) % k, m, k)) for s in range(k)]
        slots = [(s, rows) for s, rows in slots if len(rows)]
        # one group tag for the dispatch: its systematic workers are the ones it uses
        group = self.pool.new_group(sorted(s for s, _ in slots))
        watch = self.watch(batch, len(slots) * self.replicas)  # one clock for all its slots
        await asyncio.gather(*(self._one(batch, rows, s, group, watch) for s, rows in slots))

    async def _one(self, batch: Batch, rows: np.ndarray, slot: int, group: Any,
                   watch: StragglerWatch) -> None:
        xs = batch.x[rows]  # [b, C, H, W]
        replicas = [slot + r * self.k for r in range(self.replicas)]
        arrivals = Arrivals({self.pool.submit(w, WORKER_F_HEADS, xs, group): w for w in replicas},
                            self.metrics, watch, self.options.cancel_late_after_s)
        results: list[np.ndarray] = []

        def first(worker: int, zs: np.ndarray) -> bool:  # any one copy answers the queries
            results.append(zs)
            return True

        if not await arrivals.until(first):
            batch.fail(ServiceUnavailable(
                f"worker(s) {replicas} failed and --mode {self.name} has no other copy of "
                "these queries; retry shortly"), rows)
            return
        arrivals.finish(keep=())  # nothing reads a late result here
        self.answer(batch, self.split_heads(results[0]), np.zeros(len(rows), np.bool_), rows=rows)


class ReplicationMode(UncodedMode):
    """2k workers: each query runs on two, the first answer wins."""

    name = "replication"
    replicas = 2
