"""`python -m bench profile [BUNDLE]`: where a request's CPU time goes, by py-spy.

For each mode and batch size the real server runs under wrk (binary bodies, `connections`
keep-alive connections) while `py-spy record --idle --threads` samples every thread of the
server process at `rate_hz`. Each sampled stack is put in ONE stage, the first that
matches in this order (a stack inside the encoder is "encoder" even when its caller is the
HTTP handler):

  workers (f)     a compute thread inside ONNX Runtime (worker calls of f)
  encoder         Frontend.encode (the coded encoders, on the loop or a thread)
  heads           Frontend.classify
  decode          the online decoder (kernels/coding.py)
  tensor decode   request parsing and preprocessing (protocol.parse_infer_request, preprocess)
  response        building and encoding the answer, writing it (encode_response, http_writer)
  batching        batcher / scheduler / forming groups
  dispatch        worker pool, thread worker, fault wrapper, mode bookkeeping, executor hand-off
  HTTP            the rest of aiohttp and the HTTP frontend
  event loop      asyncio itself

Idle samples (a compute thread waiting for work, the loop waiting in epoll, grpc.aio's
poller thread blocked in C) are counted apart, so the table's shares are of busy samples. py-spy is installed from PyPI
(`pip install py-spy`); it needs ptrace rights over the server (it starts it, as its parent's
child, so root or a permissive ptrace_scope). Written: bench/results/profile/profile{-tag}.json
and a markdown table beside it; the raw py-spy outputs stay under run_dir.

To compare two commits, run it in a checkout of each with the same flags and the tags
`before` / `after`: both tables have the same rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code, refuse_coding_in
from bench.entry import bench_main, comma_list
from bench.errors import BenchError
from bench.machine import machine_info, machine_label
from bench.serverproc import ServerProcess
from bench.soakload import load_images
from bench.wrk import infer_url, make_body, run_wrk
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)

WORKERS = "workers (f)"
IDLE_WORKERS = "idle: compute threads"
IDLE_LOOP = "idle: event loop"
IDLE_OTHER = "idle: gRPC poller"  # grpc.aio's completion-queue thread, blocked in C (epoll)
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (  # first match wins
    ("encoder", ("Frontend.encode",)),
    ("heads", ("Frontend.classify",)),
    ("decode", ("OnlineDecoder", "kernels/coding.py")),
    ("tensor decode", ("parse_infer_request", "preprocess (", "_read_request")),
    ("response", ("encode_response", "build_result", "write_eof", "http_writer")),
    ("batching", ("batcher.py", "scheduler.py", "as_groups")),
    ("dispatch", ("pool.py", "thread_worker.py", "faults.py", "modes/", "futures/thread.py",
                  "run_in_executor")),
    ("HTTP", ("aiohttp", "http_server.py")),
    ("event loop", ("asyncio",)),
)
ORDER = (WORKERS, *(name for name, _ in STAGES), "other")


class ProfileBenchError(BenchError):
    """Invalid profile configuration, or py-spy missing."""


@dataclass
class ProfileConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to serve, "N,K"; None = its first
    modes: tuple[str, ...] = ("coded", "uncoded")
    batches: tuple[int, ...] = (1, 32)
    duration_s: int = 8
    warmup_s: int = 2
    connections: int = 16
    rate_hz: int = 200
    server_args: tuple[str, ...] = ()
    out_dir: str = "bench/results/profile"
    run_dir: str = "runs/bench/profile"
    tag: str = ""

    def __post_init__(self) -> None:
        self.modes, self.batches = tuple(self.modes), tuple(int(b) for b in self.batches)
        self.server_args = tuple(self.server_args)
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise ProfileBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], ProfileBenchError)
        refuse_coding_in("--server-args", self.server_args, ProfileBenchError)
        if not self.modes or not self.batches or min(self.batches) < 1:
            raise ProfileBenchError("--modes and --batches must be non-empty, batches >= 1")
        if self.duration_s < 1 or self.warmup_s < 1 or self.connections < 1 or self.rate_hz < 1:
            raise ProfileBenchError("--duration-s, --warmup-s, --connections, --rate-hz must be >= 1")


def stage_of(stack: str) -> str:
    """The stage of one py-spy raw stack ("thread (tid): name;frame;frame ...")."""
    frames = stack.split(";")
    if "coded-worker" in frames[0]:  # a compute thread of the engine's pool
        if "OrtRunner.run" not in stack:
            return IDLE_WORKERS  # waiting for work (or for the GIL)
        if "Frontend." in stack:  # the frontend's encoders or heads, run on a thread
            return next(name for name, marks in STAGES[:2] if any(m in stack for m in marks))
        return WORKERS
    if "_poll_wrapper" in frames[0]:  # py-spy cannot see that its C call is blocked
        return IDLE_OTHER
    last = frames[-1]
    if last.startswith("Runner.run (asyncio/runners.py") or "select (" in last:
        return IDLE_LOOP
    for name, marks in STAGES:
        if any(m in stack for m in marks):
            return name
    return "other"


def tally(raw: str) -> dict[str, int]:
    """Samples per stage from py-spy's `--format raw` output (one "stack count" per line)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack)] += int(count)
    return dict(counts)


