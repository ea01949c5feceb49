"""`python -m bench throughput [BUNDLE]`: images/s of every server mode, driven by wrk, beside
raw ONNX Runtime f, the coded compute ceiling and a real-Triton peer, in one run.

Each point is (mode, request batch b, body): the real server (bench/serverproc.py, no faults,
`--mode M --log-level WARNING` + `--server-args`) driven by wrk (bench/wrk.py: `connections`
keep-alive connections, one wrk thread, real MNIST test images, binary-tensor or JSON body)
for `duration_s` after an unrecorded `warmup_s` run. Recorded: images/s, requests/s, p50 /
p90 / p99 from wrk, and the CPU seconds of the server's process tree and of wrk. `parm` is
skipped, with the reason, when the bundle has no parm.onnx. The code measured (servers,
encoders, ceilings, the record's `code`) is the bundle's first, or `--coding N,K`.

In the same run:
- raw f: the bundle's f.onnx in ONNX Runtime at each batch, with the threads the server
  has (the usable CPUs): best of one session x `cpus` intra-op threads and `cpus`
  single-threaded sessions driven from `cpus` Python threads; measured before and after the
  servers, the mean used (both recorded), because the CPUs are shared with other jobs;
- the coded compute ceiling at each b: per query coded runs f n/k times and each of the
  n-k encoders once per group of k, so images/s <= k / (n / f(b) + sum_r 1 / enc_r(G)),
  f(b) in images/s at batch b, enc_r(G) in groups/s on [G, k, C, H, W], G = ceil(b / k).
  A second ceiling takes f at G too (the batch each worker call really runs);
- the PyTriton peer (bench/triton_peer.py): f + the primary head served UNCODED by PyTriton's
  bundled tritonserver (dynamic batching, ONNX Runtime in the Python callable), KServe v2
  HTTP on 127.0.0.1, same input as the server, so the same wrk body measures it. It runs from
  `.venv-triton` (Python 3.12); when that venv or Triton cannot start the peer is recorded as
  skipped with the reason.

Targets (issue #19), on the binary body: coded at b=32 >= 0.85 x its compute ceiling; coded
>= 1.5 x the PyTriton peer at b=1 and b=32; uncoded >= 0.9 x raw f at b=32. Each is
recorded met / missed, with what limits a missed one from the measured CPU use (wrk shares
the cores with the server here; per-image server CPU against the ceiling's). Every ratio is
in `ratios`, for both bodies.

Set-up once: `bash bench/setup_peers.sh` (apt-get install -y wrk when missing; builds
.venv-triton with nvidia-pytriton 0.7.0, numpy, onnxruntime 1.32.0). Output:
bench/results/serving/throughput{-tag}.json and .png; `python -m bench.report` renders it.
Full run at the defaults (5 modes x 3 batches x 2 bodies + the peer, 2 + 10 s per point): about
10 minutes on 2 cores (the log says its estimate at the start).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code, refuse_coding_in
from bench.errors import BenchError
from bench.machine import machine_info, machine_label, usable_cpu_count
from bench.overhead import make_session
from bench.serverproc import BenchProcessError, ServerProcess, install_sigterm_handler
from bench.triton_peer import DEFAULT_PYTHON, PeerProcess, peer_environment
from bench.wrk import BODY_KINDS, Body, WrkError, infer_url, make_body, run_wrk
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import ENCODER_IO, F_IO, MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)

ALL_MODES = ("coded", "uncoded", "replication", "parm", "approxifer")
PEER = "triton-peer"
CEILING_TARGET = 0.85  # coded at batch 32 / its compute ceiling
PEER_TARGET = 1.5  # coded / PyTriton peer, at batch 1 and 32
UNCODED_TARGET = 0.9  # uncoded / raw f, at batch 32
SATURATED = 0.85  # cores busy / cores at or above which a point counts as CPU-bound


class ThroughputBenchError(BenchError):
    """Invalid throughput-benchmark configuration."""


@dataclass
class ThroughputConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to serve and to take the ceiling of, "N,K"; None = its first
    modes: tuple[str, ...] = ALL_MODES
    batches: tuple[int, ...] = (1, 8, 32)  # images per request
    bodies: tuple[str, ...] = BODY_KINDS  # binary-tensor and/or JSON request bodies
    connections: int = 16  # wrk keep-alive connections
    duration_s: int = 10  # wrk, measured, per point (whole seconds: wrk's unit)
    warmup_s: int = 2  # wrk, not recorded, before each point (0 = none)
    wrk_threads: int = 1
    wrk_timeout_s: int = 10  # a request slower than this is a wrk timeout error
    raw_duration_s: float = 3.0  # ONNX Runtime, per (model, batch, session layout)
    peer: bool = True  # the PyTriton peer
    peer_python: str = DEFAULT_PYTHON
    peer_instances: int = 2  # Triton model instances (ONNX Runtime session pairs)
    peer_threads: int = 1  # intra-op threads per peer session
    peer_max_queue_delay_us: int = 2000  # Triton dynamic batcher
    peer_ready_timeout_s: float = 180.0
    server_args: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("thread",)  # --workers-backend of each server, side by side
    seed: int = 0
    out_dir: str = "bench/results/serving"
    run_dir: str = "runs/bench/throughput"
    tag: str = ""

    def __post_init__(self) -> None:
        from runtime.modes import MODES  # the runtime owns the mode names

        self.modes, self.batches = tuple(self.modes), tuple(self.batches)
        self.bodies, self.server_args = tuple(self.bodies), tuple(self.server_args)
        self.backends = tuple(self.backends)
        from runtime.worker import BACKENDS

        if not self.backends or set(self.backends) - set(BACKENDS) or len(set(self.backends)) != len(self.backends):
            raise ThroughputBenchError(f"--backends must be distinct names from {','.join(BACKENDS)}, got "
                                       f"{list(self.backends)}")
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise ThroughputBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], ThroughputBenchError)
        refuse_coding_in("--server-args", self.server_args, ThroughputBenchError)
        if not self.modes or set(self.modes) - set(MODES) or len(set(self.modes)) != len(self.modes):
            raise ThroughputBenchError(f"--modes must be distinct names from {','.join(MODES)}, got "
                                       f"{list(self.modes)}")
        if not self.bodies or set(self.bodies) - set(BODY_KINDS) or len(set(self.bodies)) != len(self.bodies):
            raise ThroughputBenchError(f"--bodies must be distinct names from {','.join(BODY_KINDS)}, got "
                                       f"{list(self.bodies)}")
        if not self.batches or any(b < 1 for b in self.batches) or len(set(self.batches)) != len(self.batches):
            raise ThroughputBenchError(f"--batches must be distinct integers >= 1, got {list(self.batches)}")
        for name in ("connections", "duration_s", "wrk_threads", "wrk_timeout_s", "peer_instances",
                     "peer_threads"):
            if getattr(self, name) < 1:
                raise ThroughputBenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.connections < self.wrk_threads:
            raise ThroughputBenchError(f"--connections ({self.connections}) must be >= --wrk-threads "
                                       f"({self.wrk_threads}): wrk gives every thread its own connections")
        if self.warmup_s < 0 or self.peer_max_queue_delay_us < 0:
            raise ThroughputBenchError("--warmup-s and --peer-max-queue-delay-us must be >= 0")
        if not (self.raw_duration_s > 0 and self.peer_ready_timeout_s > 0):
            raise ThroughputBenchError("--raw-duration-s and --peer-ready-timeout-s must be > 0")


# -- CPU accounting (/proc) ---------------------------------------------------------------------------
def _stat_fields(path: Path) -> tuple[str, list[str]] | None:
    """(comm, the fields after it) of a /proc stat file; None when the task is gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    head, rest = text.rsplit(")", 1)
    return head.split("(", 1)[1], rest.split()


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of a process tree: in all (incl. reaped children) and per live thread."""

    total_s: float
    threads: dict[int, tuple[str, float]]  # tid -> (label, CPU seconds)


def cpu_snapshot(root_pid: int) -> CpuSnapshot:
    """User + system CPU of a process and its live descendants, from /proc: the server's
    helper processes and Triton's backend stubs count too. Per thread as well, so a report
    can tell one saturated thread (an event loop holding the GIL) from idle cores."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        stat = _stat_fields(entry / "stat") if entry.name.isdigit() else None
        if stat is not None:
            parents[int(entry.name)] = int(stat[1][1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, threads, todo = 0, {}, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        stat = _stat_fields(Path(f"/proc/{pid}/stat"))
        if stat is None:
            continue
        total += sum(int(v) for v in stat[1][11:15])  # utime stime cutime cstime
        for task in Path(f"/proc/{pid}/task").glob("*"):
            tstat = _stat_fields(task / "stat")
            if tstat is not None:
                role = "main thread" if int(task.name) == pid else "thread"
                threads[int(task.name)] = (f"{tstat[0]} ({role} of {stat[0]} pid {pid})",
                                           (int(tstat[1][11]) + int(tstat[1][12])) / tick)
    return CpuSnapshot(total / tick, threads)


def busy_cpu_s() -> float:
    """Busy CPU seconds (all but idle and iowait) of the CPUs this process may use, from
    /proc/stat: with the server's and wrk's share it tells how much other jobs took."""
    cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name != "cpu" and (cpus is None or name in cpus):
            values = [int(v) for v in ticks[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_use(before: CpuSnapshot, after: CpuSnapshot, duration_s: float) -> dict[str, Any]:
    """Cores a process tree kept busy between two snapshots, and its busiest thread."""
    deltas = {tid: (label, s - before.threads.get(tid, (label, 0.0))[1]) for tid, (label, s) in after.threads.items()}
    label, busiest = max(deltas.values(), key=lambda v: v[1], default=("none", 0.0))
    cpu_s = after.total_s - before.total_s
    return {"server_cpu_s": round(cpu_s, 3), "server_cores": cpu_s / duration_s,
            "busiest_thread": label, "busiest_thread_cores": busiest / duration_s}


# -- raw ONNX Runtime ---------------------------------------------------------------------------------
def groups_per_request(batch: int, k: int) -> int:
    """Coding groups a request of `batch` images fills (a partial group is padded)."""
    return max(1, math.ceil(batch / k))


def _images_per_s(sessions: list, feeds: dict[str, np.ndarray], duration_s: float) -> float:
    """Run each session in its own thread (ORT releases the GIL) for duration_s; items/s,
    an item being one entry of the leading dimension (an image for f, a group for Enc)."""
    counts = [0] * len(sessions)
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            sessions[i].run(None, feeds)
            counts[i] += 1

    for s in sessions:  # warm-up
        s.run(None, feeds)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration_s)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    elapsed_s = time.perf_counter() - t0
    return sum(counts) * next(iter(feeds.values())).shape[0] / elapsed_s


def best_layout(path: Path, feeds: dict[str, np.ndarray], cpus: int, duration_s: float) -> dict[str, float]:
    """Items/s of one ONNX file at the feeds' batch: one session x `cpus` threads vs one
    single-threaded session per CPU from parallel threads; the server could use either."""
    t0, busy0, own0 = time.perf_counter(), busy_cpu_s(), time.process_time()
    one_session = _images_per_s([make_session(path, "CPUExecutionProvider", cpus)], feeds, duration_s)
    per_cpu = _images_per_s([make_session(path, "CPUExecutionProvider", 1) for _ in range(cpus)], feeds,
                            duration_s)
    others = (busy_cpu_s() - busy0) - (time.process_time() - own0)  # CPU other jobs took meanwhile
    return {"one_session_per_s": one_session, "session_per_cpu_per_s": per_cpu,
            "best_per_s": max(one_session, per_cpu), "other_cores": max(0.0, others / (time.perf_counter() - t0))}


def raw_batches(batches: tuple[int, ...], k: int) -> tuple[list[int], list[int]]:
    """(f batches, encoder group counts) to measure: each request batch and each G = ceil(b/k)."""
    groups = sorted({groups_per_request(b, k) for b in batches})
    return sorted(set(batches) | set(groups)), groups


def raw_throughput(config: ThroughputConfig, m: Manifest, x: np.ndarray) -> dict[str, Any]:
    """f at every needed batch and each encoder at every needed G; x: preprocessed images."""
    root, cpus, k = Path(config.bundle), usable_cpu_count(), m.coding.k
    f_batches, groups = raw_batches(config.batches, k)

    def tile(n: int) -> np.ndarray:  # n preprocessed images, repeating x as needed
        return np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])))

    f = {str(b): best_layout(root / m.f, {F_IO[0]: tile(b)}, cpus, config.raw_duration_s) for b in f_batches}
    enc = {str(e.row): {str(g): best_layout(root / e.file, {ENCODER_IO[0]: tile(g * k).reshape(g, k, *x.shape[1:])},
                                            cpus, config.raw_duration_s) for g in groups}
           for e in m.encoders}
    logger.info("raw f images/s by batch: %s; encoders groups/s by G: %s",
                {b: round(v["best_per_s"]) for b, v in f.items()},
                {r: {g: round(v["best_per_s"], 1) for g, v in e.items()} for r, e in enc.items()})
    return {"cpus": cpus, "f": f, "encoders": enc}


