"""KServe v2 HTTP load generator, run as its own process: `python -m bench.loadgen ...`.

It runs apart from the benchmark driver and from the server so that client-side work
(JSON encoding, the event loop, timing) never shares an interpreter with either: the
latency bench starts one of these per measurement and reads back its JSON record.

Three arrival patterns:
- `waves`: the paper's setup. `concurrency` queries (k: one coding group) are sent at once;
  the next wave goes out when every query of this one is answered. Groups are always full,
  so a mode that answers queries one by one is not charged for partial groups.
- `closed`: `concurrency` clients, each sends its next query as soon as its previous one
  is answered (queries of one group may then straddle two groups). With `duration_s` > 0
  the clients stop starting queries after that many seconds (`num_requests` is then only
  a cap): a capacity measurement that takes the same time on a fast and a slow server.
- `poisson`: open loop, exponential inter-arrival times at `rate_per_s`, scheduled in
  advance from `seed`. Latency is measured from the *scheduled* send time, so a client
  that falls behind (or hits `max_in_flight`) adds to the latency instead of hiding it
  (no coordinated omission).

Every record also holds each request's actual send time (`sent_s`, from the start of the
measurement): `send_stats` compares the achieved send rate with the schedule, so a run in
which the load generator itself fell behind says so instead of passing for server latency.

Requests carry one UINT8 image `[1, C, H, W]` as a JSON tensor named `input_name`; the
images are seeded random bytes (timing does not depend on the content). A response's
`parameters[reconstructed_param]` says whether its answer was decoded from coded results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from kernels.configs import add_dataclass_flags, check_keys, field_names, strict_from_dict
from runtime.manifest import INPUT_NAME, RECONSTRUCTED_OUTPUT

logger = logging.getLogger(__name__)

PATTERNS = ("waves", "closed", "poisson")


class LoadgenError(BenchError):
    """Invalid load-generator configuration or unusable record."""


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    model_name: str = "mnist-iresnet"
    input_name: str = INPUT_NAME
    input_shape: tuple[int, ...] = (1, 28, 28)  # C, H, W of one query
    pattern: str = "closed"
    num_requests: int = 1000
    concurrency: int = 1  # waves / closed loop: queries in flight
    rate_per_s: float = 0.0  # poisson only
    duration_s: float = 0.0  # closed only: stop starting queries after this (0: send num_requests)
    max_in_flight: int = 512  # poisson only: bound on concurrent connections
    warmup_requests: int = 0  # sent closed-loop first, not recorded
    timeout_s: float = 30.0
    seed: int = 0
    num_images: int = 64
    reconstructed_param: str = RECONSTRUCTED_OUTPUT  # the response parameter has the output's name
    binary_input: bool = True  # KServe binary tensor extension (as tritonclient sends it)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if not self.url.startswith(("http://127.0.0.1", "http://localhost")):
            raise LoadgenError(
                f"url must point at this machine (http://127.0.0.1:PORT), got {self.url!r}"
            )
        if self.pattern not in PATTERNS:
            raise LoadgenError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise LoadgenError(f"input_shape must be 3 positive ints (C,H,W), got {self.input_shape}")
        for name in ("num_requests", "concurrency", "max_in_flight", "num_images"):
            if getattr(self, name) < 1:
                raise LoadgenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_requests < 0:
            raise LoadgenError(f"warmup_requests must be >= 0, got {self.warmup_requests}")
        if self.timeout_s <= 0:
            raise LoadgenError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.duration_s < 0 or (self.duration_s > 0 and self.pattern != "closed"):
            raise LoadgenError(f"duration_s must be >= 0 and is for pattern 'closed' only, got "
                               f"{self.duration_s} with pattern {self.pattern!r}")
        if self.pattern == "poisson" and not self.rate_per_s > 0:
            raise LoadgenError(
                f"pattern 'poisson' needs rate_per_s > 0, got {self.rate_per_s}; pass --rate-per-s"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadConfig:
        return strict_from_dict(cls, d, LoadgenError)


@dataclass
class LoadRecord:
    """What one load-generator run measured; `latency_ms[i]` belongs to request i."""

    config: dict[str, Any]
    wall_s: float
    latency_ms: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)  # HTTP status, 0 = no response
    reconstructed: list[bool] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent_s: list[float] = field(default_factory=list)  # when request i's POST began, from the start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadRecord:
        keys = field_names(cls)  # a record always has every field
        check_keys("load record", d, keys, keys, LoadgenError)
        return cls(**d)


def poisson_arrivals_s(rate_per_s: float, num: int, seed: int) -> np.ndarray:
    """Send offsets (s) of `num` Poisson arrivals: cumulative exponential gaps, first at 0."""
    if not rate_per_s > 0 or num < 1:
        raise LoadgenError(f"need rate_per_s > 0 and num >= 1, got {rate_per_s}, {num}")
    gaps_s = np.random.default_rng(seed).exponential(1.0 / rate_per_s, size=num)  # (num,)
    gaps_s[0] = 0.0
    return np.cumsum(gaps_s)


def make_images(shape: tuple[int, ...], num: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(num, *shape), dtype=np.uint8)


def infer_body(image: np.ndarray, input_name: str) -> bytes:
    """KServe v2 JSON request for one UINT8 query `[C, H, W]` sent as `[1, C, H, W]`."""
    payload = {
        "inputs": [
            {
                "name": input_name,
                "shape": [1, *image.shape],
                "datatype": "UINT8",
                "data": image.reshape(-1).tolist(),
            }
        ]
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def infer_body_binary(image: np.ndarray, input_name: str) -> tuple[bytes, int]:
    """Binary-extension request: (JSON header + raw bytes, JSON header length)."""
    raw = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    header = json.dumps({"inputs": [{"name": input_name, "shape": [1, *image.shape], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": len(raw)}}]},
                        separators=(",", ":")).encode()
    return header + raw, len(header)


def request_for(image: np.ndarray, config: LoadConfig) -> tuple[bytes, dict[str, str]]:
    """Encoded body and HTTP headers of one query, per config.binary_input."""
    if config.binary_input:
        body, header_len = infer_body_binary(image, config.input_name)
        return body, {"Content-Type": "application/octet-stream",
                      "Inference-Header-Content-Length": str(header_len)}
    return infer_body(image, config.input_name), {"Content-Type": "application/json"}


def parse_reconstructed(body: bytes, param: str) -> bool:
    """Whether a KServe v2 JSON response says it was reconstructed (missing param = False)."""
    params = json.loads(body).get("parameters") or {}
    return bool(params.get(param, False))


def summarize(latency_ms: list[float] | np.ndarray, num_ok: int, wall_s: float) -> dict[str, float]:
    """p50/p99/p99.9/mean/max latency (ms, linear-interpolated percentiles) and requests/s."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    if lat.size == 0:
        raise LoadgenError("no successful requests to summarize: check the server log")
    p50, p99, p999 = np.percentile(lat, [50.0, 99.0, 99.9])
    return {
        "count": int(lat.size),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "p99.9_ms": float(p999),
        "mean_ms": float(lat.mean()),
        "max_ms": float(lat.max()),
        "throughput_rps": float(num_ok / wall_s) if wall_s > 0 else 0.0,
    }