def shares(counts: dict[str, int]) -> dict[str, float]:
    """Each busy stage's share of the busy samples."""
    busy = sum(v for k, v in counts.items() if not k.startswith("idle"))
    return {k: counts.get(k, 0) / busy for k in ORDER} if busy else {}


def py_spy() -> str:
    path = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    if not Path(path).exists():
        raise ProfileBenchError("py-spy not found: pip install py-spy")
    return path


def profile_point(config: ProfileConfig, m: Manifest, mode: str, batch: int, run_dir: Path,
                  images: Any) -> dict[str, Any]:
    args = ["--mode", mode, *coding_server_args(config.coding), "--log-level", "WARNING", *config.server_args]
    body = make_body("binary", m.input.name, images[:batch])
    raw_path = run_dir / f"{mode}-b{batch}.pyspy.txt"
    with ServerProcess(config.bundle, args, run_dir / f"{mode}-b{batch}.server.log") as srv:
        assert srv.proc is not None
        url = infer_url(srv.url, m.model_name)
        run_wrk(url, body, run_dir, config.connections, config.warmup_s)
        spy = subprocess.Popen([py_spy(), "record", "-p", str(srv.proc.pid), "-d",
                                str(config.duration_s), "-r", str(config.rate_hz), "-f", "raw",
                                "-o", str(raw_path), "--threads", "--idle", "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        result = run_wrk(url, body, run_dir, config.connections, config.duration_s)
        _, err = spy.communicate(timeout=config.duration_s + 60)
        if spy.returncode != 0 or not raw_path.exists():
            raise ProfileBenchError(f"py-spy failed (exit {spy.returncode}): {err[-1000:]}")
    counts = tally(raw_path.read_text())
    point = {"mode": mode, "batch": batch, "images_per_s": result.requests_per_s * batch,
             "wrk": result.to_dict(), "samples": counts, "busy_share": shares(counts)}
    logger.info("%s batch %d: %.0f images/s under py-spy; busy shares %s", mode, batch,
                point["images_per_s"], {k: round(v, 3) for k, v in point["busy_share"].items() if v})
    return point


def markdown(record: dict[str, Any]) -> str:
    points = record["points"]
    head = " | ".join(f"{p['mode']} b{p['batch']}" for p in points)
    lines = [f"# Where the CPU time goes ({record['config']['tag'] or 'untagged'})", "",
             f"py-spy at {record['config']['rate_hz']} Hz, every server thread, wrk "
             f"{record['config']['connections']} connections, binary requests; share of busy "
             f"samples per stage. Machine: {machine_label(record['machine'])}; commit "
             f"{record['machine'].get('git_commit', '?')}.", "",
             f"| stage | {head} |", "|---|" + "---|" * len(points)]
    for stage in ORDER:
        lines.append(f"| {stage} | " + " | ".join(f"{100 * p['busy_share'].get(stage, 0):.1f} %"
                                                  for p in points) + " |")
    lines.append("| images/s (under py-spy) | " + " | ".join(f"{p['images_per_s']:.0f}"
                                                            for p in points) + " |")
    return "\n".join(lines) + "\n"


def run(config: ProfileConfig) -> dict[str, Any]:
    m = load_code(config.bundle, config.coding)
    images, _, _ = load_images(m, max(config.batches), seed=0)
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir.mkdir(parents=True, exist_ok=True)
    points = [profile_point(config, m, mode, batch, run_dir, images)
              for mode in config.modes for batch in config.batches]
    record = {"benchmark": "profile", "config": asdict(config), "machine": machine_info(),
              "code": m.code.label, "points": points, "run_dir": str(run_dir)}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{config.tag}" if config.tag else ""
    (out / f"profile{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"profile{suffix}.md").write_text(markdown(record))
    logger.info("wrote %s", out / f"profile{suffix}.md")
    return record


_LIST_FLAGS = ("bundle", "modes", "batches", "server_args")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=ProfileConfig.bundle)
    p.add_argument("--modes", default="coded,uncoded")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--server-args", default="", help="extra server flags, space separated")
    add_dataclass_flags(p, ProfileConfig, skip=_LIST_FLAGS, helps={"coding": CODING_HELP})
    return p


def config_from_args(args: argparse.Namespace) -> ProfileConfig:
    values = dataclass_values(ProfileConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS})
    return ProfileConfig(bundle=args.bundle, modes=comma_list(args.modes), batches=comma_list(args.batches, int),
                         server_args=tuple(args.server_args.split()), **values)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), config_from_args, run,
                      (ProfileBenchError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
