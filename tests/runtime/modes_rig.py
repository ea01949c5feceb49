"""The rig of the mode tests (test_modes_*.py): a fake pool whose calls the TEST resolves,
in chosen orders, and the real frontend (ONNX heads and encoders) of the tiny exact bundle.

No server, no sockets, no wall clock: a worker's result is computed with numpy from the
linear tiny model when the test lands it, so coded answers are exact up to float32 rounding.
Two bundles: `tiny` (n=3, k=2, one parity) and `wide` (n=5, k=3, two parities).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from runtime_harness import CHW, EMB, TASKS, D, TinyModel, metric_sample, settle, until

from runtime.batcher import Batch, Block, Piece
from runtime.config import ServerConfig
from runtime.errors import WorkerDead
from runtime.frontend import Frontend
from runtime.manifest import Manifest
from runtime.metrics import Metrics
from runtime.models import ENCODER_THEN_F, WORKER_F, WORKER_F_HEADS, WORKER_PARM, ModelFactory
from runtime.modes import MODES, Mode, ModeOptions
from runtime.worker import GroupTag

PRIMARY = next(iter(TASKS))
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # float32 workers, encoders and decoding


@dataclass(frozen=True)
class QueryAnswer:
    """One query's answer, as the tests read it."""

    logits: dict[str, np.ndarray]  # task -> [classes]
    reconstructed: bool
    unavailable_heads: tuple[str, ...]


def one(block: Block) -> QueryAnswer:
    """The answer of a one-query block."""
    a = block.future.result()
    return QueryAnswer({t: v[0] for t, v in a.logits.items()}, bool(a.reconstructed[0]),
                       a.unavailable_heads)


# -- the rig: bundle, frontend runners, a fake pool ----------------------------------------------
@dataclass
class Rig:
    model: TinyModel
    manifest: Manifest
    heads: dict[str, Any]
    encoders: dict[int, Any]
    executor: ThreadPoolExecutor

    @property
    def k(self) -> int:
        return self.model.k

    @property
    def n(self) -> int:
        return self.model.n


def make_rig(model: TinyModel, executor: ThreadPoolExecutor) -> Rig:
    manifest = Manifest.load(model.bundle)
    factory = ModelFactory(model.bundle, manifest, ServerConfig(bundle=str(model.bundle)))
    return Rig(model, manifest, factory.heads(), factory.encoders(), executor)


def f_numpy(model: TinyModel, x: np.ndarray) -> np.ndarray:
    """The tiny f: x [B, C, H, W] -> z [B, *EMB] (float64)."""
    return (x.reshape(len(x), D).astype(np.float64) @ model.A).reshape(len(x), *EMB)


def logits_numpy(model: TinyModel, z: np.ndarray) -> dict[str, np.ndarray]:
    flat = z.reshape(len(z), D)
    return {t: flat @ model.W[t] + model.b[t] for t in TASKS}


def worker_result(rig: Rig, name: str, batch: np.ndarray) -> np.ndarray:
    """What a healthy worker running `name` returns for `batch` (computed with numpy)."""
    model = rig.model
    if name == WORKER_F:  # [G, C, H, W] -> [G, *EMB]
        out = f_numpy(model, batch)
    elif name.startswith(ENCODER_THEN_F):  # [G, k, C, H, W] -> f(Enc_r(x))
        row = np.asarray(rig.manifest.coding.coefficients[int(name[len(ENCODER_THEN_F):])])
        out = f_numpy(model, np.einsum("j,gj...->g...", row, batch.astype(np.float64)))
    elif name == WORKER_PARM:  # [G, k, C, H, W] -> sum_j primary logits(x_j)
        z = f_numpy(model, batch.astype(np.float64).sum(axis=1))
        out = z.reshape(len(z), D) @ model.W[PRIMARY] + model.k * model.b[PRIMARY]
    elif name == WORKER_F_HEADS:  # [G, C, H, W] -> every head's logits side by side
        out = np.concatenate(list(logits_numpy(model, f_numpy(model, batch)).values()), axis=1)
    else:
        raise AssertionError(f"a mode asked for unknown worker model {name!r}")
    return out.astype(np.float32)


@dataclass
class Call:
    worker: int
    model: str
    batch: np.ndarray
    group: GroupTag | None
    future: asyncio.Future[np.ndarray]