def merge_raw(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Mean of the runs before and after the servers, each kept, so drift shows in the record."""

    def mean(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {**{k: (a[k] + b[k]) / 2 for k in a}, "best_per_s_before": a["best_per_s"],
                "best_per_s_after": b["best_per_s"]}

    return {"cpus": before["cpus"], "f": {b: mean(v, after["f"][b]) for b, v in before["f"].items()},
            "encoders": {r: {g: mean(v, after["encoders"][r][g]) for g, v in e.items()}
                         for r, e in before["encoders"].items()}}


# -- ceilings ------------------------------------------------------------------------------------------
def coded_ceiling(f_per_s: float, encoder_groups_per_s: list[float], n: int, k: int) -> float:
    """Images/s when the CPUs do nothing but coded compute: per group of k queries, n f runs
    and one run of each encoder: k / (n / f + sum_r 1 / enc_r)."""
    return k / (n / f_per_s + sum(1.0 / r for r in encoder_groups_per_s))


def ceilings(raw: dict[str, Any], batches: tuple[int, ...], n: int, k: int) -> dict[str, dict[str, float]]:
    """Per request batch b: raw f, raw f x k/n, the coded ceiling (f at b) and the coded
    ceiling with f at G (what each worker call runs when each request is its own dispatch;
    under closed-loop load the batcher merges requests, so each point records the queries
    per dispatch it really ran); images/s."""
    out = {}
    for b in batches:
        g = groups_per_request(b, k)
        f_b, f_g = raw["f"][str(b)]["best_per_s"], raw["f"][str(g)]["best_per_s"]
        enc = [e[str(g)]["best_per_s"] for e in raw["encoders"].values()]
        out[str(b)] = {"groups_per_request": g, "raw_f": f_b, "raw_f_x_k_over_n": f_b * k / n,
                       "coded": coded_ceiling(f_b, enc, n, k),
                       "coded_f_at_worker_batch": coded_ceiling(f_g, enc, n, k)}
    return out


# -- measuring one server --------------------------------------------------------------------------------
def dispatch_counts(infer: str) -> tuple[int, int] | None:
    """(inference_count, execution_count) from the model's statistics endpoint (the Triton
    statistics extension, which this server and Triton both serve beside `/infer`), or None
    where it cannot be read."""
    url = infer.removesuffix("/infer") + "/stats"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            stats = json.loads(resp.read())["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def queries_per_dispatch(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Queries per model execution between two dispatch_counts readings (None: unknown): what
    the batcher really merged, e.g. several requests per dispatch under closed-loop load."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def measure_point(url: str, body: Body, config: ThroughputConfig, work_dir: Path, pid: int) -> dict[str, Any]:
    """A warm-up wrk run (not recorded), then the measured one, with the CPU both sides used."""
    wrk_args = {"connections": config.connections, "threads": config.wrk_threads, "timeout_s": config.wrk_timeout_s}
    if config.warmup_s:
        run_wrk(url, body, work_dir, duration_s=config.warmup_s, **wrk_args)
    counts0, before, busy0 = dispatch_counts(url), cpu_snapshot(pid), busy_cpu_s()
    result = run_wrk(url, body, work_dir, duration_s=config.duration_s, **wrk_args)
    per_dispatch = queries_per_dispatch(counts0, dispatch_counts(url))
    d = result.duration_s
    cpu = cpu_use(before, cpu_snapshot(pid), d)
    client_cores = (result.client_cpu_s or 0.0) / d
    machine_cores = (busy_cpu_s() - busy0) / d  # wrk's window is ~d; a little more is counted
    images = max(1, result.requests * body.batch)
    point = {"batch": body.batch, "body": body.kind, "images_per_s": result.requests_per_s * body.batch,
             "requests_per_s": result.requests_per_s, "p50_ms": result.p50_ms, "p90_ms": result.p90_ms,
             "p99_ms": result.p99_ms, "max_ms": result.max_ms, "mean_ms": result.mean_ms,
             "requests": result.requests, "duration_s": d, "errors": result.errors,
             "queries_per_dispatch": per_dispatch,
             "cpu": {**cpu, "client_cpu_s": result.client_cpu_s, "client_cores": client_cores,
                     "machine_busy_cores": machine_cores,
                     "other_cores": max(0.0, machine_cores - cpu["server_cores"] - client_cores),
                     "server_core_ms_per_image": 1e3 * cpu["server_cpu_s"] / images}}
    logger.info("  b=%d %s: %.0f images/s (%.1f req/s), p50 %.1f ms, p99 %.1f ms; cores: server %.2f (busiest "
                "thread %.2f), wrk %.2f, other jobs %.2f", body.batch, body.kind, point["images_per_s"],
                result.requests_per_s, result.p50_ms, result.p99_ms, cpu["server_cores"], cpu["busiest_thread_cores"],
                client_cores, point["cpu"]["other_cores"])
    return point


def measure_points(url: str, pid: int, bodies: list[Body], config: ThroughputConfig, work_dir: Path,
                   label: str) -> list[dict[str, Any]]:
    """Every (batch, body) point against one running server; a failed point is recorded as an
    error (logged loudly) and the others still run."""
    points = []
    for body in bodies:
        try:
            points.append(measure_point(url, body, config, work_dir, pid))
        except WrkError as exc:
            logger.error("%s b=%d %s FAILED: %s", label, body.batch, body.kind, exc)
            points.append({"batch": body.batch, "body": body.kind, "error": str(exc)[:2000]})
    return points


def skip_reason(mode: str, m: Manifest, bundle: Path) -> str | None:
    if mode == "parm" and (m.parm is None or not (bundle / m.parm).is_file()):
        return f"the bundle has no ParM model (manifest parm: {m.parm!r}; no parm.onnx in {bundle})"
    return None


def run_mode(mode: str, config: ThroughputConfig, m: Manifest, bodies: list[Body], run_dir: Path,
             backend: str = "thread") -> dict[str, Any]:
    args = ["--mode", mode, *coding_server_args(config.coding), "--log-level", "WARNING", "--workers-backend",
            backend, *config.server_args]
    logger.info("mode %s (%s workers)", mode, backend)
    log_name = f"{mode}.server.log" if backend == "thread" else f"{mode}-{backend}.server.log"
    try:
        with ServerProcess(config.bundle, args, run_dir / log_name) as srv:
            assert srv.proc is not None  # started by __enter__
            url = infer_url(srv.url, m.model_name)
            points = measure_points(url, srv.proc.pid, bodies, config, run_dir / "bodies", mode)
    except BenchProcessError as exc:
        logger.error("mode %s: server failed: %s", mode, exc)
        return {"server_args": args, "error": str(exc)[:3000]}
    return {"server_args": args, "ready_s": srv.ready_s, "points": points}


def run_peer(config: ThroughputConfig, m: Manifest, bodies: list[Body], run_dir: Path) -> dict[str, Any]:
    """The PyTriton peer's points, or {"skipped": why} (never a made-up number)."""
    if not config.peer:
        return {"skipped": "disabled (--no-peer)"}
    env, reason = peer_environment(config.peer_python)
    if env is None:
        logger.warning("triton peer skipped: %s", reason)
        return {"skipped": reason}
    options = {"instances": config.peer_instances, "threads": config.peer_threads,
               "max_batch_size": max(64, *config.batches), "max_queue_delay_us": config.peer_max_queue_delay_us}
    logger.info("triton peer (PyTriton, uncoded f + primary head)")
    try:
        with PeerProcess(config.bundle, m.model_name, config.peer_python, env, run_dir / "triton-peer.log",
                         options, ready_timeout_s=config.peer_ready_timeout_s, coding=config.coding) as peer:
            assert peer.proc is not None
            url = infer_url(peer.url, m.model_name)
            points = measure_points(url, peer.proc.pid, bodies, config, run_dir / "bodies", PEER)
    except (BenchProcessError, OSError) as exc:
        logger.warning("triton peer skipped: %s", exc)
        return {"skipped": f"triton peer did not start: {str(exc)[:2000]}"}
    return {"command": peer.command, "options": options, "ready_s": peer.ready_s, "points": points}


