"""`python -m bench soak BUNDLE`: a long run under faults in which every answer is checked.

The real server (bench/serverproc.py `ServerProcess`) runs with random worker failures,
kills and delays (`--fault-*`). `clients` closed-loop clients in this process (asyncio +
aiohttp; the server is its own process, so the two never share an interpreter) send real
test images (batch 1..max_batch, UINT8 or FP32, JSON or binary tensors, JSON or binary
outputs) with unique ids, and a `malformed_fraction` of broken requests (bench/soakload.py
`MALFORMED`: bad JSON, wrong shapes and dtypes, booleans, lying header lengths, ...).
Every response is checked (bench/soakload.py `Checker`):

- well-formed: 200 with the echoed id, each id answered once, tensors of the right shapes,
  `reconstructed` per query consistent with the response parameter; a query answered with
  reconstructed=false must have the reference class (ONNX Runtime on f.onnx + the heads with
  the manifest's preprocessing; a near-tie within `TIE_TOL` of the reference logits is a
  tie, not wrong). Reconstructed answers are counted and their agreement with the reference
  reported. 503/504 are allowed (faults), 500 never;
- malformed: a 4xx with a JSON {"error": ...} body; any 5xx is a failure;
- lost: a request sent without any HTTP response (reset, timeout, refused while up).

Each second the server's RSS (VmRSS), open fds and threads are sampled from /proc. The run
stops at `requests` or `duration_s`, whichever first; then, with the clients still sending
(half of them on their keep-alive connections, half on a new connection per request), the
server gets SIGTERM: its exit time and code are measured, requests in flight at SIGTERM must
all be answered, later ones must get a clean 503 (JSON error) or connection refused, never a
reset.

Flat (RSS, fds): over the samples before SIGTERM, the median of the last quarter is at most
1.10 x (fds: + 5) the median of the second quarter (the first quarter is warm-up).
`main` exits 1 when a verdict fails.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code, refuse_coding_in
from bench.entry import bench_main
from bench.errors import BenchError
from bench.machine import machine_info, machine_label
from bench.serverproc import ServerProcess, free_port
from bench.soakload import (
    MALFORMED,
    Checker,
    ProcSampler,
    Workload,
    fetch_metrics,
    flatness,
    load_images,
    ort_reference,
    per_second,
    percentiles,
)
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

CLIENT_ERRORS = ("reset", "timeout", "refused", "client_error")  # outcomes without a response
AFTER_EXIT_S = 0.5  # load kept on after the server exited (connection refused)


class SoakBenchError(BenchError):
    """Invalid soak-benchmark configuration."""


@dataclass
class SoakConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to serve, "N,K"; None = its first
    requests: int = 100_000  # well-formed + malformed, main phase
    duration_s: float = 600.0
    clients: int = 32
    fail_prob: float = 0.01
    kill_prob: float = 0.0005
    delay_prob: float = 0.02
    delay_ms: float = 50.0
    malformed_fraction: float = 0.02
    max_batch: int = 4
    fp32_fraction: float = 0.2  # inputs sent as FP32 in [0, 1] instead of UINT8
    binary_fraction: float = 0.5  # inputs sent with the binary tensor extension
    binary_output_fraction: float = 0.1  # responses requested as binary tensors
    num_images: int = 10_000  # test images drawn from (the whole MNIST test split)
    mode: str = "coded"
    drain_timeout_s: float = 10.0  # the server's --drain-timeout-s
    max_body_bytes: int = 1 << 20  # the server's --max-body-bytes (the too-large request)
    client_timeout_s: float = 60.0
    seed: int = 0
    server_args: tuple[str, ...] = ()
    out_dir: str = "bench/results/soak"
    run_dir: str = "runs/bench/soak"
    tag: str = ""

    def __post_init__(self) -> None:
        self.server_args = tuple(self.server_args)
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise SoakBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], SoakBenchError)
        refuse_coding_in("--server-args", self.server_args, SoakBenchError)
        for name in ("requests", "clients", "max_batch", "num_images", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise SoakBenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("fail_prob", "kill_prob", "delay_prob", "malformed_fraction", "fp32_fraction",
                     "binary_fraction", "binary_output_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SoakBenchError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for name in ("duration_s", "client_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise SoakBenchError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

    def server_flags(self, metrics_port: int) -> list[str]:
        return ["--mode", self.mode, *coding_server_args(self.coding), "--log-level", "WARNING",
                "--metrics-port", str(metrics_port),
                "--drain-timeout-s", str(self.drain_timeout_s), "--max-body-bytes", str(self.max_body_bytes),
                "--fault-fail-prob", str(self.fail_prob), "--fault-kill-prob", str(self.kill_prob),
                "--fault-delay-prob", str(self.delay_prob), "--fault-delay-ms", str(self.delay_ms),
                "--fault-seed", str(self.seed), *self.server_args]


class Driver:
    """The clients' shared state: which request is next, the phase, and what came back."""

    def __init__(self, config: SoakConfig, workload: Workload, checker: Checker, url: str) -> None:
        self.config, self.workload, self.checker, self.url = config, workload, checker, url
        self.next_i = 0
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + config.duration_s
        self.t_sigterm: float | None = None  # set with `final`: new requests go on fresh connections
        self.final = False
        self.final_limit = 0  # bound on the requests sent after SIGTERM
        self.stop = False
        self.inflight = 0
        self.main_done = asyncio.Event()
        self.final_started = asyncio.Event()
        self.tally: Counter[str] = Counter()  # "<phase>.<ok|malformed>.<outcome>"
        self.malformed: dict[str, Counter[str]] = {}  # kind -> status (or client error) -> n
        self.rows: list[tuple[float, float, int, int]] = []  # main phase well-formed: t_end, s, status, B
        self.examples: list[dict[str, Any]] = []  # the first failures, for the record
        self.session: Any = None
        self.fresh: Any = None

    def take(self) -> int | None:
        """The next request index; -1: wait for the final phase; None: stop."""
        if self.stop:
            return None
        if not self.final and (self.next_i >= self.config.requests or time.perf_counter() >= self.deadline):
            self.main_done.set()
            return -1
        if self.final and self.next_i >= self.final_limit:
            return None
        self.next_i += 1
        return self.next_i - 1

    async def client(self, keepalive_after: bool) -> None:
        while (i := self.take()) is not None:
            if i < 0:
                await self.final_started.wait()
                continue
            outcome = await self.one(i, keepalive_after)
            if outcome in ("unavailable_json", "refused"):  # no hot loop while workers restart / after exit
                await asyncio.sleep(0.05)

    async def one(self, i: int, keepalive_after: bool) -> str:
        """Send request i and check what came back; after SIGTERM on the keep-alive
        connections (`keepalive_after`) or on a new connection per request."""
        import aiohttp

        p = self.workload.plan(i)
        after = self.final
        session = self.fresh if after and not keepalive_after else self.session
        status, raw, headers, err = 0, b"", {}, ""
        started = time.perf_counter()
        self.inflight += 1
        try:
            data = io.BytesIO(p.body) if len(p.body) > 256 * 1024 else p.body  # aiohttp warns on big bytes
            async with session.post(f"{self.url}/v2/models/{p.model}/infer", data=data,
                                    headers=p.headers) as resp:
                raw, status, headers = await resp.read(), resp.status, resp.headers
        except aiohttp.ClientConnectorError:
            err = "refused"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
            err = "reset"
        except TimeoutError:
            err = "timeout"
        except aiohttp.ClientError:
            err = "client_error"
        finally:
            self.inflight -= 1
        ended = time.perf_counter()
        phase = ("after-keepalive" if keepalive_after else "after-new") if after else \
            "main" if self.t_sigterm is None or ended < self.t_sigterm else "inflight"
        kind = "ok" if p.kind == "ok" else "malformed"
        if err:
            outcome = err
        elif kind == "ok" and status == 200:
            outcome = self.checker.check(p, raw, headers)
        else:
            outcome = _error_outcome(status, raw, kind)
        if kind == "malformed":
            self.malformed.setdefault(p.kind, Counter())[err or str(status)] += 1
        self.tally[f"{phase}.{kind}.{outcome}"] += 1
        if phase == "main" and kind == "ok":
            self.rows.append((ended - self.t0, ended - started, status, len(p.idx)))
        if not _acceptable(phase, kind, outcome) and len(self.examples) < 20:
            self.examples.append({"request": i, "kind": p.kind, "phase": phase, "outcome": outcome,
                                  "status": status, "body_head": raw[:300].decode(errors="replace"),
                                  "request_head": p.body[:200].decode(errors="replace"),
                                  "t_s": round(ended - self.t0, 3)})
        return outcome