def summarize_record(record: LoadRecord) -> dict[str, float]:
    ok = [lat for lat, st in zip(record.latency_ms, record.status, strict=True) if st == 200]
    stats = summarize(ok, len(ok), record.wall_s)
    stats["failed"] = len(record.status) - len(ok)
    stats["reconstructed_fraction"] = float(np.mean(record.reconstructed)) if ok else 0.0
    return stats


def _peak_overlap(starts_s: np.ndarray, ends_s: np.ndarray) -> int:
    """Most intervals [start, end) open at once (an end before a start at the same instant)."""
    times = np.concatenate([starts_s, ends_s])
    steps = np.concatenate([np.ones(starts_s.size, np.int64), -np.ones(ends_s.size, np.int64)])
    order = np.lexsort((steps, times))  # by time, ends (-1) first on ties
    return int(np.cumsum(steps[order]).max()) if times.size else 0


def send_stats(record: LoadRecord) -> dict[str, float | int]:
    """How well the load generator kept to its schedule (Poisson records only).

    `scheduled_rate_per_s` is the rate of the seeded arrival schedule itself (it differs
    from `rate_per_s` by sampling noise, about 1/sqrt(n)); `send_rate_ratio` = achieved /
    scheduled, so a ratio below 1 means requests went out late: either this process was
    short of CPU, or `max_in_flight` requests were already open (`peak_in_flight` says
    which). `send_lag_*_ms`: actual minus scheduled send time."""
    cfg = record.config
    if cfg.get("pattern") != "poisson" or len(record.sent_s) < 2:
        raise LoadgenError(f"send_stats needs a poisson record of >= 2 requests, got pattern "
                           f"{cfg.get('pattern')!r} with {len(record.sent_s)}")
    n = len(record.sent_s)
    sched_s = poisson_arrivals_s(float(cfg["rate_per_s"]), n, int(cfg["seed"]))  # (n,)
    sent_s = np.asarray(record.sent_s, dtype=np.float64)  # (n,)
    lag_ms = (sent_s - sched_s) * 1e3
    ends_s = sched_s + np.asarray(record.latency_ms, dtype=np.float64) / 1e3
    scheduled = (n - 1) / max(float(sched_s[-1]), 1e-9)
    achieved = (n - 1) / max(float(sent_s.max() - sent_s.min()), 1e-9)
    p50, p99 = np.percentile(lag_ms, [50.0, 99.0])
    return {"target_rate_per_s": float(cfg["rate_per_s"]), "scheduled_rate_per_s": scheduled,
            "achieved_send_rate_per_s": achieved, "send_rate_ratio": achieved / scheduled,
            "send_lag_p50_ms": float(p50), "send_lag_p99_ms": float(p99), "send_lag_max_ms": float(lag_ms.max()),
            "peak_in_flight": _peak_overlap(sent_s, ends_s), "max_in_flight": int(cfg["max_in_flight"])}


