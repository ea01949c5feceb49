"""The models the frontend runs itself: the encoders (beside the systematic calls) and the heads (after).

A call runs on the event loop when warm-up predicts it cheaper than `inline_below_s` (a
thread hop, waking a thread and handing back the GIL, costs more than a ~0.1 ms head on a
busy 2-core machine), else on the shared thread pool. The prediction scales with the call's
size: one group inline, eight groups (8x the work, which would stall every other request
on the loop) on a thread.
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
                 executor: Executor, inline_below_s: float = 0.0) -> None:
        self.heads = dict(heads)  # task -> runner, primary head first
        self.encoders = dict(encoders)  # parity row -> runner
        self._executor = executor
        self._inline_below_s = inline_below_s
        self._k = 1
        self._encode_s = 0.0  # measured by warm_up: per group of k queries
        self._classify_s = 0.0  # measured by warm_up: per query

    @property
    def inline(self) -> bool:
        """Whether one group's encode + classify runs on the event loop."""
        return self._encode_s + self._classify_s * self._k < self._inline_below_s

    def warm_up(self, group: np.ndarray, zs: np.ndarray) -> float:
        """Run every model a few times (blocking); returns the median frontend time per group.

        group [1, k, C, H, W] and zs [k, *embedding_shape] are zero dummies."""
        self._k = len(zs)
        encode, classify = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            for encoder in self.encoders.values():
                encoder.run(group)
            t1 = time.perf_counter()
            for head in self.heads.values():
                head.run(zs)
            encode.append(t1 - t0)
            classify.append(time.perf_counter() - t1)
        self._encode_s = sorted(encode)[len(encode) // 2]
        self._classify_s = sorted(classify)[len(classify) // 2] / len(zs)
        return self._encode_s + self._classify_s * len(zs)

    async def _call(self, fn: Callable[[], T], predicted_s: float) -> T:
        if predicted_s < self._inline_below_s:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def encode(self, groups: np.ndarray) -> list[np.ndarray]:
        """groups [G, k, C, H, W] -> one parity input [G, C, H, W] per encoder row."""
        return await self._call(lambda: [self.encoders[r].run(groups) for r in sorted(self.encoders)],
                                self._encode_s * len(groups))

    async def classify(self, zs: np.ndarray) -> dict[str, np.ndarray]:
        """zs [m, *embedding_shape] -> task -> logits [m, classes]."""
        return await self._call(lambda: {task: head.run(zs) for task, head in self.heads.items()},
                                self._classify_s * len(zs))