def _error_outcome(status: int, raw: bytes, kind: str) -> str:
    """'4xx_json' (malformed only) or 'unavailable_json' (503/504) for an error status with a
    JSON {"error": str} body; anything else is 'http_<status>'."""
    try:
        json_error = isinstance(json.loads(raw).get("error"), str)
    except (ValueError, AttributeError):
        json_error = False
    if json_error and 400 <= status < 500 and kind == "malformed":
        return "4xx_json"
    if json_error and status in (503, 504):
        return "unavailable_json"
    return f"http_{status}"


def _acceptable(phase: str, kind: str, outcome: str) -> bool:
    if outcome in ("ok", "4xx_json"):
        return True
    if outcome == "refused":
        return phase.startswith("after")
    if outcome == "unavailable_json":  # well-formed under faults, or anything while draining
        return kind == "ok" or phase != "main"
    return False


def _count(tally: Counter[str], phases: str = "*", kinds: str = "*", outcomes: tuple[str, ...] | None = None,
           exclude: tuple[str, ...] = ()) -> int:
    total = 0
    for key, n in tally.items():
        phase, kind, outcome = key.split(".", 2)
        if (phases == "*" or phase in phases.split(",")) and (kinds == "*" or kind == kinds) and \
                (outcomes is None or outcome in outcomes) and outcome not in exclude:
            total += n
    return total


