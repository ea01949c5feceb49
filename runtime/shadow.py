"""Shadow decoding: how right reconstructed answers are on live traffic.

A reconstructed answer is flagged, but whether it is still *right* once traffic drifts
from the training data cannot be seen from it: the encoder is learned. In most coding
groups, though, every systematic result and a parity arrive, so the exact answer is known
and can be rebuilt from the parity as if it had been lost. For `--shadow-decode-fraction`
of such groups the mode hands this monitor a job that does exactly that (one systematic
slot chosen at random, rebuilt with the mode's own decoder) and compares the rebuilt
answer with the exact one: class agreement per head, and the relative embedding error
||z' - z|| / ||z|| where the scheme rebuilds embeddings.

Off the request path: the answer has left before the job is queued; jobs wait in a
bounded queue (full: dropped and counted) and run one at a time, each after the server
has had no queued queries for a moment (at most IDLE_WAIT_S), so the monitor takes idle
time first. Per head, the last `window` compared answers give the running agreement with
a 95 % Wilson interval (the statistics endpoint) and a gauge. When some head's agreement
is confidently below `alert_below` (its interval's upper end is; at least `min_samples`
compared), a warning is logged once and `coded_shadow_alert` is 1 until it recovers. The
interval, not the point estimate, decides: in-distribution traffic dips (a window of
harder writers) would otherwise raise false alarms (bench monitor measured one at 0.81
on MNIST with a 0.85 threshold).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kernels.coding import CodingScheme, OnlineDecoder
from runtime.metrics import Metrics

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # a job waits at most this long for the server to have nothing queued
IDLE_POLL_S = 0.002
Z_95 = 1.959964


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (0, 1 when nothing is seen)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rebuild_slot(scheme: CodingScheme, exact: Sequence[np.ndarray], slot: int,
                 parity_worker: int, parity: np.ndarray) -> np.ndarray:
    """Systematic slot `slot` rebuilt as if it had been lost: from the other exact results
    `exact[i]` [G, *emb] (i < k) and worker `parity_worker`'s parity result, with the
    host decoder every erasure uses. Raises ValueError when the slot is not decodable."""
    decoder = OnlineDecoder(scheme, parity.shape)
    for i, z in enumerate(exact):
        if i != slot:
            decoder.add(i, z)
    if not decoder.add(parity_worker, parity):
        raise ValueError(f"slot {slot} is not decodable from parity worker {parity_worker}")
    return decoder.finalize()[slot]


@dataclass(frozen=True)
class ShadowConfig:
    fraction: float = 0.05  # of the groups where every systematic result and a parity came
    alert_below: float = 0.85  # any head's windowed agreement confidently under this: alert
    window: int = 200  # compared answers per head in the running agreement
    min_samples: int = 50  # no alert on fewer compared answers
    queue_size: int = 64  # jobs waiting; more are dropped
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if not 0.0 <= self.alert_below <= 1.0:
            raise ValueError(f"alert_below must be in [0, 1], got {self.alert_below}")
        if self.window < 1 or self.min_samples < 1 or self.queue_size < 1:
            raise ValueError("window, min_samples and queue_size must be >= 1")


@dataclass
class ShadowOutcome:
    """One job's comparison: per head, whether each rebuilt answer's class agrees with the
    exact one; the relative embedding errors (empty where the scheme rebuilds logits)."""

    agreements: dict[str, np.ndarray]
    rel_errors: np.ndarray = field(default_factory=lambda: np.zeros(0))


ShadowJob = Callable[[], Awaitable[ShadowOutcome]]


class ShadowMonitor:
    def __init__(self, config: ShadowConfig, heads: list[str], metrics: Metrics,
                 busy: Callable[[], bool]) -> None:
        self.config = config
        self.heads = list(heads)
        self._metrics = metrics
        self._busy = busy
        self._rng = random.Random(config.seed)
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(config.queue_size)
        self._windows = {h: collections.deque(maxlen=config.window) for h in self.heads}
        self._task: asyncio.Task[None] | None = None
        self.decodes = 0
        self.alerting = False

    # -- the request path's side: cheap --------------------------------------------------------
    def wants(self) -> bool:
        """Whether to shadow this group (drawn with probability `fraction`)."""
        return self.config.fraction > 0 and self._rng.random() < self.config.fraction

    def pick(self, k: int) -> int:
        """A random index below k: the systematic slot a job rebuilds, the parity it uses."""
        return self._rng.randrange(k)

    def submit(self, job: ShadowJob) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._metrics.shadow_dropped.inc()

    # -- the background side -------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="shadow-decode")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            deadline = loop.time() + IDLE_WAIT_S
            while self._busy() and loop.time() < deadline:  # let queued requests go first
                await asyncio.sleep(IDLE_POLL_S)
            try:  # a monitor bug must never reach a request, nor stop the monitor
                self.record(await job())
            except Exception:  # noqa: BLE001
                logger.exception("shadow decode failed")

    def record(self, outcome: ShadowOutcome) -> None:
        metrics = self._metrics
        self.decodes += 1
        metrics.shadow_decodes.inc()
        for head, agree in outcome.agreements.items():
            window = self._windows[head]
            window.extend(bool(a) for a in agree)
            metrics.shadow_agreements.labels(head=head).inc(int(np.count_nonzero(agree)))
            metrics.shadow_compared.labels(head=head).inc(len(agree))
            if window:
                metrics.shadow_agreement.labels(head=head).set(sum(window) / len(window))
        for error in outcome.rel_errors:
            metrics.shadow_rel_error.observe(float(error))
        self._check_alert()

    def _check_alert(self) -> None:
        enough = min(self.config.min_samples, self.config.window)  # a short window can alert
        low = {h: sum(w) / len(w) for h, w in self._windows.items()
               if len(w) >= enough
               and wilson_interval(sum(w), len(w))[1] < self.config.alert_below}
        if low and not self.alerting:
            logger.warning("shadow decoding: windowed agreement %s is below --shadow-alert-below "
                           "%.2f with 95%% confidence (after %d shadow decodes): reconstructed "
                           "answers are less reliable on this traffic", {h: round(a, 3) for h, a in low.items()},
                           self.config.alert_below, self.decodes)
        elif not low and self.alerting:
            logger.info("shadow decoding: windowed agreement back above %.2f",
                        self.config.alert_below)
        self.alerting = bool(low)
        self._metrics.shadow_alert.set(1 if low else 0)

    def statistics(self) -> dict[str, object]:
        """The running agreement per head with its 95 % Wilson interval."""
        heads = {}
        for head, window in self._windows.items():
            agree, total = sum(window), len(window)
            low, high = wilson_interval(agree, total)
            heads[head] = {"agreement": round(agree / total, 4) if total else None,
                           "interval_95": [round(low, 4), round(high, 4)], "window": total}
        return {"fraction": self.config.fraction, "decodes": self.decodes,
                "alert_below": self.config.alert_below, "alert": self.alerting, "heads": heads}
