"""The engine: one bundle served in one mode, knowing nothing of any wire protocol.

It composes the thread pool, the frontend models, the workers (a backend from
runtime.worker, wrapped by runtime.faults when faults are configured), the supervising
pool, the serving mode, the batcher and the scheduler. Protocols (runtime/http_server.py)
call only `health()`, `infer()` and the read-only attributes; the server owns the
lifecycle: `Engine(config)` (manifest + checksums) -> `start()` (load + warm up) ->
`begin_drain()` / `drain(timeout_s)` -> `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.coding import CodingScheme
from runtime.admission import Admission, AdmissionControl
from runtime.batcher import Batcher
from runtime.compute_threads import ComputeThreads
from runtime.config import ServerConfig
from runtime.context import EngineContext
from runtime.deadlines import DecodeWait
from runtime.errors import ConfigError, RequestTimeout, ServiceUnavailable, ServingError
from runtime.faults import with_faults
from runtime.frontend import Frontend
from runtime.gpu_decode import DeviceDecoders, make_device_decoders
from runtime.manifest import Manifest, ManifestError
from runtime.metrics import Metrics
from runtime.model_io import InferenceResult, build_result, preprocess
from runtime.models import ModelFactory
from runtime.modes import MODES, Mode, ModeOptions
from runtime.pool import WorkerPool
from runtime.scheduler import Scheduler
from runtime.shadow import ShadowConfig, ShadowMonitor
from runtime.worker import make_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    reason: str | None = None  # why not ready


class Engine:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.bundle_dir = Path(config.bundle)
        self.manifest = self._load_manifest(config)
        self.model_name = self.manifest.model_name
        self.metrics = metrics or Metrics(self.model_name)
        self.mode_cls: type[Mode] = MODES[config.mode]
        self.pool_size = self.mode_cls.pool_size(self.manifest)
        self.threads = config.workers or min(self.pool_size, os.cpu_count() or 1)
        self.pool: WorkerPool | None = None
        self.scheduler: Scheduler | None = None
        self.frontend: Frontend | None = None
        self.models: ModelFactory | None = None
        self._device_decoders: DeviceDecoders | None = None
        self._threads: ComputeThreads | None = None
        self._started = False
        self._frontend_s = 0.0  # measured frontend time per group, at warm-up
        self._draining = False
        self._inflight = 0  # admitted requests not yet answered
        self.admission: AdmissionControl | None = None
        self.shadow: ShadowMonitor | None = None  # runtime/shadow.py, when on
        self._idle = asyncio.Event()
        self._idle.set()

    def _load_manifest(self, config: ServerConfig) -> Manifest:
        """The bundle's manifest with the code to serve (--coding) selected, once, here: every
        part of the engine (modes, models, metadata, Ray actors) reads that code only."""
        manifest = Manifest.load(self.bundle_dir)
        code = config.code
        if code is None:
            return manifest
        try:
            return manifest.select_code(*code)
        except ManifestError as exc:
            raise ConfigError(f"--coding {config.coding}: {exc}") from exc

    # -- lifecycle ---------------------------------------------------------------------------
    def load_bundle(self) -> None:
        """Read every bundle file once, checked against the manifest (before anything is
        served); decide where decoding runs."""
        config = self.config
        if (config.gpu_decode and config.mode == "coded" and config.engine == "torch"
                and config.device == "cuda"):
            self._device_decoders = make_device_decoders(
                CodingScheme.from_dict(self.manifest.coding.to_dict()))
        self.models = ModelFactory(self.bundle_dir, self.manifest, config,
                                   device_outputs=self._device_decoders is not None)

    async def start(self) -> None:
        """prepare(), then start_workers()."""
        await self.prepare()
        await self.start_workers()

    async def prepare(self) -> None:
        """Load the frontend models, make the pool (no worker started) and start dispatching."""
        config, manifest = self.config, self.manifest
        if self.models is None:
            self.load_bundle()
        models = self.models
        assert models is not None  # set by load_bundle()
        device_decoders = self._device_decoders
        self._threads = ComputeThreads(self.threads, name="coded-worker")
        context = EngineContext(config, manifest, self.bundle_dir, self.metrics, self._threads,
                                models)
        self.frontend = await self._load_frontend(models)
        backend = make_backend(config.workers_backend, context, self.pool_size,
                               lambda i: self.mode_cls.worker_models(
                                   manifest, i, config.encoders_on_workers))
        kill = config.faults.kill_worker
        if kill is not None and not 0 <= kill < self.pool_size:
            logger.warning("--fault-kill-worker %d is outside 0..%d; nothing will be killed",
                           kill, self.pool_size - 1)
        if config.shadow_decode_fraction > 0 and self.mode_cls.shadows:
            self.shadow = ShadowMonitor(
                ShadowConfig(config.shadow_decode_fraction, config.shadow_alert_below,
                             config.shadow_window, seed=config.faults.seed),
                [h.task for h in manifest.heads], self.metrics,
                busy=lambda: self.scheduler is not None and self.scheduler.queued() > 0)
            self.shadow.start()
        self.pool = WorkerPool(self.pool_size, with_faults(backend.make_worker, config.faults),
                               deadline_s=config.worker_deadline_ms / 1000.0, metrics=self.metrics)
        self.backend = backend  # its workers (runtime.worker.BACKENDS)
        mode = self.mode_cls(manifest, self.pool, self.frontend, self.metrics, ModeOptions(
            encoders_on_workers=config.encoders_on_workers,
            systematic_grace_s=(config.systematic_grace_ms or 0.0) / 1000.0,
            decode_wait=DecodeWait(config.decode_wait_quantile, config.decode_wait_cap_ms / 1000.0)
            if config.systematic_grace_ms is None else None,
            straggler_scale=config.straggler_scale or None,
            straggler_min_s=config.straggler_min_ms / 1000.0,
            # thread workers share the engine's compute threads; other backends' do not
            compute_slots=self.threads if config.workers_backend == "thread" else None,
            redispatch=config.redispatch, redispatch_copies=config.redispatch_copies,
            shadow=self.shadow,
            cancel_late_after_s=config.decode_wait_cap_ms / 1000.0 if config.cancel_late_calls
            else None,
            decoders=device_decoders))
        batcher = Batcher(mode.group_size, config.max_queue_delay_ms / 1000.0,
                          config.max_queue_size, on_cancelled=self.metrics.queries_cancelled)
        self.admission = AdmissionControl(
            lambda: len(batcher), config.max_queue_size, live=batcher.live_count,
            wait_s=config.admission_wait_ms / 1000.0, max_waiting=config.max_waiting_requests,
            metrics=self.metrics)
        # One dispatch per compute thread: bigger batches and no oversubscription. Two per
        # thread let a dispatch compute while another waits on results that need no CPU (a
        # straggler deadline, the decode wait), which shortened the delay-prob tail at
        # 412 q/s (p99 37-46 -> 26-28 ms) but cost coded 17 % of its closed-loop capacity
        # (3 interleaved pairs; bench/results/serving/serving-notes.md, session 18).
        inflight = config.max_inflight_groups or self.threads
        self.scheduler = Scheduler(mode, batcher, inflight, self.metrics,
                                   config.max_groups_per_call,
                                   on_dequeue=self.admission.room_changed)
        await self.scheduler.start()

    def summary(self) -> str:
        """The key facts, for the one start-up log line."""
        config, coding = self.config, self.manifest.coding
        inline = self.frontend is not None and self.frontend.inline
        others = self.manifest.code_labels()[1:]
        also = f"(other codes in the bundle: {' '.join(others)}) " if others else ""
        return (f"bundle {self.bundle_dir}; mode={config.mode} n={coding.n} k={coding.k} {also}"
                f"workers={self.pool_size} ({config.workers_backend}) threads={self.threads} "
                f"engine={config.engine} device={config.device} "
                f"encoders_on_workers={config.encoders_on_workers} "
                f"frontend={self._frontend_s * 1e3:.3f} ms "
                f"({'event loop' if inline else 'thread pool'}) "
                f"max_queue_delay_ms={config.max_queue_delay_ms:g} "
                f"faults={config.faults if config.faults.active else 'none'}")

    async def start_workers(self) -> None:
        """Load and warm up every worker; ready only after."""
        if self.pool is None:
            raise RuntimeError("Engine.prepare() must run before start_workers()")
        await self.pool.start()
        self._started = True
        logger.info("all %d workers warmed up; ready", self.pool_size)

    async def _load_frontend(self, models: ModelFactory) -> Frontend:
        config, manifest = self.config, self.manifest
        loop = asyncio.get_running_loop()
        wants_encoders = self.mode_cls.frontend_encoders(manifest, config.encoders_on_workers)
        heads, encoders = await loop.run_in_executor(self._threads, lambda: (
            models.heads(), models.encoders() if wants_encoders else {}))
        frontend = Frontend(heads, encoders, self._threads,  # type: ignore[arg-type]
                            inline_below_s=config.frontend_inline_ms / 1000.0)
        k, chw = manifest.coding.k, tuple(manifest.input.shape)
        self._frontend_s = await loop.run_in_executor(self._threads, lambda: frontend.warm_up(
            np.zeros((1, k, *chw), np.float32),
            np.zeros((k, *manifest.embedding_shape), np.float32)))
        return frontend

    def begin_drain(self) -> None:
        """Refuse new requests from now on, and those still waiting for room (readiness
        turns false); admitted ones are still answered."""
        self._draining = True
        if self.admission is not None:
            self.admission.close(ServiceUnavailable(
                "server is shutting down; send the request to another replica", retry_after_s=5))

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for in-flight requests; True when none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def draining(self) -> bool:
        return self._draining

    async def stop(self) -> None:
        """Fail whatever is still queued, stop the workers and the threads."""
        self._draining = True
        if self.scheduler is not None:
            await self.scheduler.stop(timeout_s=1.0)
        if self.shadow is not None:
            await self.shadow.stop()
        if self.pool is not None:
            await self.pool.stop()
            await self.backend.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._device_decoders is not None:
            self._device_decoders.close()

    # -- serving -----------------------------------------------------------------------------
    def health(self) -> Health:
        if self._draining:
            return Health(True, False, "server is shutting down")
        if not self._started:
            states = self.pool.states() if self.pool else []
            return Health(True, False, f"workers are still warming up (states {states})")
        up = self.pool.up() if self.pool else set()
        if not self.mode_cls.can_answer(self.manifest, up):
            return Health(True, False, f"only workers {sorted(up)} of {self.pool_size} are up, "
                                       f"too few for --mode {self.config.mode} to answer; "
                                       "the others are restarting")
        return Health(True, True)

    def statistics(self) -> dict[str, float]:
        """Counters since start: requests, queries, executions, times (us), coded events."""
        return self.metrics.snapshot()

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[Admission]:
        """Admit one request (503 while warming up, draining or full); the drain waits for
        every admitted request. Protocols read and parse a request inside this, then call
        `infer` with the admission."""
        if self._draining:
            raise ServiceUnavailable("server is shutting down; send the request to another "
                                     "replica", retry_after_s=5)
        if not self._started or self.scheduler is None:
            raise ServiceUnavailable("workers are still warming up; poll /v2/health/ready")
        assert self.admission is not None  # made with the scheduler
        self._inflight += 1  # counted while waiting too: the drain waits for it
        self._idle.clear()
        try:
            admission = await self.admission.admit()  # from the headers, before the body
        except BaseException:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            raise
        gauge = self.metrics.inflight
        gauge.inc()
        try:
            yield admission
        finally:
            admission.release()
            self._inflight -= 1
            gauge.dec()
            if self._inflight == 0:
                self._idle.set()

    async def infer(self, admission: Admission, raw: np.ndarray,
                    timeout_s: float | None = None) -> InferenceResult:
        """Answer raw images [B, C, H, W] (UINT8 or FP32 in [0, 1]), each query once, for a
        request admitted by `admit()`.

        Raises ServiceUnavailable (overloaded, too few workers) or RequestTimeout;
        unanswered queries are abandoned, never computed twice."""
        if admission.control is not self.admission or admission.released:
            raise RuntimeError("Engine.infer() takes the admission of `async with engine.admit()`")
        if timeout_s is None:
            timeout_s = self.config.request_timeout_ms / 1000.0
        return await self._infer(raw, timeout_s,
                                 admission)

    async def _infer(self, raw: np.ndarray, timeout_s: float, admission: Admission
                     ) -> InferenceResult:
        try:
            block = self.scheduler.submit(  # type: ignore[union-attr] - set by admit()
                preprocess(raw, self.manifest.input))  # [B, C, H, W]
        finally:
            admission.release(len(raw))  # queued (or refused): the queue counts them now
        try:
            # cancelling this task on timeout cancels the awaited future too (abandoned)
            async with asyncio.timeout(timeout_s):
                answers = await block.future
        except TimeoutError:
            raise RequestTimeout(f"request not answered within its {timeout_s * 1000:.0f} ms "
                                 "timeout (parameter timeout_ms)") from None
        except ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 - a mode bug is this request's 503, not a 500
            raise ServiceUnavailable(f"inference failed: {exc}") from exc
        finally:
            # anything unanswered is abandoned (its future is cancelled), never computed
            # twice; abandoned queries free room
            self.admission.room_changed()  # type: ignore[union-attr]
        return build_result(self.manifest, answers)
