"""`python -m bench overload BUNDLE`: goodput and tail latency when offered more than capacity.

Capacity first: `base_connections` closed-loop connections, each sending batch-`batch`
binary KServe v2 requests back to back; its goodput (200 responses/s) is the capacity. Then,
in the same server run, closed-loop load at each multiplier x `base_connections`. Each step
warms up for `warmup_s`, then measures `duration_s`: goodput (requests and queries/s), p50 /
p99 latency of the admitted (200) requests, 503s (count, per second), every other status,
client errors, the server's RSS (peak, from /proc every 0.25 s) and the CPU time of server
and client. By default the clients do not back off on 503 (Retry-After is ignored): the
worst case; `--honor-retry-after` makes each wait its Retry-After first (well-behaved clients).

Client: aiohttp in this process (the server is its own process), with the load generator's
images (bench/loadgen.py `make_images`), not wrk. wrk 4.1 counts statuses (Lua `response()`)
but cannot report what this needs: its latency histogram mixes every response, so fast 503s
pull its p99 down and the p99 of the admitted requests is not in it; Lua gets no per-request
latency to separate them (one `request()`/`response()` pair per connection would need a
thread per connection and a clock through FFI); and it gives no per-second series.

Verdicts: goodput at the largest multiplier >= 80 % of the capacity; RSS bounded: every
step's peak RSS <= 1.25 x the capacity step's peak (the queue is bounded, so memory must be).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code, refuse_coding_in
from bench.entry import bench_main
from bench.errors import BenchError
from bench.loadgen import make_images
from bench.machine import machine_info, machine_label
from bench.serverproc import ServerProcess
from bench.soakload import ProcSampler, per_second, percentiles
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import MANIFEST_NAME, Manifest
from runtime.protocol import HEADER_LENGTH

logger = logging.getLogger(__name__)

GOODPUT_TARGET = 0.8  # goodput at the largest multiplier / capacity
RSS_BOUND = 1.25  # any step's peak RSS / the capacity step's peak
NUM_BODIES = 16  # distinct request bodies, encoded before timing


class OverloadBenchError(BenchError):
    """Invalid overload-benchmark configuration."""


@dataclass
class OverloadConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to serve, "N,K"; None = its first
    duration_s: float = 20.0  # measured, per step
    warmup_s: float = 3.0  # per step, before the measurement
    batch: int = 8
    base_connections: int = 32
    multipliers: tuple[int, ...] = (1, 2, 4, 8)
    mode: str = "coded"
    client_timeout_s: float = 60.0
    settle_s: float = 1.0  # pause between steps
    honor_retry_after: bool = False  # a client that got 503 waits its Retry-After (capped at 5 s)
    seed: int = 0
    server_args: tuple[str, ...] = ()
    out_dir: str = "bench/results/overload"
    run_dir: str = "runs/bench/overload"
    tag: str = ""

    def __post_init__(self) -> None:
        self.multipliers = tuple(int(m) for m in self.multipliers)
        self.server_args = tuple(self.server_args)
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise OverloadBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], OverloadBenchError)
        refuse_coding_in("--server-args", self.server_args, OverloadBenchError)
        if not self.multipliers or min(self.multipliers) < 1:
            raise OverloadBenchError(f"--multipliers must be integers >= 1, got {list(self.multipliers)}")
        for name in ("batch", "base_connections"):
            if getattr(self, name) < 1:
                raise OverloadBenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.duration_s > 0 and self.warmup_s >= 0 and self.settle_s >= 0 and self.client_timeout_s > 0):
            raise OverloadBenchError("--duration-s and --client-timeout-s must be > 0, --warmup-s and "
                                     "--settle-s >= 0")


def request_bodies(m: Manifest, batch: int, seed: int) -> list[tuple[bytes, dict[str, str]]]:
    """NUM_BODIES binary-extension requests of `batch` seeded random UINT8 images each."""
    images = make_images(tuple(m.input.shape), NUM_BODIES * batch, seed).reshape(NUM_BODIES, batch, *m.input.shape)
    bodies = []
    for x in images:  # [batch, C, H, W]
        raw = x.tobytes()
        header = json.dumps({"inputs": [{"name": m.input.name, "shape": list(x.shape), "datatype": "UINT8",
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
        bodies.append((header + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}))
    return bodies


def _seconds(retry_after: str) -> float:
    try:
        return max(0.0, float(retry_after))
    except ValueError:  # an HTTP date: not sent by this server
        return 1.0


def _client_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def run_step(url: str, bodies: list[tuple[bytes, dict[str, str]]], connections: int,
                   config: OverloadConfig, pid: int) -> dict[str, Any]:
    """`connections` closed-loop clients for warmup_s + duration_s; counts cover the whole step,
    rates and latencies the measured window only."""
    import aiohttp

    sampler = ProcSampler(pid)
    statuses: Counter[int] = Counter()  # whole step, every response
    errors: Counter[str] = Counter()  # whole step, requests without a response
    rows: list[tuple[float, float, int, int]] = []  # window: t_end - w0, latency_s, status, batch
    sent = 0
    t0 = time.perf_counter()
    w0 = t0 + config.warmup_s
    w1 = w0 + config.duration_s

    async def client(session: aiohttp.ClientSession, j: int) -> None:
        nonlocal sent
        while (started := time.perf_counter()) < w1:
            body, headers = bodies[(j + sent) % len(bodies)]
            sent += 1
            status, retry_after = 0, ""
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After", "1")
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
            ended = time.perf_counter()
            if status:
                statuses[status] += 1
            if w0 <= ended < w1:
                rows.append((ended - w0, ended - started, status, config.batch))
            if status == 503 and config.honor_retry_after:
                await asyncio.sleep(min(_seconds(retry_after), 5.0, max(0.0, w1 - ended)))

    cpu0, client0 = sampler.sample(), _client_cpu_s()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(t0, 0.25, stop))
    timeout = aiohttp.ClientTimeout(total=config.client_timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout) as session:
        await asyncio.wait_for(asyncio.gather(*(client(session, j) for j in range(connections))),
                               config.warmup_s + config.duration_s + config.client_timeout_s + 10)
    wall_s = time.perf_counter() - t0
    stop.set()
    await sampling
    cpu1, client1 = sampler.sample(), _client_cpu_s()
    window = Counter(r[2] for r in rows)
    ok_lat = [r[1] * 1e3 for r in rows if r[2] == 200]
    rss = [s["rss_mib"] for s in sampler.samples]
    return {
        "connections": connections, "wall_s": round(wall_s, 3),
        "goodput_rps": window[200] / config.duration_s, "goodput_qps": window[200] * config.batch / config.duration_s,
        "latency_ok_ms": percentiles(ok_lat),
        "rejected_503": window[503], "rejected_503_per_s": window[503] / config.duration_s,
        "window_statuses": {str(k): v for k, v in sorted(window.items())},
        "sent": sent, "statuses": {str(k): v for k, v in sorted(statuses.items())}, "errors": dict(errors),
        "answered": sum(statuses.values()), "unanswered": sum(errors.values()),
        "rss_peak_mib": max(rss) if rss else None, "rss_start_mib": rss[0] if rss else None,
        "server_cpu_util": None if cpu0 is None or cpu1 is None else (cpu1["cpu_s"] - cpu0["cpu_s"]) / wall_s,
        "client_cpu_util": (client1 - client0) / wall_s,
        "per_second": per_second(rows, config.duration_s),
    }


async def run_steps(config: OverloadConfig, m: Manifest, srv: ServerProcess) -> list[dict[str, Any]]:
    assert srv.proc is not None  # started by the caller's `with`
    url = f"{srv.url}/v2/models/{m.model_name}/infer"
    bodies = request_bodies(m, config.batch, config.seed)
    plan = [("capacity", 1), *((f"{x}x", x) for x in config.multipliers)]
    steps = []
    for name, mult in plan:
        step = await run_step(url, bodies, mult * config.base_connections, config, srv.proc.pid)
        steps.append({"step": name, "multiplier": mult, **step})
        logger.info("%s (%d connections): goodput %.1f req/s, p99 %.1f ms, 503 %d, other %s, errors %s, "
                    "RSS peak %.0f MiB, server CPU %.2f, client CPU %.2f", name, step["connections"],
                    step["goodput_rps"], step["latency_ok_ms"].get("p99", float("nan")), step["rejected_503"],
                    step["window_statuses"], step["errors"], step["rss_peak_mib"] or 0,
                    step["server_cpu_util"] or 0, step["client_cpu_util"])
        await asyncio.sleep(config.settle_s)  # every request of the step was answered; let the server settle
    return steps


def verdicts(steps: list[dict[str, Any]]) -> dict[str, Any]:
    capacity = steps[0]
    top = max(steps[1:], key=lambda s: (s["multiplier"], s["connections"]))
    cap = capacity["goodput_rps"]
    ratios = {s["step"]: (s["goodput_rps"] / cap if cap else None) for s in steps[1:]}
    rss_cap = capacity["rss_peak_mib"]
    rss_ratio = max(s["rss_peak_mib"] / rss_cap for s in steps) if rss_cap else None
    return {"capacity_rps": cap, "goodput_ratio_vs_capacity": ratios, "largest": top["step"],
            "goodput_target": GOODPUT_TARGET, "rss_bound": RSS_BOUND,
            "goodput_at_largest_ok": bool(cap and top["goodput_rps"] >= GOODPUT_TARGET * cap),
            "rss_peak_ratio_max": rss_ratio,
            "rss_bounded": bool(rss_ratio is not None and rss_ratio <= RSS_BOUND),
            "p99_ok_ms": {s["step"]: s["latency_ok_ms"].get("p99") for s in steps}}


def run(config: OverloadConfig) -> dict[str, Any]:
    from runtime.loops import loop_factory

    info = machine_info()
    logger.info("overload bench: %s", json.dumps(asdict(config)))
    logger.info("machine: %s", machine_label(info))
    m = load_code(config.bundle, config.coding)
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    args = ["--mode", config.mode, *coding_server_args(config.coding), "--log-level", "WARNING",
            *config.server_args]
    with ServerProcess(config.bundle, args, run_dir / "server.log") as srv:
        factory, _ = loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            steps = runner.run(run_steps(config, m, srv))
    result = {"benchmark": "overload", "config": asdict(config), "machine": info,
              "server": {"command": srv.command, "ready_s": srv.ready_s, "log": str(run_dir / "server.log")},
              "code": m.code.label, "n": m.coding.n, "k": m.coding.k, "steps": steps, "verdicts": verdicts(steps)}
    suffix = f"-{config.tag}" if config.tag else ""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"overload{suffix}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    from bench.plots import overload_figure

    png = overload_figure(result, out_dir / f"overload{suffix}.png",
                          f"{config.mode}, n={m.coding.n} k={m.coding.k}, batch {config.batch}, closed loop, "
                          f"{'waits Retry-After' if config.honor_retry_after else 'no back-off'} on 503"
                          f" — {machine_label(info)}")
    logger.info("verdicts: %s", json.dumps(result["verdicts"]))
    logger.info("wrote %s and %s", json_path, png)
    return result


_SPECIAL = ("bundle", "multipliers", "server_args")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=OverloadConfig.bundle)
    p.add_argument("--multipliers", default="1,2,4,8", help="connection multipliers of the capacity step")
    p.add_argument("--server-args", default="", help="extra server flags, space separated")
    add_dataclass_flags(p, OverloadConfig, skip=_SPECIAL, helps={"coding": CODING_HELP})
    return p


def config_from_args(args: argparse.Namespace) -> OverloadConfig:
    try:
        multipliers = tuple(int(x) for x in args.multipliers.split(",") if x)
    except ValueError as exc:
        raise OverloadBenchError(f"--multipliers must be comma-separated integers, got {args.multipliers!r}") from exc
    values = dataclass_values(OverloadConfig, {k: v for k, v in vars(args).items() if k not in _SPECIAL})
    return OverloadConfig(bundle=args.bundle, multipliers=multipliers, server_args=tuple(args.server_args.split()),
                          **values)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), config_from_args, run,
                      (OverloadBenchError,))

