"""ParM: k primaries run f (+ heads at the frontend); one parity worker runs parm.onnx.

A missing query's PRIMARY head logits = parity - sum of the other k-1 primary logits;
its other heads cannot be decoded and are reported as unavailable (NaN logits)."""

from __future__ import annotations

import logging
import time

import numpy as np

from runtime.batcher import Batch
from runtime.errors import ConfigError, ServiceUnavailable
from runtime.manifest import Manifest
from runtime.models import WORKER_F, WORKER_PARM
from runtime.modes.base import Arrivals, Mode, as_groups, padding_twins, slot
from runtime.shadow import ShadowMonitor, ShadowOutcome

logger = logging.getLogger(__name__)


class ParMMode(Mode):
    name = "parm"
    shadows = True

    @classmethod
    def pool_size(cls, manifest: Manifest) -> int:
        if manifest.parm is None:
            raise ConfigError("--mode parm needs a parity model; this bundle has none "
                              "(manifest \"parm\": null)")
        return manifest.coding.k + 1

    @classmethod
    def can_answer(cls, manifest: Manifest, up: set[int]) -> bool:
        k = manifest.coding.k
        primaries = sum(1 for i in up if i < k)
        return primaries == k or (primaries == k - 1 and k in up)

    @classmethod
    def worker_models(cls, manifest: Manifest, index: int, encoders_on_workers: bool) -> list[str]:
        return [WORKER_PARM] if index == manifest.coding.k else [WORKER_F]

    async def execute(self, batch: Batch) -> None:
        k, m = self.k, len(batch)
        self.count_partial(m)
        groups = as_groups(batch.x, k)  # [G, k, C, H, W]
        calls = [(i, WORKER_F, slot(groups, i)) for i in range(k)] + [(k, WORKER_PARM, groups)]
        arrivals = self.launch(calls, systematic=range(k), batch=batch,
                               twins=padding_twins(m, k))
        results: dict[int, np.ndarray] = {}  # primary: [G, *emb]; parity: [G, classes]

        def add(worker: int, result: np.ndarray) -> bool:
            results[worker] = result
            primaries = sum(1 for i in results if i < k)
            return primaries == k or (primaries == k - 1 and k in results)

        if not await arrivals.until(add):
            batch.fail(ServiceUnavailable(
                f"ParM needs k={k} of the {k + 1} results, got workers {sorted(results)}; "
                "retry shortly"))
            return
        shadow = self.options.shadow
        # drawn now: a shadowed group's parity is read after the answer, any other late
        # call is cancelled at once (runtime.modes.base.Arrivals.finish)
        shadowing = shadow is not None and shadow.wants()
        arrivals.finish(keep=range(k + 1) if shadowing else ())
        received = sorted(i for i in results if i < k)
        zs = np.concatenate([results[i] for i in received])  # [r*G, *emb], worker-major
        flat = await self.frontend.classify(zs)
        G = len(groups)
        logits = {t: v.reshape(len(received), G, -1) for t, v in flat.items()}  # [r, G, cls]
        row = {i: j for j, i in enumerate(received)}
        primary = self.tasks[0]
        missing = next((i for i in range(k) if i not in row), None)
        q = np.arange(m)
        g, j = q // k, q % k
        rows_of = np.array([row.get(i, 0) for i in range(k)])[j]  # [m] row in `received`
        out = {t: v[rows_of, g] for t, v in logits.items()}  # [m, cls] (a copy)
        lost = j == missing  # [m]; all False when nothing is missing
        if not lost.any():
            self.answer(batch, out, np.zeros(m, np.bool_))
            # every primary in (not only those of real queries): the parity sums all k
            if missing is None and shadowing and shadow is not None:
                try:  # after the answer; a monitor bug must not fail the dispatch
                    self._shadow(shadow, arrivals, logits[primary], m)
                except Exception:  # noqa: BLE001
                    logger.exception("queuing a shadow decode failed")
            return
        t0 = time.perf_counter()
        lost_g = g[lost]
        decoded = results[k][lost_g] - logits[primary].sum(axis=0)[lost_g]  # [r, classes]
        self.metrics.decode_seconds.observe(time.perf_counter() - t0)
        for values in out.values():
            values[lost] = np.nan  # only the primary head decodes
        out[primary][lost] = decoded.astype(np.float32)
        kept, lost_rows = np.flatnonzero(~lost), np.flatnonzero(lost)
        if len(kept):
            self.answer(batch, {t: v[kept] for t, v in out.items()}, np.zeros(len(kept), np.bool_),
                        rows=kept)
        self.answer(batch, {t: v[lost_rows] for t, v in out.items()},
                    np.ones(len(lost_rows), np.bool_), tuple(self.tasks[1:]), rows=lost_rows)

    def _shadow(self, shadow: ShadowMonitor, arrivals: Arrivals, primary_logits: np.ndarray,
                m: int) -> None:
        """Queue a job that rebuilds one primary's logits from the parity and the others,
        as a lost one would be, and compares with the exact ones (primary head only)."""
        k = self.k
        s = shadow.pick(k)
        groups = np.arange(primary_logits.shape[1])
        real = groups[groups * k + s < m]
        if not len(real):
            return
        exact = primary_logits[:, real]  # [k, r, classes]
        head = self.tasks[0]

        def submit(worker: int, parity: np.ndarray) -> None:
            async def job() -> ShadowOutcome:
                rebuilt = parity[real] - (exact.sum(axis=0) - exact[s])
                return ShadowOutcome({head: rebuilt.argmax(axis=1) == exact[s].argmax(axis=1)})

            shadow.submit(job)

        self.shadow_parity(arrivals, k, submit)