# -- ratios and targets ----------------------------------------------------------------------------------
def find_point(section: dict[str, Any] | None, batch: int, body: str) -> dict[str, Any] | None:
    """The measured (not failed) point of a server section, or None."""
    for p in (section or {}).get("points", []):
        if p["batch"] == batch and p["body"] == body and "error" not in p:
            return p
    return None


def _ratio(a: dict[str, Any] | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a["images_per_s"] / b, 4)


def ratio_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch x body: coded / ceiling, coded / (raw f x k/n), uncoded / raw f, coded / peer."""
    servers, peer, cfg = record["servers"], record["peer"], record["config"]
    rows = []
    for b in cfg["batches"]:
        c = record["ceilings"][str(b)]
        for body in cfg["bodies"]:
            coded, uncoded = find_point(servers.get("coded"), b, body), find_point(servers.get("uncoded"), b, body)
            peer_point = find_point(peer, b, body)
            rows.append({"batch": b, "body": body, "coded_vs_ceiling": _ratio(coded, c["coded"]),
                         "coded_vs_ceiling_f_at_worker_batch": _ratio(coded, c["coded_f_at_worker_batch"]),
                         "coded_vs_raw_f_x_k_over_n": _ratio(coded, c["raw_f_x_k_over_n"]),
                         "uncoded_vs_raw_f": _ratio(uncoded, c["raw_f"]),
                         "coded_vs_peer": _ratio(coded, peer_point and peer_point["images_per_s"])})
    return rows


def backend_ratio_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Images/s of each other backend's server over the thread backend's, per mode, batch, body."""
    rows = []
    for backend, servers in record.get("servers_by_backend", {}).items():
        for mode, section in servers.items():
            for point in section.get("points", []):
                if "error" in point:
                    continue
                base = find_point(record["servers"].get(mode), point["batch"], point["body"])
                rows.append({"backend": backend, "mode": mode, "batch": point["batch"], "body": point["body"],
                             "images_per_s": point["images_per_s"],
                             "images_per_s_ratio": _ratio(point, base and base["images_per_s"])})
    return rows


