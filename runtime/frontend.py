"""The models the frontend runs itself: the encoders (before dispatch) and the heads (after).

They run on the shared thread pool, unless warm-up measured them cheaper than
`inline_below_s`: then they run on the event loop, because a thread hop (wake a thread,
hand back the GIL) costs more than a ~0.1 ms head on a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import TypeVar

import numpy as np

from runtime.engines import ModelRunner

T = TypeVar("T")


class Frontend:
    def __init__(self, heads: Mapping[str, ModelRunner], encoders: Mapping[int, ModelRunner],
                 executor: Executor) -> None:
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