async def drive(config: SoakConfig, workload: Workload, checker: Checker, srv: ServerProcess,
                metrics_url: str) -> dict[str, Any]:
    """Main phase, then SIGTERM under load; returns the raw measurements."""
    import aiohttp

    assert srv.proc is not None  # started by the caller's `with`
    drv = Driver(config, workload, checker, srv.url)
    sampler = ProcSampler(srv.proc.pid)
    timeout = aiohttp.ClientTimeout(total=config.client_timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=config.clients), timeout=timeout) as s1, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=config.clients, force_close=True),
                                  timeout=timeout) as s2:
        drv.session, drv.fresh = s1, s2
        stop_sampling = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(drv.t0, 1.0, stop_sampling))
        clients = [asyncio.create_task(drv.client(keepalive_after=j % 2 == 0)) for j in range(config.clients)]
        main_done = asyncio.create_task(drv.main_done.wait())
        done, _ = await asyncio.wait([main_done, *clients], timeout=config.duration_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done - {main_done}:
            task.result()  # a client that crashed: raise its error now
        main_done.cancel()
        stopped_by = "requests" if drv.next_i >= config.requests else "duration"
        server_metrics = await fetch_metrics(s1, metrics_url)
        drv.t_sigterm = time.perf_counter()
        drv.final, drv.final_limit = True, drv.next_i + 200 * config.clients
        drv.final_started.set()
        inflight = drv.inflight
        srv.proc.send_signal(signal.SIGTERM)
        logger.info("main phase done (%s): %d requests in %.1f s; SIGTERM with %d in flight",
                    stopped_by, drv.next_i, drv.t_sigterm - drv.t0, inflight)
        try:
            exit_code: int | None = await asyncio.to_thread(srv.proc.wait, config.drain_timeout_s + 20)
        except subprocess.TimeoutExpired:
            exit_code = None
        exit_s = time.perf_counter() - drv.t_sigterm
        await asyncio.sleep(AFTER_EXIT_S)
        drv.stop = True
        await asyncio.wait_for(asyncio.gather(*clients), config.client_timeout_s + 10)
        stop_sampling.set()
        await sampling
    main_wall_s = drv.t_sigterm - drv.t0
    return {"drv": drv, "sampler": sampler, "stopped_by": stopped_by, "main_wall_s": main_wall_s,
            "server_metrics": server_metrics, "sigterm": {
                "sigterm_at_s": round(main_wall_s, 3), "inflight_at_sigterm": inflight, "exit_code": exit_code,
                "exit_s": None if exit_code is None else round(exit_s, 3),
                "drain_timeout_s": config.drain_timeout_s}}


def summarize(config: SoakConfig, raw: dict[str, Any], checker: Checker) -> dict[str, Any]:
    drv: Driver = raw["drv"]
    tally = drv.tally
    samples = [s for s in raw["sampler"].samples if s["t_s"] < raw["main_wall_s"]]
    times = [s["t_s"] for s in samples]
    rss = flatness([s["rss_mib"] for s in samples], rel=0.10, times_s=times)
    fds = flatness([s["fds"] for s in samples], add=5, times_s=times)
    ok_lat = [r[1] * 1e3 for r in drv.rows if r[2] == 200]
    sig = raw["sigterm"]
    counts = {
        "sent": sum(tally.values()),
        "sent_main": _count(tally, "main"),
        "lost": _count(tally, "main", outcomes=CLIENT_ERRORS),
        "duplicated": _count(tally, outcomes=("id_mismatch", "duplicate")),
        "unflagged_wrong": checker.c["unflagged_wrong"],
        "bad_responses": _count(tally, kinds="ok", outcomes=("bad_response",)),
        "well_formed_500": _count(tally, kinds="ok", outcomes=("http_500",)),
        "well_formed_503_504": _count(tally, kinds="ok", outcomes=("unavailable_json",)),
        # 503 while draining is the clean answer after SIGTERM; any other 5xx is not
        "malformed_5xx": _count(tally, "main", "malformed", ("unavailable_json",)) + sum(
            n for key, n in tally.items() if key.split(".")[1:2] == ["malformed"] and ".http_5" in key),
        "malformed_main_not_4xx_json": _count(tally, "main", "malformed", exclude=("4xx_json",)),
        "inflight_at_sigterm_unanswered": _count(tally, "inflight", outcomes=CLIENT_ERRORS),
        "after_sigterm_reset": _count(tally, "after-keepalive,after-new", outcomes=("reset",)),
        "after_sigterm_unclean": _count(tally, "after-keepalive,after-new",
                                        exclude=("ok", "4xx_json", "unavailable_json", "refused")),
    }
    exit_ok = sig["exit_code"] == 0 and sig["exit_s"] is not None and sig["exit_s"] <= config.drain_timeout_s + 1
    verdicts = {"lost_0": counts["lost"] == 0, "duplicated_0": counts["duplicated"] == 0,
                "unflagged_wrong_0": counts["unflagged_wrong"] == 0,
                "bad_responses_0": counts["bad_responses"] == 0, "well_formed_500_0": counts["well_formed_500"] == 0,
                "malformed_5xx_0": counts["malformed_5xx"] == 0,
                "malformed_all_4xx_json": counts["malformed_main_not_4xx_json"] == 0,
                "rss_flat": rss["flat"], "fds_flat": fds["flat"],
                "sigterm_exit_0_within_drain_plus_1s": exit_ok,
                "sigterm_inflight_all_answered": counts["inflight_at_sigterm_unanswered"] == 0,
                "sigterm_after_clean_503_or_refused": counts["after_sigterm_unclean"] == 0}
    phases = {ph: {k.split(".", 1)[1]: n for k, n in sorted(tally.items()) if k.startswith(ph + ".")}
              for ph in ("main", "inflight", "after-keepalive", "after-new")}
    wall = raw["main_wall_s"]
    return {
        "main_phase": {"stopped_by": raw["stopped_by"], "wall_s": round(wall, 2),
                       "requests_sent": counts["sent_main"], "ok_rps": len(ok_lat) / wall,
                       "queries_ok_per_s": sum(r[3] for r in drv.rows if r[2] == 200) / wall,
                       "latency_ms": percentiles(ok_lat)},
        "counts": counts, "outcomes_by_phase": phases,
        "malformed_by_kind": {k: dict(v) for k, v in sorted(drv.malformed.items())},
        "answers": checker.summary(),
        "flatness": {"rss_mib": rss, "fds": fds,
                     "definition": "samples before SIGTERM; last-quarter median <= second-quarter median "
                                   "x 1.10 (RSS) / + 5 (fds)"},
        "sigterm": {**sig, "outcomes_inflight": phases["inflight"],
                    "outcomes_after_on_keepalive_connections": phases["after-keepalive"],
                    "outcomes_after_on_new_connections": phases["after-new"]},
        "verdicts": verdicts, "passed": all(v is not False for v in verdicts.values()),
        "series": {"samples": raw["sampler"].samples, "per_second": per_second(drv.rows, wall)},
        "server_metrics_at_sigterm": raw["server_metrics"], "failure_examples": drv.examples,
    }


def run(config: SoakConfig, images: np.ndarray | None = None, labels: np.ndarray | None = None,
        reference: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The soak; `images` ([N, C, H, W] uint8), `labels` and `reference` ({task: logits [N, classes]})
    replace the test split and the ONNX Runtime reference (tests pass their own)."""
    from runtime.loops import loop_factory

    info = machine_info()
    logger.info("soak bench: %s", json.dumps(asdict(config)))
    logger.info("machine: %s", machine_label(info))
    m = load_code(config.bundle, config.coding)
    source = "given"
    if images is None:
        images, labels, source = load_images(m, config.num_images, config.seed)
    if reference is None:
        t = time.perf_counter()
        reference = ort_reference(config.bundle, m, images)
        logger.info("reference logits for %d images in %.1f s", len(images), time.perf_counter() - t)
    checker = Checker(m, reference, labels)
    max_batch_size = int(_flag(config.server_args, "--max-batch-size", 64))
    workload = Workload(config, m, images, max_batch_size)
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    metrics_port = free_port()
    log_path = run_dir / "server.log"
    with ServerProcess(config.bundle, config.server_flags(metrics_port), log_path) as srv:
        factory, _ = loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            raw = runner.run(drive(config, workload, checker, srv, f"http://127.0.0.1:{metrics_port}/metrics"))
    log_lines = log_path.read_text(errors="replace").splitlines()
    errors = [ln for ln in log_lines if " ERROR " in ln or ln.startswith("Traceback")]
    result = {"benchmark": "soak", "config": asdict(config), "machine": info, "code": m.code.label,
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              "server": {"command": srv.command, "ready_s": srv.ready_s, "log": str(log_path),
                         "log_error_lines": len(errors), "log_error_examples": errors[:10]},
              "images": {"source": source, "count": int(len(images))},
              "malformed_kinds": sorted(MALFORMED), **summarize(config, raw, checker)}
    suffix = f"-{config.tag}" if config.tag else ""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"soak{suffix}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    from bench.plots import soak_figure

    png = soak_figure(result, out_dir / f"soak{suffix}.png", f"soak, {config.mode}, n={m.coding.n} k={m.coding.k}, "
                      f"{config.clients} clients — {machine_label(info)}")
    logger.info("counts: %s", json.dumps(result["counts"]))
    logger.info("verdicts: %s", json.dumps(result["verdicts"]))
    logger.info("wrote %s and %s", json_path, png)
    return result


def _flag(args: tuple[str, ...], flag: str, default: Any) -> Any:
    return args[args.index(flag) + 1] if flag in args[:-1] else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=SoakConfig.bundle)
    p.add_argument("--server-args", default="", help="extra server flags, space separated")
    add_dataclass_flags(p, SoakConfig, skip=("bundle", "server_args"), helps={"coding": CODING_HELP})
    return p


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    values = dataclass_values(SoakConfig, {k: v for k, v in vars(args).items()
                                           if k not in ("bundle", "server_args")})
    return SoakConfig(bundle=args.bundle, server_args=tuple(args.server_args.split()), **values)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), config_from_args,
                      lambda c: 0 if run(c)["passed"] else 1, (SoakBenchError,))
