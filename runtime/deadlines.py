"""The decode wait learned from recent completion times: waiting only while it pays.

A `CompletionTimes` keeps, per worker, the last `window` durations of calls that were
*used* (results that arrived before their group was answered); a `LearnedBound` turns them
into a deadline: a high quantile, capped. Late results are never observed, so one
straggler does not teach the server to wait for the next: the bound describes a healthy
call, and waiting past it no longer pays. runtime/modes/coded.py uses it: a decodable
group whose systematic result is missing waits for it until its worker's bound (then its
answer is exact), then decodes.

Waiting is the only thing such a bound may decide: it costs latency, never work. What adds
work (re-sending a straggler's slot, letting another dispatch run) is decided relative to
the dispatch's own results instead (runtime.modes.base.StragglerWatch), because under
overload every call outlives any absolute bound, and acting on that feeds the overload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LearnedBound:
    quantile: float = 0.99  # of recent healthy completion times
    cap_s: float = 0.005  # never wait longer than this
    min_samples: int = 32  # below this many observations the bound is `unknown_s`
    unknown_s: float = 0.0  # the bound before enough has been seen

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if self.cap_s < 0 or self.unknown_s < 0 or self.min_samples < 1:
            raise ValueError("cap_s and unknown_s must be >= 0 and min_samples >= 1")


class CompletionTimes:
    """Recent durations per key, in ring buffers; quantiles cached and refreshed every
    `refresh` observations of a key (a quantile per call would cost more than the call)."""

    def __init__(self, window: int = 512, refresh: int = 32) -> None:
        self.window = window
        self.refresh = refresh
        self._buffers: dict[int, np.ndarray] = {}
        self._counts: dict[int, int] = {}
        self._cache: dict[tuple[int, float], tuple[int, float]] = {}  # -> (count, value)

    def observe(self, key: int, seconds: float) -> None:
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = np.empty(self.window, np.float64)
        count = self._counts.get(key, 0)
        buffer[count % self.window] = seconds
        self._counts[key] = count + 1

    def samples(self, key: int) -> int:
        return min(self._counts.get(key, 0), self.window)

    def quantile(self, key: int, q: float) -> float | None:
        """The q-quantile of key's recent durations; None before any observation."""
        count = self._counts.get(key, 0)
        if count == 0:
            return None
        cached = self._cache.get((key, q))
        if cached is not None and count - cached[0] < self.refresh:
            return cached[1]
        value = float(np.quantile(self._buffers[key][:min(count, self.window)], q))
        self._cache[(key, q)] = (count, value)
        return value

    def bound_s(self, keys: Iterable[int], bound: LearnedBound) -> float:
        """The longest learned bound among `keys` (the wait for the slowest of them)."""
        longest = 0.0
        for key in keys:
            if self.samples(key) < bound.min_samples:
                value = bound.unknown_s
            else:
                value = min(self.quantile(key, bound.quantile) or 0.0, bound.cap_s)
            longest = max(longest, value)
        return longest
