"""The decode wait, learned from how late missing systematic results really come.

When a coding group becomes decodable with a systematic result still missing, waiting for
that result gives an exact answer instead of a reconstructed one, at the price of the
wait. `Lateness` records, for every such result, how long after the group became
decodable it landed, whether it came during the wait or after the group was answered
(so nothing is censored), or that it never came (a failure). `DecodeWait` turns the recent
window into the wait: when at least `min_pay` of those results came within `cap_s`, wait up
to the `quantile` of the ones that did (then most waits end with an exact answer); when
fewer did (e.g. a worker that straggles in every group) waiting does not pay, so decode at
once. Until `min_samples` are seen it waits `cap_s`, to learn.

Waiting costs latency, never work. What adds work (re-sending a straggler's slot, letting
another dispatch run) is decided relative to the dispatch's own results instead
(runtime.modes.base.StragglerWatch): under overload every call outlives any absolute bound,
and acting on that would feed the overload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DecodeWait:
    quantile: float = 0.99  # of the latenesses that came within cap_s
    cap_s: float = 0.005  # never wait longer than this
    min_pay: float = 0.5  # wait only when at least this fraction came within cap_s
    min_samples: int = 32  # before this many observations: wait cap_s (learning)

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if self.cap_s < 0 or not 0.0 <= self.min_pay <= 1.0 or self.min_samples < 1:
            raise ValueError("cap_s must be >= 0, min_pay in [0, 1] and min_samples >= 1")


class Lateness:
    """Recent latenesses (seconds after decodability; inf = never came) in a ring buffer;
    the wait is recomputed every `refresh` observations, not per group."""

    def __init__(self, policy: DecodeWait, window: int = 256, refresh: int = 16) -> None:
        self.policy = policy
        self.window, self.refresh = window, refresh
        self._values = np.empty(window, np.float64)
        self._count = 0
        self._wait_s = policy.cap_s
        self._computed_at = 0

    def observe(self, seconds: float) -> None:
        self._values[self._count % self.window] = seconds
        self._count += 1

    @property
    def samples(self) -> int:
        return min(self._count, self.window)

    def wait_s(self) -> float:
        """How long a decodable group waits now for its missing systematic result."""
        policy = self.policy
        if self.samples < policy.min_samples:
            return policy.cap_s
        if self._count - self._computed_at >= self.refresh or self._computed_at == 0:
            values = self._values[:self.samples]
            within = values[values <= policy.cap_s]
            if len(within) < policy.min_pay * len(values) or not len(within):
                self._wait_s = 0.0
            else:
                self._wait_s = float(min(np.quantile(within, policy.quantile), policy.cap_s))
            self._computed_at = self._count
        return self._wait_s


NEVER = math.inf  # the lateness of a result that failed instead of landing
