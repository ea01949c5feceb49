"""KServe v2 over HTTP (aiohttp): translates the wire format to engine calls and back.

Nothing here knows how answers are computed: requests are parsed (runtime/protocol.py),
handed to `Engine.infer`, and its `InferenceResult` is encoded. A second protocol (gRPC)
is a second module like this one, registered in runtime/server.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web, web_response
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from runtime import model_config
from runtime.engine import Engine
from runtime.errors import (
    BadRequest,
    BodyTimeout,
    ClientDisconnected,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ServingError,
)
from runtime.protocol import HEADER_LENGTH, InferRequest, encode_response, parse_infer_request

logger = logging.getLogger(__name__)

SERVER_NAME = model_config.SERVER_NAME
SERVER_VERSION = model_config.SERVER_VERSION
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp stamps `Server: Python/3.x aiohttp/3.y` on every response it makes, including the
# 400s it sends before any handler runs; a version banner only helps an attacker.
web_response.SERVER_SOFTWARE = SERVER_NAME


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _ready_only(body: bytes) -> bool:
    """A repository index request's body: empty, or {"ready": bool} (list only ready models)."""
    if not body.strip():
        return False
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest('repository index body must be empty or JSON {"ready": true|false}'
                         ) from None
    if not isinstance(request, dict) or set(request) - {"ready"} \
            or not isinstance(request.get("ready", False), bool):
        raise BadRequest('repository index body must be empty or JSON {"ready": true|false}, '
                         f"got {body[:80]!r}")
    return request.get("ready", False)


