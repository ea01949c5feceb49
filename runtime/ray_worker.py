"""The Ray worker backend (`--workers-backend ray`): each of the n workers is a Ray actor.

- Each actor is a threaded actor placed on its own bundle of one placement group with the
  SPREAD strategy (one actor per node where the cluster has the nodes), reserving
  `--ray-num-cpus` / `--ray-num-gpus`. It builds its models from the bundle's bytes, which
  the server read and checked once and ships through Ray's object store (a node needs no
  copy of the bundle, only this package), and checks them against the manifest's sha256
  itself before loading.
- A call is one actor task; the pool awaits its ObjectRef in the server's event loop.
  Cancelling the awaiting task (a loser of a decoded group, runtime.modes.base) calls
  `ray.cancel`: the actor skips the call if it has not started it and cuts its fault delay
  short. Threaded, not async: on 2 cores an async actor's asyncio hand-off cost 1.1 ms more
  per 4-of-5 group than a threaded one (bench ray-overhead), and Ray cancels a threaded
  actor's pending calls just the same (a running one sees `is_canceled()`).
- An actor whose process dies is an erasure for its calls in flight; Ray restarts it
  (`--ray-max-restarts`, no task retries, so nothing runs twice) and the pool's supervisor
  waits for it to answer again (`RayWorker.start`). Restarts exhausted: a new actor.
- Fault injection (runtime.worker.CallFault) acts inside the actor: the kill fault ends its
  process, so Ray's restart path is what recovers.

Ray is imported only when this backend is chosen (the `dist` extra); `serve` stays Ray-free.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.config import ServerConfig
from runtime.context import EngineContext
from runtime.errors import EngineUnavailable, WorkerDead, WorkerError
from runtime.manifest import Manifest
from runtime.models import ModelFactory
from runtime.worker import CallFault, GroupTag, WorkerState

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[dist]' (Ray) on the server and on every node"
RETRY_S = 0.05  # between readiness polls of an actor Ray is restarting
# Threads of one actor: calls wait for the one computing, and a fault delay holds a thread,
# so this bounds the delayed calls of one worker in flight at once (plus the sentinel).
ACTOR_THREADS = 64
SENTINEL_POLL_S = 0.1  # how often a pending sentinel looks whether it was cancelled


def import_ray() -> Any:
    """Ray, imported the first time the backend is used (the only place that imports it)."""
    try:
        import ray
        import ray.util.scheduling_strategies  # noqa: F401 - placement by bundle index
    except ImportError as exc:
        raise EngineUnavailable(f"--workers-backend ray needs Ray: {INSTALL_HINT}") from exc
    return ray


class WorkerActor:
    """One worker inside its Ray actor process (RayBackend makes it a Ray actor class, so
    this module imports without Ray). Calls run on the actor's threads
    (ACTOR_THREADS) but compute one at a time, like one device; a fault's delay holds only
    its own thread, so the actor is free meanwhile."""

    def __init__(self, index: int, names: list[str], config: ServerConfig,
                 manifest: Mapping[str, Any], bundle_dir: str, files: Mapping[str, bytes]
                 ) -> None:
        self.index = index
        factory = ModelFactory(Path(bundle_dir), Manifest.from_dict(manifest), config, files=files)
        self._models = factory.worker_models(index, names)
        for name, batch in factory.warmup_inputs(names).items():
            self._models[name].run(batch)
        self._device = threading.Lock()
        self._count = threading.Lock()
        self._in_progress = 0
        self._stopped = threading.Event()  # never set: see until_stopped

    def ready(self) -> dict[str, Any]:
        ray = import_ray()
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    def until_stopped(self) -> None:
        """Returns only once cancelled: a call the server keeps pending, so that it fails
        the moment this actor's process or node is lost, even with no other call in
        flight (a cancelled sentinel frees its thread)."""
        cancelled = import_ray().get_runtime_context().is_canceled
        while not self._stopped.wait(SENTINEL_POLL_S):
            if cancelled():
                return

    def calls_in_progress(self) -> int:
        """Calls begun and not yet ended (computing, waiting to, or held by a fault delay)."""
        return self._in_progress

    def run(self, model: str, batch: np.ndarray, fault: CallFault | None = None
            ) -> np.ndarray | None:
        if fault is not None and fault.die:
            logger.warning("%s: ending this actor's process", fault.die)
            os._exit(1)  # the process dies as a crashed node would; Ray restarts it
        runner = self._models.get(model)
        if runner is None:
            raise WorkerError(f"worker {self.index} has no model {model!r}; it has "
                              f"{sorted(self._models)}")
        with self._count:
            self._in_progress += 1
        cancelled = import_ray().get_runtime_context().is_canceled
        try:
            with self._device:
                if cancelled():  # cancelled while it waited for the device: never run it
                    return None
                result = runner.run(batch)
            if fault is not None:
                fault.after_run_blocking(self.index, cancelled)
            return result
        finally:
            with self._count:
                self._in_progress -= 1


class RayWorker:
    """The server's handle on worker `index`'s actor. `stop()` lets the actor live (Ray
    restarts it, and the next incarnation's `start()` waits for that); the backend's
    `close()` ends every actor."""

    def __init__(self, backend: RayBackend, index: int, incarnation: int) -> None:
        self.index = index
        self.incarnation = incarnation
        self.state = WorkerState.NEW
        self._backend = backend
        self._ray = backend.ray
        self._actor: Any = None
        self._sent: dict[Any, float] = {}  # calls not yet ended in the actor -> when sent

    def __repr__(self) -> str:
        return f"RayWorker({self.index}, incarnation={self.incarnation}, {self.state.value})"

    async def start(self) -> None:
        if self.state is not WorkerState.NEW:
            raise RuntimeError(f"{self!r}: start() needs a new worker")
        self.state = WorkerState.STARTING
        try:
            self._actor = await self._backend.ready_actor(self.index)
        except BaseException:
            self.state = WorkerState.DEAD
            raise
        self.state = WorkerState.READY

    async def run(self, model: str, batch: np.ndarray, group: GroupTag | None = None,
                  fault: CallFault | None = None) -> np.ndarray:
        if self.state is not WorkerState.READY:
            raise WorkerDead(f"worker {self.index} is {self.state.value}")
        exceptions = self._ray.exceptions
        ref = self._actor.run.remote(model, batch, fault)
        self._sent[ref] = time.monotonic()  # until the actor ends it, for busy_s
        ended = True
        try:
            return await ref
        except asyncio.CancelledError:
            # ray.cancel only asks: a pending call is dropped, a running one runs on; it
            # counts as running until the actor ends it (a future only here: off the hot path)
            self._ray.cancel(ref)
            ended = False
            ref.future().add_done_callback(lambda _: self._sent.pop(ref, None))
            raise
        except exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, WorkerError):  # raised by the actor (an injected failure)
                raise cause from None
            raise WorkerError(f"worker {self.index} (Ray actor) failed: "
                              f"{type(cause).__name__}: {cause}") from None
        except exceptions.RayActorError as exc:  # the process died, or Ray is restarting it
            raise WorkerDead(f"worker {self.index}'s Ray actor is down: "
                             f"{str(exc).splitlines()[0]}") from None
        except exceptions.RayError as exc:
            raise WorkerError(f"worker {self.index} (Ray): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}") from None
        finally:
            if ended:
                self._sent.pop(ref, None)

    async def lost(self) -> str:
        sentinel = self._actor.until_stopped.remote()
        try:
            await sentinel
        except asyncio.CancelledError:
            self._ray.cancel(sentinel)
            raise
        except self._ray.exceptions.RayError as exc:
            return f"worker {self.index}'s Ray actor was lost: {str(exc).splitlines()[0]}"
        raise AssertionError("until_stopped returned")

    def busy_s(self) -> float:
        """Age of the oldest call the actor has not ended, cancelled ones included: an
        actor hung in a call whose group was answered without it shows here."""
        sent = list(self._sent.values())
        return time.monotonic() - min(sent) if sent else 0.0

    async def stop(self) -> None:
        """The actor lives on (Ray restarts a dead one) unless a call has been running in it
        past the worker deadline: it may be hung, so its process is ended and Ray restarts
        it."""
        self.state = WorkerState.STOPPED
        deadline_s = self._backend.config.worker_deadline_ms / 1000.0
        if self._actor is not None and self.busy_s() > deadline_s:
            logger.warning("worker %d: ending its Ray actor's process, %.0f ms into a call",
                           self.index, self.busy_s() * 1000)
            self._ray.kill(self._actor, no_restart=False)
        self._sent.clear()


class RayBackend:
    """The n worker actors of one engine, their placement group and, when no
    `--ray-address` is given, the local Ray instance they run in."""

    def __init__(self, context: EngineContext, size: int,
                 worker_models: Callable[[int], list[str]]) -> None:
        self.ray = import_ray()
        self._context = context
        self._size = size
        self._worker_models = worker_models
        self._actors: dict[int, Any] = {}
        self._cluster_lock = asyncio.Lock()
        self._placement: Any = None
        self._files: Any = None  # ObjectRef of the bundle's bytes
        self._started_ray = False
        self._actor_class = self.ray.remote(WorkerActor)
        self.resources: dict[str, float] = {}  # what each actor reserves

    @property
    def config(self) -> ServerConfig:
        return self._context.config

    def actor(self, index: int) -> Any:
        """Worker `index`'s actor handle (None before it was made): for diagnostics."""
        return self._actors.get(index)

    def make_worker(self, index: int, incarnation: int) -> RayWorker:
        return RayWorker(self, index, incarnation)

    # -- the cluster -------------------------------------------------------------------------
    async def _cluster(self) -> None:
        """Once: join or start Ray, put the bundle's bytes in the object store and reserve
        one placement bundle per worker."""
        async with self._cluster_lock:
            if self._placement is not None:
                return
            ray, config = self.ray, self._context.config
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._init_ray)
            total_cpus = ray.cluster_resources().get("CPU", 0.0)
            cpus = config.ray_num_cpus
            if cpus is None:  # share the cluster's CPUs, at most one each
                cpus = min(1.0, math.floor(100 * total_cpus / self._size) / 100) or 0.01
            self.resources = {"CPU": cpus, **({"GPU": config.ray_num_gpus}
                                              if config.ray_num_gpus else {})}
            self.resources = {k: v for k, v in self.resources.items() if v}
            placement = ray.util.placement_group([self.resources] * self._size, strategy="SPREAD")
            try:
                await asyncio.wait_for(placement.ready(), config.ray_start_timeout_s)
            except TimeoutError:
                ray.util.remove_placement_group(placement)
                raise EngineUnavailable(
                    f"Ray could not place {self._size} worker actors reserving {self.resources} "
                    f"each within {config.ray_start_timeout_s:g} s; the cluster has "
                    f"{ray.available_resources()} available. Lower --ray-num-cpus / "
                    "--ray-num-gpus or add nodes") from None
            self._files = ray.put(dict(self._context.models.files))
            self._placement = placement
            nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            logger.info("Ray: %d worker actors, %s each, spread over %d node(s) (%s)",
                        self._size, self.resources, len(nodes),
                        config.ray_address or "a local instance")

    def _init_ray(self) -> None:
        ray, config = self.ray, self._context.config
        if ray.is_initialized():  # this process already joined a cluster (tests, notebooks)
            return
        if config.ray_address is None:
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=config.ray_address)
        self._started_ray = True

    def _new_actor(self, index: int) -> Any:
        strategies = self.ray.util.scheduling_strategies
        config, manifest = self._context.config, self._context.manifest
        options: dict[str, Any] = {
            "num_cpus": self.resources.get("CPU", 0), "num_gpus": self.resources.get("GPU", 0),
            "max_restarts": config.ray_max_restarts, "max_task_retries": 0,  # at most once
            "max_concurrency": ACTOR_THREADS,
            "scheduling_strategy": strategies.PlacementGroupSchedulingStrategy(
                self._placement, placement_group_bundle_index=index)}
        return self._actor_class.options(**options).remote(
            index, self._worker_models(index), config, manifest.to_dict(),
            str(self._context.bundle_dir), self._files)

    async def ready_actor(self, index: int) -> Any:
        """Worker `index`'s actor once it answers (made if it does not exist, or anew when
        Ray gave up restarting it); WorkerError when it cannot start in time."""
        await self._cluster()
        exceptions = self.ray.exceptions
        timeout_s = self._context.config.ray_start_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            actor = self._actors.get(index)
            if actor is None:
                actor = self._actors[index] = self._new_actor(index)
            try:
                info = await asyncio.wait_for(actor.ready.remote(),
                                              max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise WorkerError(f"worker {index}'s Ray actor did not come up within "
                                  f"{timeout_s:g} s (--ray-start-timeout-s)") from None
            except exceptions.ActorUnavailableError:  # Ray is restarting it
                await asyncio.sleep(RETRY_S)
                continue
            except exceptions.ActorDiedError as exc:
                if exc.actor_init_failed:  # its constructor raised: a retry would too
                    del self._actors[index]
                    raise WorkerError(f"worker {index}'s Ray actor failed to start: "
                                      f"{exc}") from None
                logger.warning("worker %d's Ray actor is gone for good (restarts exhausted); "
                               "making a new one", index)
                del self._actors[index]
                continue
            logger.info("worker %d: Ray actor up (pid %s, node %s at %s)", index, info["pid"],
                        info["node_id"][:12], info["node_ip"])
            return actor

    async def close(self) -> None:
        """End every actor and the placement group; shut down the Ray instance this
        backend started."""
        ray = self.ray
        loop = asyncio.get_running_loop()
        actors = list(self._actors.values())

        def close() -> None:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            if self._placement is not None:
                ray.util.remove_placement_group(self._placement)
            if self._started_ray:
                ray.shutdown()

        self._actors = {}
        await loop.run_in_executor(None, close)
        self._placement = None