def limit_reason(point: dict[str, Any], cpus: int, compute_core_ms: float, what: str) -> str:
    """Why a measured point stays below its reference, from the CPU it used: saturated cores
    (and whose: the server's, wrk's, other jobs'), a single saturated thread, or neither; and
    the server's core-ms per image against `compute_core_ms` (`what`)."""
    c = point["cpu"]
    other = c.get("other_cores", 0.0)
    busy = c["server_cores"] + c["client_cores"] + other
    if busy >= SATURATED * cpus:
        parts = [f"CPU-bound: server {c['server_cores']:.2f} + wrk {c['client_cores']:.2f} + other jobs "
                 f"{other:.2f} of {cpus} cores busy"]
    elif c["busiest_thread_cores"] >= SATURATED:
        parts = [f"one thread is the bottleneck: {c['busiest_thread']} kept {c['busiest_thread_cores']:.2f} of a "
                 f"core busy while only {busy:.2f} of {cpus} cores were (Python work under the GIL)"]
    else:
        parts = [f"cores not saturated ({busy:.2f} of {cpus} busy, busiest thread {c['busiest_thread_cores']:.2f}): "
                 "the server waits (batching delay, too few connections, a lock) more than it computes"]
    if c["client_cores"] >= 0.1 * cpus:
        parts.append(f"wrk shares the {cpus} cores ({c['client_cores']:.2f} of them)")
    if other >= 0.1 * cpus:
        parts.append(f"other jobs on this shared machine took {other:.2f} of the {cpus} cores")
    parts.append(f"server {c['server_core_ms_per_image']:.3f} core-ms per image vs {compute_core_ms:.3f} for {what}")
    return "; ".join(parts)