class FakePool:
    """`new_group` + `submit` of runtime.pool.WorkerPool; each call's result lands when the
    test says so (`land`), or the call fails (`fail`: an erasure)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.calls: list[Call] = []
        self.groups: list[GroupTag] = []

    def new_group(self, systematic: Any) -> GroupTag:
        tag = GroupTag(len(self.groups), tuple(systematic))
        self.groups.append(tag)
        return tag

    def submit(self, index: int, model: str, batch: np.ndarray, group: GroupTag | None = None
               ) -> asyncio.Future[np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        self.calls.append(Call(index, model, batch.copy(), group, future))
        return future

    def call(self, worker: int) -> Call:
        (call,) = [c for c in self.calls if c.worker == worker]
        return call

    def land(self, worker: int) -> None:
        call = self.call(worker)
        call.future.set_result(worker_result(self.rig, call.model, call.batch))

    def fail(self, worker: int, error: BaseException | None = None) -> None:
        self.call(worker).future.set_exception(error or WorkerDead(f"worker {worker} died"))


class SpyFrontend(Frontend):
    """The real frontend on the event loop, recording how many rows the heads classify."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(rig.heads, rig.encoders, rig.executor, inline_below_s=float("inf"))
        self.encoded = 0
        self.classified: list[int] = []

    async def encode(self, groups: np.ndarray) -> list[np.ndarray]:
        self.encoded += 1
        return await super().encode(groups)

    async def classify(self, zs: np.ndarray) -> dict[str, np.ndarray]:
        self.classified.append(len(zs))
        return await super().classify(zs)


@dataclass
class Run:
    """One `mode.execute(queries)` under test."""

    rig: Rig
    mode: Mode
    pool: FakePool
    frontend: SpyFrontend
    metrics: Metrics
    xs: np.ndarray  # [m, C, H, W] normalised
    queries: list[Block]  # one block (request) per query, answered as one batch
    task: asyncio.Task[None] | None = None
    stalls: int = 0  # times the mode told the scheduler its dispatch only waits on stragglers

    def begin(self) -> Run:
        """`mode.execute` as a task, without waiting for its worker calls (see `start`)."""
        batch = Batch([Piece(b, 0, 1, q) for q, b in enumerate(self.queries)])

        def stalled() -> None:
            self.stalls += 1

        batch.on_stall = stalled
        self.task = asyncio.create_task(self.mode.execute(batch))
        return self

    async def start(self) -> Run:
        """`begin`, then wait until every worker call the mode makes at once is out."""
        self.begin()
        expected = self.mode.pool_size(self.rig.manifest)
        if self.mode.name in ("uncoded", "replication"):  # only the slots in use are called
            expected = min(len(self.queries), self.rig.k) * type(self.mode).replicas
        await until(lambda: len(self.pool.calls) == expected, f"{expected} worker calls")
        return self

    async def land(self, order: Any, failed: Any = ()) -> None:
        """Each worker of `order` answers (or fails, if in `failed`) on its own loop turn."""
        for worker in order:
            if worker in failed:
                self.pool.fail(worker)
            else:
                self.pool.land(worker)
            await settle()

    async def done(self) -> None:
        assert self.task is not None
        await until(self.task.done, "the mode answered every query")
        assert self.task.exception() is None  # e.g. no future was answered twice

    def answers(self) -> list[QueryAnswer]:
        return [one(q) for q in self.queries]

    def reference(self) -> dict[str, np.ndarray]:
        return logits_numpy(self.rig.model, f_numpy(self.rig.model, self.xs))

    def check(self, reconstructed: Any, context: str = "") -> None:
        """Every query answered exactly (its own logits) with the given reconstructed flags."""
        reference = self.reference()
        for q, answer in enumerate(self.answers()):
            for task in TASKS:
                np.testing.assert_allclose(answer.logits[task], reference[task][q], **TOLERANCE,
                                           err_msg=f"query {q}, head {task} {context}")
        assert [a.reconstructed for a in self.answers()] == list(reconstructed), context
        assert self.count("coded_reconstructed_responses_total") == sum(reconstructed), context

    def count(self, name: str, **labels: str) -> float:
        return metric_sample(self.metrics, name, **labels)


def make_run(rig: Rig, mode: str, m: int, *, seed: int = 0, options: ModeOptions | None = None
             ) -> Run:
    xs = np.random.default_rng(seed).standard_normal((m, *CHW)).astype(np.float32)
    loop = asyncio.get_running_loop()
    queries = [Block(x=xs[q:q + 1], future=loop.create_future(), enqueued_s=0.0)
               for q in range(m)]
    metrics = Metrics("tiny")
    pool = FakePool(rig)
    frontend = SpyFrontend(rig)
    instance = MODES[mode](rig.manifest, pool, frontend, metrics, options)  # type: ignore[arg-type]
    return Run(rig, instance, pool, frontend, metrics, xs, queries)


def decodable_prefix(order: Any, failed: Any, needed: int) -> list[int] | None:
    """The successful results, in arrival order, up to the one that makes the group
    decodable (`needed` distinct results), or None when it never is."""
    received: list[int] = []
    for worker in order:
        if worker not in failed:
            received.append(worker)
            if len(received) == needed:
                return received
    return None


def flags(m: int, k: int, missing: Any) -> list[bool]:
    return [q % k in missing for q in range(m)]
