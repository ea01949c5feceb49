"""The server: explicit lifecycle `startup()` -> serve -> `shutdown()`, KServe v2 over HTTP.

Start-up order: manifest + checksums -> HTTP listening (live = 200, ready = 503) ->
workers load and warm up -> ready = 200. Shutdown (SIGTERM/SIGINT): ready = 503, the HTTP
socket stops accepting, in-flight requests get `drain_timeout_s` to finish, then workers
and threads stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from kernels.coding import CodingScheme
from runtime.batcher import Batcher, QueryAnswer
from runtime.config import ServerConfig
from runtime.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    ServingError,
)
from runtime.gpu_decode import make_device_decoders
from runtime.manifest import Manifest, verify_checksums
from runtime.metrics import CONTENT_TYPE, Metrics
from runtime.models import ModelFactory
from runtime.modes import MODES, CodedMode, Frontend
from runtime.protocol import (
    HEADER_LENGTH,
    InferRequest,
    encode_response,
    parse_infer_request,
    preprocess,
)
from runtime.scheduler import Scheduler
from runtime.worker import Worker, WorkerPool

logger = logging.getLogger(__name__)

SERVER_NAME = "coded-invnet-runtime"
SERVER_VERSION = "0.1.0"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.bundle_dir = Path(config.bundle)
        self.manifest = Manifest.load(self.bundle_dir)
        self.model_name = self.manifest.model_name
        self.metrics = Metrics(self.model_name)
        self.mode_cls = MODES[config.mode]
        self.pool_size = self.mode_cls.pool_size(self.manifest)
        self.tasks = [h.task for h in self.manifest.heads]
        self.output_names = ([n for t in self.tasks for n in (f"{t}_logits", f"{t}_class")]
                             + ["reconstructed"])
        self.threads = config.workers or min(self.pool_size, os.cpu_count() or 1)
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._warmed_up = False
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runners: list[web.AppRunner] = []
        self._http_site: web.TCPSite | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.pool: WorkerPool | None = None
        self.scheduler: Scheduler | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def startup(self) -> None:
        """Listen (live = 200, ready = 503), then load and warm up every worker (ready = 200)."""
        await self.start_listening()
        await self.start_workers()

    async def start_listening(self) -> None:
        config, manifest = self.config, self.manifest
        if config.verify_checksums:
            verify_checksums(self.bundle_dir, manifest)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="coded-worker")
        device_decoders = None
        if (config.gpu_decode and config.mode == "coded" and config.engine == "torch"
                and config.device == "cuda"):
            device_decoders = make_device_decoders(
                CodingScheme.from_dict(manifest.coding.to_dict()))
        factory = ModelFactory(self.bundle_dir, manifest, config,
                               device_outputs=device_decoders is not None)
        loop = asyncio.get_running_loop()
        heads, encoders = await loop.run_in_executor(self._executor, lambda: (
            factory.heads(),
            factory.encoders() if self.mode_cls.frontend_encoders(
                manifest, config.encoders_on_workers) else {},
        ))
        frontend = Frontend(heads, encoders, self._executor)
        k, chw = manifest.coding.k, tuple(manifest.input.shape)
        frontend_s = await loop.run_in_executor(self._executor, lambda: frontend.warm_up(
            np.zeros((1, k, *chw), np.float32),
            np.zeros((k, *manifest.embedding_shape), np.float32),
            config.frontend_inline_ms / 1000.0))

        def make_worker(index: int, incarnation: int, kill_after: int | None) -> Worker:
            names = self.mode_cls.worker_models(manifest, index, config.encoders_on_workers)
            return Worker(index, lambda: factory.worker_models(index, names),
                          factory.warmup_inputs(names), self._executor,
                          incarnation=incarnation, kill_after_calls=kill_after)

        self.pool = WorkerPool(self.pool_size, make_worker,
                               deadline_s=config.worker_deadline_ms / 1000.0,
                               faults=config.faults, metrics=self.metrics)
        mode = self.mode_cls(manifest, self.pool, frontend, self.metrics,
                             encoders_on_workers=config.encoders_on_workers,
                             systematic_grace_s=config.systematic_grace_ms / 1000.0)
        if device_decoders is not None and isinstance(mode, CodedMode):
            mode.new_decoder = device_decoders
        batcher = Batcher(mode.group_size, config.max_queue_delay_ms / 1000.0,
                          config.max_queue_size)
        self.scheduler = Scheduler(mode, batcher, config.max_inflight_groups, self.metrics,
                                   config.max_groups_per_call)

        self._http_site, self.http_port = await self._listen(self._http_app(), config.http_port)
        if config.metrics_port >= 0:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", self._metrics_handler)
            _, self.metrics_port = await self._listen(metrics_app, config.metrics_port)
        await self.scheduler.start()
        logger.info(
            "serving %s (bundle %s) on http://%s:%d, metrics %s; mode=%s n=%d k=%d workers=%d "
            "threads=%d engine=%s device=%s loop=%s encoders_on_workers=%s frontend=%.3f ms "
            "(%s) max_queue_delay_ms=%g faults=%s",
            self.model_name, self.bundle_dir, config.host, self.http_port,
            f"http://{config.host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
            config.mode, manifest.coding.n, manifest.coding.k, self.pool_size, self.threads,
            config.engine, config.device, type(asyncio.get_running_loop()).__module__,
            config.encoders_on_workers, frontend_s * 1e3,
            "event loop" if frontend.inline else "thread pool", config.max_queue_delay_ms,
            config.faults if config.faults.active else "none")

    async def start_workers(self) -> None:
        if self.pool is None:
            raise RuntimeError("start_listening() must run before start_workers()")
        await self.pool.start()  # ready turns 200 only after every worker warmed up
        self._warmed_up = True
        logger.info("all %d workers warmed up; ready", self.pool_size)

    async def _listen(self, app: web.Application, port: int) -> tuple[web.TCPSite, int]:
        """Serve `app` on host:port; returns the site and the bound port (port 0 = any)."""
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.config.drain_timeout_s)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, port)
        await site.start()
        return site, int(runner.addresses[0][1])

    async def shutdown(self) -> None:
        started = time.monotonic()
        self._draining = True
        if self._http_site is not None:
            await self._http_site.stop()  # stop accepting connections
        logger.info("shutting down: draining %d in-flight request(s) (up to %.1f s)",
                    self._inflight, self.config.drain_timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
        except TimeoutError:
            logger.warning("%d request(s) still in flight after %.1f s; cancelling them",
                           self._inflight, self.config.drain_timeout_s)
        if self.scheduler is not None:
            await self.scheduler.stop(timeout_s=1.0)
        if self.pool is not None:
            await self.pool.stop()
        for runner in self._runners:
            await runner.cleanup()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        logger.info("shut down in %.2f s", time.monotonic() - started)

    # -- HTTP --------------------------------------------------------------------------------
    def _http_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes,
                              middlewares=[self._errors])
        r = app.router
        r.add_get("/v2/health/live", self._live)
        r.add_get("/v2/health/ready", self._ready)
        r.add_get("/v2", self._server_metadata)
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            r.add_get(prefix, self._model_metadata)
            r.add_get(prefix + "/ready", self._model_ready)
            r.add_post(prefix + "/infer", self._infer)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error leaves as {"error": ...}; infer failures are counted by reason."""
        started = time.perf_counter()
        try:
            return await handler(request)
        except ServingError as exc:
            reason, status, message = type(exc).__name__, exc.status, str(exc)
            headers = ({"Retry-After": str(exc.retry_after_s)}
                       if isinstance(exc, ServiceUnavailable) else None)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, 405, body too large
            if exc.status < 400:
                raise
            reason, status, headers = type(exc).__name__, exc.status, None
            message = exc.text or exc.reason
            if exc.status == 413:
                message = (f"request body exceeds the {self.config.max_body_bytes}-byte limit "
                           "(--max-body-bytes); send fewer images per request")
            elif exc.status == 404:
                message = f"no route {request.method} {request.path}; see GET /v2 and the KServe v2 API"
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 and is logged, not hidden
            logger.exception("internal error on %s %s", request.method, request.path)
            reason, status, headers = "InternalError", 500, None
            message = f"internal server error: {type(exc).__name__}: {exc}"
        if request.path.endswith("/infer"):
            self.metrics.request_failure(reason, time.perf_counter() - started)
        return _error(status, message, headers)

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    def _not_ready_reason(self) -> str | None:
        if self._draining:
            return "server is shutting down"
        if not self._warmed_up:
            states = self.pool.states() if self.pool else []
            return f"workers are still warming up (states {states})"
        return None

    async def _ready(self, request: web.Request) -> web.Response:
        reason = self._not_ready_reason()
        if reason is not None:
            return _error(503, f"not ready: {reason}")
        return web.json_response({"ready": True})

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": SERVER_VERSION,
                                  "extensions": ["binary_tensor_data", "parameters"]})

    def _check_model(self, request: web.Request) -> None:
        name = request.match_info["name"]
        version = request.match_info.get("version")
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version not in (None, "", "1"):
            raise NotFound(f"model {name!r} has version '1' only, got {version!r}")

    async def _model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return await self._ready(request)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        spec = self.manifest.input
        outputs: list[dict[str, Any]] = []
        for head in self.manifest.heads:
            outputs.append({"name": f"{head.task}_logits", "datatype": "FP32",
                            "shape": [-1, len(head.classes)]})
            outputs.append({"name": f"{head.task}_class", "datatype": "INT64", "shape": [-1]})
        outputs.append({"name": "reconstructed", "datatype": "BOOL", "shape": [-1]})
        coding = self.manifest.coding
        return web.json_response({
            "name": self.model_name,
            "versions": ["1"],
            "platform": "coded-invnet",
            "inputs": [{"name": spec.name, "datatype": dt, "shape": [-1, *spec.shape]}
                       for dt in spec.accepted_dtypes],
            "outputs": outputs,
            "parameters": {
                "mode": self.config.mode, "n": coding.n, "k": coding.k,
                "workers": self.pool_size, "engine": self.config.engine,
                "classes": {h.task: list(h.classes) for h in self.manifest.heads},
                "preprocessing": {"mean": list(spec.preprocessing.mean),
                                  "std": list(spec.preprocessing.std),
                                  "raw": "UINT8 0..255 or FP32 in [0, 1]; the server normalises"},
                "outputs": ("<task>_logits: FP32 [B, classes]; <task>_class: INT64 [B] argmax "
                            "(-1 when the head is unavailable); reconstructed: BOOL [B], true "
                            "when the answer was decoded from coded results. Response "
                            "parameters: reconstructed (any), reconstructed_queries, mode, "
                            "unavailable_heads (ParM)"),
                "request_parameters": "timeout_ms (or Triton's timeout in us), "
                                      "binary_data_output",
            },
        })

    async def _infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        self._check_model(request)
        if self._draining:
            raise ServiceUnavailable("server is shutting down; send the request to another "
                                     "replica", retry_after_s=5)
        if not self._warmed_up or self.scheduler is None:
            raise ServiceUnavailable("workers are still warming up; poll /v2/health/ready")
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the "
                                  f"{self.config.max_body_bytes}-byte limit (--max-body-bytes)")
        self._inflight += 1
        self._idle.clear()
        inflight_gauge = self.metrics.inflight_requests.labels(**self.metrics.labels)
        inflight_gauge.inc()
        try:
            response = await self._infer_inner(request)
        finally:
            self._inflight -= 1
            inflight_gauge.dec()
            if self._inflight == 0:
                self._idle.set()
        self.metrics.request_success(time.perf_counter() - started)
        return response

    async def _infer_inner(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not body:
            raise BadRequest("empty request body; send a KServe v2 JSON inference request")
        spec = self.manifest.input
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), spec,
                                     self.output_names, self.config.max_batch_size)
        xs = preprocess(parsed.raw, spec)  # [B, C, H, W] normalised
        queries = self.scheduler.submit(xs)  # type: ignore[union-attr] - set in startup()
        timeout_s = parsed.timeout_s or self.config.request_timeout_ms / 1000.0
        futures = [q.future for q in queries]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"request not answered within its {timeout_s * 1000:.0f} ms "
                                 "timeout (parameter timeout_ms)") from None
        finally:
            for future in futures:  # anything unanswered is abandoned, never computed twice
                future.cancel()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if isinstance(errors[0], ServingError):
                raise errors[0]
            raise ServiceUnavailable(f"inference failed: {errors[0]}")
        answers: list[QueryAnswer] = results  # type: ignore[assignment]
        return self._respond(parsed, answers)

    def _respond(self, parsed: InferRequest, answers: list[QueryAnswer]) -> web.Response:
        tensors: dict[str, np.ndarray] = {}
        for task in self.tasks:
            logits = np.stack([a.logits[task] for a in answers]).astype(np.float32)  # [B, cls]
            available = ~np.isnan(logits).any(axis=1)
            classes = np.where(available, np.argmax(np.nan_to_num(logits, nan=-np.inf), axis=1),
                               -1).astype(np.int64)  # [B]
            tensors[f"{task}_logits"] = logits
            tensors[f"{task}_class"] = classes
        flags = np.array([a.reconstructed for a in answers], dtype=np.bool_)  # [B]
        tensors["reconstructed"] = flags
        parameters: dict[str, Any] = {
            "reconstructed": bool(flags.any()),
            "reconstructed_queries": ",".join(str(i) for i in np.flatnonzero(flags)),
            "mode": self.config.mode,
        }
        unavailable = sorted({t for a in answers for t in a.unavailable_heads})
        if unavailable:
            parameters["unavailable_heads"] = ",".join(unavailable)
        body, headers = encode_response(self.model_name, parsed.request_id, tensors,
                                        parsed.outputs, parsed.binary_default, parameters)
        content_type = headers.pop("Content-Type")
        return web.Response(body=body, headers=headers, content_type=content_type)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE})

    # -- running -----------------------------------------------------------------------------
    async def run_until(self, stop: asyncio.Event) -> None:
        """startup(); wait for `stop`; shutdown() (always, even if start-up fails midway)."""
        try:
            await self.startup()
            await stop.wait()
        finally:
            await self.shutdown()