async def run_load(config: LoadConfig) -> LoadRecord:
    """Drive the server with `config`'s pattern; one aiohttp session, bounded loops."""
    import aiohttp  # the tests and the driver import this module without needing aiohttp

    images = make_images(config.input_shape, config.num_images, config.seed)
    requests = [request_for(img, config) for img in images]  # encoded once, before timing
    url = f"{config.url.rstrip('/')}/v2/models/{config.model_name}/infer"
    n = config.num_requests
    latency_ms = [0.0] * n
    sent_at = [0.0] * n  # absolute perf_counter time of each POST
    status = [0] * n
    reconstructed = [False] * n
    errors: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    limit = config.max_in_flight if config.pattern == "poisson" else config.concurrency
    connector = aiohttp.TCPConnector(limit=max(limit, 1), force_close=False)

    async def one(session: aiohttp.ClientSession, i: int, t0: float) -> None:
        """Send request i; latency counts from t0 (its scheduled or actual send time)."""
        body, headers = requests[i % len(requests)]
        if i >= 0:
            sent_at[i] = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                st = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            st, raw = 0, b""
            if i >= 0:
                errors[type(exc).__name__] += 1
        if i < 0:  # warm-up request: not recorded
            return
        latency_ms[i] = (time.perf_counter() - t0) * 1e3
        status[i] = st
        if st == 200:
            try:
                reconstructed[i] = parse_reconstructed(raw, config.reconstructed_param)
            except (ValueError, AttributeError):
                errors["bad_response_json"] += 1
        elif st:
            errors[f"http_{st}"] += 1
            if errors[f"http_{st}"] == 1:  # log each kind once, not 5,000 times
                logger.warning("HTTP %d: %s", st, raw[:200].decode(errors="replace"))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up: closed loop at the configured concurrency, results discarded.
        for start in range(0, config.warmup_requests, config.concurrency):
            stop = min(start + config.concurrency, config.warmup_requests)
            await asyncio.gather(*(one(session, -1, time.perf_counter()) for _ in range(start, stop)))

        t_start = time.perf_counter()
        if config.pattern == "waves":
            for start in range(0, n, config.concurrency):
                stop = min(start + config.concurrency, n)
                t_wave = time.perf_counter()
                await asyncio.gather(*(one(session, i, t_wave) for i in range(start, stop)))
        elif config.pattern == "closed":
            next_index = iter(range(n))  # shared by the clients: each index sent once
            deadline = t_start + config.duration_s if config.duration_s > 0 else float("inf")

            async def client() -> None:
                while time.perf_counter() < deadline and (i := next(next_index, None)) is not None:
                    await one(session, i, time.perf_counter())

            await asyncio.gather(*(client() for _ in range(config.concurrency)))
            n = next(next_index, n)  # the first index no client took: requests sent
        else:
            offsets_s = poisson_arrivals_s(config.rate_per_s, n, config.seed)
            slots = asyncio.Semaphore(config.max_in_flight)

            async def scheduled(i: int, t_sched: float) -> None:
                async with slots:
                    await one(session, i, t_sched)

            tasks = []
            for i, off in enumerate(offsets_s):
                t_sched = t_start + float(off)
                delay_s = t_sched - time.perf_counter()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                tasks.append(asyncio.create_task(scheduled(i, t_sched)))
            await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - t_start

    cfg = asdict(config)
    cfg["input_shape"] = list(config.input_shape)
    return LoadRecord(
        config=cfg,
        wall_s=wall_s,
        latency_ms=latency_ms[:n],
        status=status[:n],
        reconstructed=reconstructed[:n],
        errors={k: v for k, v in errors.items() if v},
        sent_s=[t - t_start for t in sent_at[:n]],
    )


def _run(config: LoadConfig) -> LoadRecord:
    try:
        import uvloop  # lower client overhead where available

        return uvloop.run(run_load(config))
    except ImportError:
        return asyncio.run(run_load(config))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-shape", default=",".join(map(str, LoadConfig.input_shape)),
                   help="C,H,W of one query (default %(default)s)")
    add_dataclass_flags(p, LoadConfig, skip=("input_shape",), choices={"pattern": PATTERNS}, helps={
        "url": "server base URL (127.0.0.1 only)",
        "binary_input": "send the image with the binary tensor extension (default) or as JSON",
    })
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON record")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    values = {k: v for k, v in vars(args).items() if k != "out"}
    try:
        values["input_shape"] = tuple(int(s) for s in str(values["input_shape"]).split(","))
    except ValueError as exc:
        raise LoadgenError(f"--input-shape must be C,H,W integers, got {args.input_shape!r}") from exc
    return LoadConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s loadgen %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except LoadgenError as exc:
        logger.error("%s", exc)
        return 2
    record = _run(config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record.to_dict()))
    ok = sum(1 for s in record.status if s == 200)
    logger.info("%d/%d ok in %.2f s, errors %s", ok, len(record.status), record.wall_s, record.errors)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
