"""ApproxIFER: Berrut-coded inputs on n workers running f and every head; the k queries'
logits are interpolated from the first k results (all answers are decoded)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kernels.berrut import BerrutCode
from runtime.batcher import Batch
from runtime.errors import ServiceUnavailable
from runtime.manifest import Manifest
from runtime.models import WORKER_F_HEADS
from runtime.modes.base import Mode, as_groups, slot


class ApproxIFERMode(Mode):
    name = "approxifer"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n = self.manifest.coding.n
        self.code = BerrutCode(n=self.n, k=self.k)

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        return max(manifest.coding.n, 2)

    @classmethod
    def can_answer(cls, manifest: Manifest, up: set[int]) -> bool:
        return len(up) >= min(manifest.coding.k, manifest.coding.n)

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        return [WORKER_F_HEADS]

    async def execute(self, batch: Batch) -> None:
        k, n, m = self.k, self.n, len(batch)
        self.count_partial(m)
        groups = as_groups(batch.x, k)  # [G, k, C, H, W]
        t0 = time.perf_counter()
        coded = np.stack([self.code.encode(g) for g in groups]).astype(np.float32)  # [G, n, C, H, W]
        self.metrics.encode_seconds.observe(time.perf_counter() - t0)
        arrivals = self.launch([(i, WORKER_F_HEADS, slot(coded, i)) for i in range(n)],
                               systematic=range(k), batch=batch)
        results: dict[int, np.ndarray] = {}  # worker -> [G, sum(classes)]
        needed = min(k, n)

        def add(worker: int, result: np.ndarray) -> bool:
            results[worker] = result
            return len(results) >= needed

        if not await arrivals.until(add):
            batch.fail(ServiceUnavailable(
                f"ApproxIFER waits for {needed} of {n} results, got workers {sorted(results)}; "
                "retry shortly"))
            return
        arrivals.finish(keep=())  # nothing reads a late result here
        indices = sorted(results)
        t0 = time.perf_counter()
        decoded = self.code.decode(indices, np.stack([results[i] for i in indices]))  # [k, G, L]
        self.metrics.decode_seconds.observe(time.perf_counter() - t0)
        per_head = self.split_heads(decoded.astype(np.float32))  # task -> [k, G, cls]
        logits = {t: v.swapaxes(0, 1).reshape(-1, v.shape[2])[:m]  # query q = (q // k, q % k)
                  for t, v in per_head.items()}
        self.answer(batch, logits, np.ones(m, np.bool_))