class ProtocolLogger:
    """The logger aiohttp's connection handler writes to. aiohttp logs a client's malformed
    framing (refused with 400 before any handler) as an exception with a traceback; that
    is the client's error, so it is logged at INFO without one. Anything else passes on."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def exception(self, message: str, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._logger.info("refused a malformed request: %s (%s)",
                              exc_info.message, message % args)
            return
        self._logger.exception(message, *args, exc_info=exc_info, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class ErrorCounter(AbstractAccessLogger):
    """aiohttp's access-log hook, used only to count error responses by status, including
    requests aiohttp refuses before any handler runs (bad framing or chunked encoding)."""

    metrics: Any = None  # set per server by HttpFrontend.access_log_class

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.status >= 400:
            self.metrics.http_errors.labels(code=str(response.status)).inc()

    @property
    def enabled(self) -> bool:
        return True


class HttpFrontend:
    """The KServe v2 HTTP routes of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.metrics = engine.metrics
        self.model_name = engine.model_name
        self.output_names = engine.manifest.output_names()
        # Large bodies are parsed in one helper process (started at the first one): json.loads
        # holds the GIL for its whole run, so a thread would still stall the event loop, and
        # a flood of large bodies queues there instead of taking every compute thread.
        self._parser: ProcessPoolExecutor | None = None

    def access_log_class(self) -> type[AbstractAccessLogger]:
        return type("ServerErrorCounter", (ErrorCounter,), {"metrics": self.metrics})

    def close(self) -> None:
        if self._parser is not None:
            self._parser.shutdown(wait=False, cancel_futures=True)  # never block the loop

    def _large_body_parser(self) -> ProcessPoolExecutor:
        if self._parser is None:  # spawn, not fork: this process runs inference threads
            self._parser = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self._parser

    def app(self) -> web.Application:
        # handler_cancellation: a client that disconnects cancels its handler, so its queued
        # queries are dropped, never computed (counted as coded_cancelled_queries)
        app = web.Application(client_max_size=self.config.max_body_bytes,
                              middlewares=[self._errors],
                              handler_args={"handler_cancellation": True})
        app.on_response_prepare.append(self._headers)
        r = app.router
        r.add_get("/v2/health/live", self._live)
        r.add_get("/v2/health/ready", self._ready)
        r.add_get("/v2", self._server_metadata)
        r.add_get("/v2/models/stats", self._statistics)  # before /v2/models/{name}
        r.add_post("/v2/repository/index", self._repository_index)
        for action in ("load", "unload"):
            r.add_post("/v2/repository/models/{name}/" + action, self._repository_action)
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            r.add_get(prefix, self._model_metadata)
            r.add_get(prefix + "/ready", self._model_ready)
            r.add_get(prefix + "/config", self._model_config)
            r.add_get(prefix + "/stats", self._statistics)
            r.add_post(prefix + "/infer", self._infer)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error leaves as {"error": ...}; infer failures are counted by reason."""
        started = time.perf_counter()
        try:
            return await handler(request)
        except asyncio.CancelledError:  # the client went away (handler_cancellation), or
            # the server closed the connection at shutdown: counted, nobody to answer
            if request.path.endswith("/infer"):
                reason = "Cancelled" if self.engine.draining else "ClientDisconnected"
                self.metrics.request_failure(reason, time.perf_counter() - started)
            raise
        except ServingError as exc:  # includes ClientDisconnected: counted, not logged
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
        except Exception:  # noqa: BLE001 - a bug answers 500 and is logged, not hidden
            error_id = uuid.uuid4().hex[:12]
            logger.exception("internal error %s on %s %s", error_id, request.method, request.path)
            reason, status, headers = "InternalError", 500, None
            message = f"internal error (id {error_id}; the server log has the details)"
        if request.path.endswith("/infer"):
            self.metrics.request_failure(reason, time.perf_counter() - started)
        return _error(status, message, headers)

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """While draining, tell keep-alive clients to reconnect elsewhere."""
        if self.engine.draining:
            response.headers["Connection"] = "close"
            response.force_close()

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        health = self.engine.health()
        if not health.ready:
            return _error(503, f"not ready: {health.reason}")
        return web.json_response({"ready": True})

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(model_config.server_metadata())

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
        return web.json_response(model_config.model_metadata(self.engine.manifest,
                                                             self.config.mode))

    async def _model_config(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return web.json_response(model_config.model_config(self.engine.manifest, self.config))

    async def _statistics(self, request: web.Request) -> web.Response:
        """Triton's statistics extension; each model's entry adds "coded" (the coded-serving
        counters, which Triton's statistics have no field for)."""
        if "name" in request.match_info:
            self._check_model(request)
        snapshot = self.engine.statistics()
        stats = model_config.model_statistics(self.engine.manifest, snapshot)
        stats["coded"] = model_config.coded_statistics(snapshot)
        if self.engine.shadow is not None:  # the running decode-quality check (runtime/shadow.py)
            stats["coded"]["shadow"] = self.engine.shadow.statistics()
        return web.json_response({"model_stats": [stats]})

    async def _repository_index(self, request: web.Request) -> web.Response:
        ready_only = _ready_only(await self._read_body(request))
        health = self.engine.health()
        models = model_config.repository_index(self.engine.manifest, health.ready,
                                               health.reason or "")
        if ready_only:
            models = [m for m in models if m["state"] == "READY"]
        return web.json_response(models)

    async def _repository_action(self, request: web.Request) -> web.Response:
        """This server serves one model, loaded at start: loading it is a no-op; unloading
        is refused (stop the server instead)."""
        self._check_model(request)
        if request.path.endswith("/unload"):
            raise BadRequest(f"model {self.model_name!r} cannot be unloaded: this server serves "
                             "it from start to shutdown; stop the server instead")
        return web.json_response({})

    async def _infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        self._check_model(request)
        async with self.engine.admit() as admission:  # 503 from the headers, before the body
            parsed = await self._read_request(request)
            result = await self.engine.infer(admission, parsed.raw, parsed.timeout_s)
        parameters: dict[str, Any] = result.parameters(self.config.mode)
        body, headers = encode_response(self.model_name, parsed.request_id, result.tensors,
                                        parsed.outputs, parsed.binary_default, parameters)
        content_type = headers.pop("Content-Type")
        self.metrics.request_success(time.perf_counter() - started)
        return web.Response(body=body, headers=headers, content_type=content_type)

    async def _read_request(self, request: web.Request) -> InferRequest:
        body = await self._read_body(request)
        if not body:
            raise BadRequest("empty request body; send a KServe v2 JSON inference request")

        args = (body, request.headers.get(HEADER_LENGTH), self.engine.manifest.input,
                self.output_names, self.config.max_batch_size, self.model_name,
                request.match_info.get("version"))
        if len(body) <= self.config.large_body_bytes:
            return parse_infer_request(*args)
        return await asyncio.get_running_loop().run_in_executor(
            self._large_body_parser(), parse_infer_request, *args)

    async def _read_body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the "
                                  f"{self.config.max_body_bytes}-byte limit (--max-body-bytes)")
        try:
            async with asyncio.timeout(self.config.read_timeout_s):  # no task, unlike wait_for
                body = await request.read()
        except TimeoutError:
            raise BodyTimeout(f"request body not received within {self.config.read_timeout_s:g} s "
                              "(--read-timeout-s); check Content-Length") from None
        except (ConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ClientDisconnected(f"client went away mid-body: {exc}") from None
        except HttpProcessingError as exc:  # e.g. a bad chunk size arriving after the headers
            raise BadRequest(f"malformed request body framing: {exc.message}") from None
        return body