def _target(name: str, body: str, batch: int, value: float | None, threshold: float, point: dict | None,
            missing: str, limit: tuple[int, float, str] | None) -> dict[str, Any]:
    t: dict[str, Any] = {"name": name, "body": body, "batch": batch, "threshold": threshold,
                         "value": value, "met": None if value is None else bool(value >= threshold)}
    if value is None:
        t["limit"] = f"not measured: {missing}"
    elif not t["met"] and point is not None and limit is not None:
        t["limit"] = limit_reason(point, *limit)
    return t


def _dispatch_note(point: dict[str, Any] | None, k: int) -> str:
    per_dispatch = (point or {}).get("queries_per_dispatch")
    if per_dispatch is None:
        return ""
    return (f" (its dispatches carried {per_dispatch:.1f} queries: each worker call ran "
            f"{math.ceil(per_dispatch / k)} images)")


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three targets on the primary body (binary when measured)."""
    cfg, servers, peer = record["config"], record["servers"], record["peer"]
    body = "binary" if "binary" in cfg["bodies"] else cfg["bodies"][0]
    cpus, n, k = record["raw"]["cpus"], record["n"], record["k"]
    rows = {(r["batch"], r["body"]): r for r in ratio_rows(record)}

    def why_missing(mode: str, batch: int) -> str:
        sec = servers.get(mode) if mode != PEER else peer
        if batch not in cfg["batches"]:
            return f"batch {batch} not in --batches"
        if sec is None:
            return f"mode {mode} not in --modes"
        return sec.get("skipped") or sec.get("error") or f"{mode} b={batch} {body} failed (see its point)"

    out = []
    for b in (32,):
        r, c = rows.get((b, body), {}), record["ceilings"].get(str(b), {})
        coded = find_point(servers.get("coded"), b, body)
        out.append(_target("coded >= 0.85 x compute ceiling", body, b, r.get("coded_vs_ceiling"), CEILING_TARGET,
                           coded, why_missing("coded", b),
                           (cpus, 1e3 * cpus / c["coded"], f"f x n/k + encoders at the ceiling"
                            f"{_dispatch_note(coded, k)}") if c else None))
    for b in (1, 32):
        r = rows.get((b, body), {})
        coded, peer_point = find_point(servers.get("coded"), b, body), find_point(peer, b, body)
        missing = why_missing("coded", b) if coded is None else why_missing(PEER, b)
        limit = None if peer_point is None else (
            cpus, peer_point["cpu"]["server_core_ms_per_image"],
            f"the uncoded Triton peer (coded runs f n/k = {n / k:.2f} x per query, plus the encoders)")
        out.append(_target("coded >= 1.5 x PyTriton peer", body, b, r.get("coded_vs_peer"), PEER_TARGET, coded,
                           missing, limit))
    for b in (32,):
        r, c = rows.get((b, body), {}), record["ceilings"].get(str(b), {})
        uncoded = find_point(servers.get("uncoded"), b, body)
        out.append(_target("uncoded >= 0.9 x raw f", body, b, r.get("uncoded_vs_raw_f"), UNCODED_TARGET, uncoded,
                           why_missing("uncoded", b), (cpus, 1e3 * cpus / c["raw_f"], "raw f") if c else None))
    return out


# -- the run ---------------------------------------------------------------------------------------------
def estimate_s(config: ThroughputConfig, m: Manifest) -> float:
    """Rough wall time: every point's wrk runs, server starts and stops, the peer's start and
    stop (~15 s), raw ONNX Runtime before and after (two session layouts per model and batch)."""
    per_point = config.warmup_s + config.duration_s + 0.5
    points = len(config.batches) * len(config.bodies)
    f_batches, groups = raw_batches(config.batches, m.coding.k)
    raw = 2 * 2 * (len(f_batches) + len(groups) * len(m.encoders)) * (config.raw_duration_s + 0.15)
    return len(config.modes) * (points * per_point + 2) + (points * per_point + 15) * config.peer + raw


def request_bodies(config: ThroughputConfig, m: Manifest) -> tuple[list[Body], np.ndarray, str]:
    from bench.soakload import load_images

    images, _, source = load_images(m, max(config.batches), config.seed)  # [N, C, H, W] uint8
    bodies = [make_body(kind, m.input.name, images[:b]) for b in config.batches for kind in config.bodies]
    return bodies, images, source


def run(config: ThroughputConfig) -> dict[str, Any]:
    from runtime.model_io import preprocess

    t0 = time.perf_counter()
    info = machine_info()
    m = load_code(config.bundle, config.coding)
    n, k = m.coding.n, m.coding.k
    logger.info("throughput bench: %s", json.dumps(asdict(config)))
    logger.info("machine: %s; expected wall time about %.0f s", machine_label(info), estimate_s(config, m))
    bodies, images, source = request_bodies(config, m)
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    x = preprocess(images, m.input)
    if "ray" in config.backends:
        from bench.netns_cluster import require_loopback_only

        require_loopback_only("--backends ray")
    raw_before = raw_throughput(config, m, x)
    by_backend: dict[str, dict[str, Any]] = {}
    for backend in config.backends:
        servers = by_backend.setdefault(backend, {})
        for mode in config.modes:
            reason = skip_reason(mode, m, Path(config.bundle))
            if reason:
                logger.warning("mode %s skipped: %s", mode, reason)
                servers[mode] = {"skipped": reason}
                continue
            servers[mode] = run_mode(mode, config, m, bodies, run_dir, backend)
    servers = by_backend.pop("thread", {})  # the targets are the thread backend's
    peer = run_peer(config, m, bodies, run_dir)
    raw = merge_raw(raw_before, raw_throughput(config, m, x))
    record: dict[str, Any] = {
        "benchmark": "throughput", "layout": 2, "config": asdict(config), "machine": info,
        "model_name": m.model_name, "code": m.code.label, "n": n, "k": k, "images": source, "raw": raw,
        "ceilings": ceilings(raw, config.batches, n, k), "servers": servers, "peer": peer, "run_dir": str(run_dir),
        "servers_by_backend": by_backend}
    record["ratios"] = ratio_rows(record)
    record["backend_ratios"] = backend_ratio_rows(record)
    for row in record["backend_ratios"]:
        logger.info("%s / thread, mode %s, batch %d, %s: %s", row["backend"], row["mode"], row["batch"],
                    row["body"], row["images_per_s_ratio"])
    record["targets"] = targets(record)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    write_outputs(record, config, m, info)
    return record


def write_outputs(record: dict[str, Any], config: ThroughputConfig, m: Manifest, info: dict[str, Any]) -> None:
    from bench.plots import throughput_figure

    suffix = f"-{config.tag}" if config.tag else ""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"throughput{suffix}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    title = (f"n={record['n']}, k={record['k']}, wrk {config.connections} connections, "
             f"{config.duration_s} s per point — {machine_label(info)}")
    if "UNTRAINED" in str(m.provenance.get("note")).upper():
        title += " — UNTRAINED bundle (timing only)"
    png = throughput_figure(record, out_dir / f"throughput{suffix}.png", title)
    for t in record["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        logger.info("target %s (b=%d, %s): %s %s%s", t["name"], t["batch"], t["body"], t["value"], state,
                    f" — {t['limit']}" if t.get("limit") else "")
    logger.info("wrote %s and %s in %.0f s", json_path, png, record["wall_s"])


def failed_points(record: dict[str, Any]) -> list[str]:
    """Every mode or point that errored (not the skipped ones), for the exit status."""
    failed = []
    for name, sec in [*record["servers"].items(), (PEER, record["peer"])]:
        if "error" in sec:
            failed.append(name)
        failed += [f"{name} b={p['batch']} {p['body']}" for p in sec.get("points", []) if "error" in p]
    return failed


# -- CLI -------------------------------------------------------------------------------------------------
_LIST_FLAGS = ("bundle", "modes", "batches", "bodies", "server_args", "backends")  # parsed below; the rest 1:1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=ThroughputConfig.bundle)
    p.add_argument("--modes", default=",".join(ALL_MODES), help="server modes, comma separated (default: all)")
    p.add_argument("--batches", default="1,8,32", help="images per request, comma separated")
    p.add_argument("--bodies", default=",".join(BODY_KINDS), help="request bodies: binary,json")
    p.add_argument("--server-args", default="", help="extra server flags, space separated, passed through")
    p.add_argument("--backends", default="thread", help="--workers-backend values, comma separated, each "
                   "served side by side (ray: inside a private network namespace, see bench/netns_cluster.py)")
    add_dataclass_flags(p, ThroughputConfig, skip=_LIST_FLAGS, helps={"coding": CODING_HELP})
    return p


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> ThroughputConfig:
    try:
        batches = tuple(int(x) for x in _names(args.batches))
    except ValueError as exc:
        raise ThroughputBenchError(f"--batches must be comma-separated integers, got {args.batches!r}") from exc
    values = dataclass_values(ThroughputConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS})
    return ThroughputConfig(bundle=args.bundle, modes=_names(args.modes), batches=batches,
                            bodies=_names(args.bodies), server_args=tuple(args.server_args.split()),
                            backends=_names(args.backends), **values)


def main(argv: list[str] | None = None) -> int:
    install_sigterm_handler()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    try:
        config = config_from_args(build_parser().parse_args(argv))
        from bench.wrk import wrk_path

        wrk_path()
    except (ThroughputBenchError, WrkError) as exc:
        logger.error("%s", exc)
        return 2
    record = run(config)
    failed = failed_points(record)
    if failed:
        logger.error("%d point(s) failed (recorded with their error): %s", len(failed), ", ".join(failed))
        return 1
    return 0
