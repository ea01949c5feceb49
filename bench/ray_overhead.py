"""`python -m bench ray-overhead [BUNDLE]`: what one coding group costs on Ray actors
against the in-process threads, without HTTP, batching or decoding in the way.

One coding group is n worker calls launched at once; it is done when any k results are
in (what the decoder waits for); the next group starts once all n have ended, so groups
never overlap. Median and p90 over `groups` groups (after `warmup`), at each batch size
(G groups' slot per call: [G, C, H, W]), for:

- `bare-sync`, `bare-async`: n bare Ray actors (sync / async) that return their input:
  Ray's own per-group floor on this machine;
- `thread`: the server's ThreadBackend + WorkerPool running the bundle's f;
- `ray`: the server's RayBackend + WorkerPool running the bundle's f (async actors);

and `ray / thread`, the per-group overhead ratio (the Ray target: p50 <= 2 x thread at
batch 1). A local Ray instance binds to the machine's own address, so this runs only
inside a private network namespace with loopback alone:

    unshare -n sh -c 'ip link set lo up && python -m bench ray-overhead bundles/mnist-default'
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, load_code
from bench.entry import bench_main, comma_list
from bench.errors import BenchError
from bench.machine import machine_info, machine_label

logger = logging.getLogger(__name__)


class RayOverheadError(BenchError):
    """Invalid ray-overhead configuration."""


@dataclass
class RayOverheadConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code (n, k of the group), "N,K"; None = its first
    batches: tuple[int, ...] = (1, 8, 32)
    groups: int = 400
    warmup: int = 40
    out: str = "bench/results/serving/ray-overhead.json"

    def __post_init__(self) -> None:
        self.batches = tuple(int(b) for b in self.batches)
        if not self.batches or min(self.batches) < 1:
            raise RayOverheadError(f"batches must be >= 1, got {self.batches}")
        if self.groups < 10 or self.warmup < 0:
            raise RayOverheadError("groups must be >= 10 and warmup >= 0")
        self.coding = check_coding(self.coding, [self.bundle], RayOverheadError)


def _stats(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


async def _first_k(launch: Any, n: int, k: int, groups: int, warmup: int) -> list[float]:
    """Time to the k-th of n results of `launch()` (a list of n awaitables), per group."""
    out: list[float] = []
    for g in range(warmup + groups):
        t0 = time.perf_counter()
        futures = [asyncio.ensure_future(a) for a in launch()]
        done = 0
        first_k = 0.0
        for fut in asyncio.as_completed(futures):
            await fut
            done += 1
            if done == k:
                first_k = time.perf_counter() - t0
        if g >= warmup:
            out.append(first_k)
    return out


async def _bare(ray: Any, n: int, k: int, x: np.ndarray, config: RayOverheadConfig
                ) -> dict[str, list[float]]:
    @ray.remote(num_cpus=0)
    class SyncEcho:
        def run(self, batch: np.ndarray) -> np.ndarray:
            return batch

    @ray.remote(num_cpus=0)
    class AsyncEcho:
        async def run(self, batch: np.ndarray) -> np.ndarray:
            return batch

    out = {}
    for name, cls in (("bare-sync", SyncEcho), ("bare-async", AsyncEcho)):
        actors = [cls.remote() for _ in range(n)]
        out[name] = await _first_k(lambda actors=actors: [a.run.remote(x) for a in actors],
                                   n, k, config.groups, config.warmup)
        for actor in actors:
            ray.kill(actor)
    return out


async def _pool(backend_name: str, config: RayOverheadConfig, xs: dict[int, np.ndarray]
                ) -> dict[int, list[float]]:
    from runtime.compute_threads import ComputeThreads
    from runtime.config import ServerConfig
    from runtime.context import EngineContext
    from runtime.metrics import Metrics
    from runtime.models import WORKER_F, ModelFactory
    from runtime.pool import WorkerPool
    from runtime.worker import make_backend

    server = ServerConfig(bundle=config.bundle, workers_backend=backend_name, coding=config.coding)
    manifest = load_code(config.bundle, config.coding)
    n, k = manifest.coding.n, manifest.coding.k
    metrics = Metrics(manifest.model_name)
    executor = ComputeThreads(min(n, 2), name="bench-worker")
    context = EngineContext(server, manifest, Path(config.bundle), metrics, executor,
                            ModelFactory(Path(config.bundle), manifest, server))
    backend = make_backend(backend_name, context, n, lambda i: [WORKER_F])
    pool = WorkerPool(n, backend.make_worker, deadline_s=30.0, metrics=metrics)
    await pool.start()
    try:
        return {batch: await _first_k(lambda x=x: [pool.submit(i, WORKER_F, x) for i in range(n)],
                                      n, k, config.groups, config.warmup)
                for batch, x in xs.items()}
    finally:
        await pool.stop()
        await backend.close()
        executor.shutdown()


async def _measure(config: RayOverheadConfig) -> dict[str, Any]:
    import ray

    from bench.netns_cluster import require_loopback_only

    require_loopback_only("bench ray-overhead")
    manifest = load_code(config.bundle, config.coding)
    n, k = manifest.coding.n, manifest.coding.k
    rng = np.random.default_rng(0)
    xs = {b: rng.random((b, *manifest.input.shape), dtype=np.float32) for b in config.batches}
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        bare = await _bare(ray, n, k, xs[config.batches[0]], config)
        thread = await _pool("thread", config, xs)
        on_ray = await _pool("ray", config, xs)
    finally:
        ray.shutdown()
    rows = []
    for batch in config.batches:
        t, r = _stats(thread[batch]), _stats(on_ray[batch])
        rows.append({"batch": batch, "thread": t, "ray": r,
                     "ray_over_thread_p50": round(r["p50_ms"] / t["p50_ms"], 2),
                     "ray_minus_thread_p50_ms": round(r["p50_ms"] - t["p50_ms"], 3)})
        logger.info("batch %3d  thread p50 %.2f ms  ray p50 %.2f ms  ratio %.2f", batch,
                    t["p50_ms"], r["p50_ms"], r["p50_ms"] / t["p50_ms"])
    floors = {name: _stats(samples) for name, samples in bare.items()}
    for name, s in floors.items():
        logger.info("%s (batch %d, echo): p50 %.2f ms", name, config.batches[0], s["p50_ms"])
    return {"code": manifest.code.label, "n": n, "k": k, "rows": rows, "bare": floors}


def run(config: RayOverheadConfig) -> dict[str, Any]:
    info = machine_info()
    logger.info("ray-overhead bench on %s", machine_label(info))
    t0 = time.perf_counter()
    result = asyncio.run(_measure(config))
    record = {"benchmark": "ray-overhead", "config": asdict(config), "machine": info,
              "wall_s": round(time.perf_counter() - t0, 1),
              "definition": "one coding group: n calls at once, time to the k-th result; "
                            "groups never overlap", **result}
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", out)
    return record


def build_parser() -> Any:
    import argparse

    from kernels.configs import add_dataclass_flags

    p = argparse.ArgumentParser(prog="python -m bench ray-overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=RayOverheadConfig.bundle)
    p.add_argument("--batches", default="1,8,32", help="comma list of groups per call")
    add_dataclass_flags(p, RayOverheadConfig, skip=("bundle", "batches"), helps={"coding": CODING_HELP})
    return p


def config_from_args(args: Any) -> RayOverheadConfig:
    values = {k: v for k, v in vars(args).items() if v is not None and k != "batches"}
    return RayOverheadConfig(**values, batches=tuple(int(b) for b in comma_list(args.batches)))


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), config_from_args, run, (RayOverheadError,))
