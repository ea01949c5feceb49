"""The baselines without coding: uncoded (k workers) and replication (each query on two)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from runtime.batcher import Query, QueryAnswer
from runtime.errors import ServiceUnavailable
from runtime.manifest import Manifest
from runtime.models import WORKER_F
from runtime.modes.base import Arrivals, Mode, fail


class UncodedMode(Mode):
    """k workers, no redundancy: each query waits for its own worker."""

    name = "uncoded"
    replicas = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offset = 0  # rotate slots so partial groups do not all land on worker 0

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        return manifest.coding.k * cls.replicas

    @classmethod
    def can_answer(cls, manifest: Manifest, up: set[int]) -> bool:
        k = manifest.coding.k  # every slot needs one live copy
        return all(any(s + r * k in up for r in range(cls.replicas)) for s in range(k))

    async def execute(self, queries: list[Query]) -> None:
        k = self.k
        offset, self._offset = self._offset, (self._offset + len(queries)) % k
        by_slot: dict[int, list[Query]] = {}
        for q, query in enumerate(queries):  # each worker gets its queries as one batch
            by_slot.setdefault((offset + q) % k, []).append(query)
        # one group tag for the dispatch: its systematic workers are the ones it uses
        group = self.pool.new_group(sorted(by_slot))
        await asyncio.gather(*(self._one(batch, s, group) for s, batch in by_slot.items()))

    async def _one(self, queries: list[Query], slot: int, group: Any) -> None:
        xs = np.stack([q.x for q in queries])  # [b, C, H, W]
        replicas = [slot + r * self.k for r in range(self.replicas)]
        arrivals = Arrivals({self.pool.submit(w, WORKER_F, xs, group): w for w in replicas},
                            self.metrics)
        results: list[np.ndarray] = []

        def first(worker: int, zs: np.ndarray) -> bool:  # any one copy answers the queries
            results.append(zs)
            return True

        if not await arrivals.until(first):
            fail(queries, ServiceUnavailable(
                f"worker(s) {replicas} failed and --mode {self.name} has no other copy of "
                "these queries; retry shortly"))
            return
        arrivals.finish()
        logits = await self.frontend.classify(results[0])
        self.answer_all(queries, (QueryAnswer({t: v[q] for t, v in logits.items()}, False)
                                  for q in range(len(queries))))


class ReplicationMode(UncodedMode):
    """2k workers: each query runs on two, the first answer wins."""

    name = "replication"
    replicas = 2
