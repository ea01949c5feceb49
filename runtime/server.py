"""The server: explicit lifecycle `startup()` -> serve -> `shutdown()` (uvicorn's `Server`).

Start-up order: manifest + checksums -> every protocol listening (live = 200, ready = 503)
-> workers load and warm up -> ready = 200. Shutdown (SIGTERM/SIGINT): ready = 503 and new
requests get 503 + Connection: close, in-flight requests get `drain_timeout_s` to finish,
then the sockets stop accepting and the engine's workers and threads stop.

Protocols: KServe v2 over HTTP (runtime/http_server.py, an aiohttp app) and over gRPC
(runtime/grpc_server.py, its own grpc.aio listener in the same loop). To add one: a module
whose frontend takes the engine, started in `start_listening()` and stopped in `shutdown()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from runtime.config import ServerConfig
from runtime.engine import Engine
from runtime.http_server import HttpFrontend, ProtocolLogger
from runtime.metrics import CONTENT_TYPE

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 0.5  # after the drain: how long handlers still running may finish
LISTEN_LINGER_S = 0.2  # after the drain: connections still in the backlog get their 503


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.model_name = self.engine.model_name
        self.metrics = self.engine.metrics
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.grpc_port: int | None = None
        self._grpc: Any = None  # grpc.aio.Server, imported only when gRPC is on
        self._runners: list[web.AppRunner] = []
        self._sites: list[web.TCPSite] = []
        self._http: HttpFrontend | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def startup(self) -> None:
        """Listen (live = 200, ready = 503), then load and warm up every worker (ready = 200)."""
        await self.start_listening()
        await self.start_workers()

    async def start_listening(self) -> None:
        config = self.config
        self.engine.load_bundle()
        await self.engine.prepare()
        self._http = HttpFrontend(self.engine)
        site, self.http_port = await self._listen(self._http.app(), config.http_port,
                                                  self._http.access_log_class())
        self._sites.append(site)
        if config.grpc_port >= 0:
            from runtime.grpc_server import start_grpc

            self._grpc, self.grpc_port = await start_grpc(self.engine, config.host,
                                                          config.grpc_port)
        if config.metrics_port >= 0:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", self._metrics_handler)
            _, self.metrics_port = await self._listen(metrics_app, config.metrics_port)
        logger.info("serving %s on http://%s:%d, gRPC %s, metrics %s; %s loop=%s",
                    self.model_name, config.host, self.http_port,
                    f"{config.host}:{self.grpc_port}" if self.grpc_port else "off",
                    f"http://{config.host}:{self.metrics_port}/metrics" if self.metrics_port
                    else "off", self.engine.summary(),
                    type(asyncio.get_running_loop()).__module__)

    async def start_workers(self) -> None:
        await self.engine.start_workers()

    async def _listen(self, app: web.Application, port: int,
                      access_log_class: type[AbstractAccessLogger] | None = None
                      ) -> tuple[web.TCPSite, int]:
        """Serve `app` on host:port; returns the site and the bound port (port 0 = any)."""
        # The engine's drain already waited for admitted requests, so the runner's own wait
        # at cleanup is short: shutdown takes drain_timeout_s + the linger, the scheduler's
        # 1 s stop and these 0.5 s waits at most.
        logging_args: dict = ({"access_log": None} if access_log_class is None else
                              {"access_log": logger, "access_log_class": access_log_class,
                               "logger": ProtocolLogger(logger)})
        runner = web.AppRunner(app, shutdown_timeout=CLOSE_TIMEOUT_S,
                               keepalive_timeout=self.config.keepalive_timeout_s, **logging_args)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, port)
        await site.start()
        return site, int(runner.addresses[0][1])

    async def shutdown(self) -> None:
        started = time.monotonic()
        # New requests get 503 + Connection: close while the admitted ones drain; the
        # listener stays open meanwhile, so connections still in its backlog are answered
        # instead of reset by the kernel when it closes.
        self.engine.begin_drain()
        logger.info("shutting down: draining %d in-flight request(s) (up to %.1f s)",
                    self.engine.inflight, self.config.drain_timeout_s)
        if not await self.engine.drain(self.config.drain_timeout_s):
            logger.warning("%d request(s) still in flight after %.1f s; their queued queries "
                           "fail with 503 and their handlers are cancelled at close",
                           self.engine.inflight, self.config.drain_timeout_s)
        await asyncio.sleep(LISTEN_LINGER_S)  # let the accept loop empty the backlog
        for site in self._sites:
            await site.stop()  # stop accepting connections
        if self._grpc is not None:  # drained already: calls still running get CLOSE_TIMEOUT_S
            await self._grpc.stop(CLOSE_TIMEOUT_S)
        await self.engine.stop()
        for runner in self._runners:
            await runner.cleanup()
        if self._http is not None:
            self._http.close()
        logger.info("shut down in %.2f s", time.monotonic() - started)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- running -----------------------------------------------------------------------------
    async def run_until(self, stop: asyncio.Event,
                        on_ready: Callable[[], object] | None = None) -> None:
        """startup(); `on_ready()`; wait for `stop`; shutdown() (always, even if start-up
        fails midway)."""
        try:
            await self.startup()
            if on_ready is not None:
                on_ready()
            await stop.wait()
        finally:
            await self.shutdown()
