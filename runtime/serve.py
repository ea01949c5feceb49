"""`python -m runtime serve BUNDLE [options]`: serve a bundle over KServe v2 HTTP.

Every flag maps one-to-one onto a `ServerConfig` field (fault flags onto `FaultConfig`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from kernels.configs import add_dataclass_flags
from runtime.config import DEVICES, ENGINES, FaultConfig, ServerConfig
from runtime.errors import ServingError
from runtime.loops import loop_factory
from runtime.manifest import ManifestError
from runtime.server import Server

logger = logging.getLogger(__name__)

HELP = {
    "host": "address to listen on",
    "http_port": "KServe v2 HTTP port (0 = any free port)",
    "metrics_port": "Prometheus /metrics port (0 = any free port, -1 = off)",
    "grpc_port": "KServe v2 gRPC port, GRPCInferenceService (0 = any free port, -1 = off)",
    "workers": "compute threads shared by all workers (0 = min(workers, CPU count))",
    "mode": "serving scheme",
    "coding": "which of the bundle's codes to serve, as N,K (e.g. 5,4; a bundle exported with "
              "several encoder/ParM checkpoints holds several codes for one f, listed by "
              "`python -m export verify BUNDLE`); unset = the bundle's first code",
    "workers_backend": "where the n workers run: thread = threads of this process; ray = one "
                       "Ray actor each (pip install '.[dist]'), across a cluster's nodes",
    "ray_address": "ray backend: address of a running Ray cluster to join (`ray start --head` "
                   "prints it; 'auto' = RAY_ADDRESS or this node's cluster); unset = start a "
                   "local Ray instance",
    "ray_num_cpus": "ray backend: CPUs each worker actor reserves (unset = min(1, cluster "
                    "CPUs / workers))",
    "ray_num_gpus": "ray backend: GPUs each worker actor reserves (1 = a GPU per worker)",
    "ray_max_restarts": "ray backend: how often Ray restarts a worker actor whose process died "
                        "(-1 = always); after that the server makes a new actor",
    "ray_start_timeout_s": "ray backend: a worker actor (or the placement of all of them) not "
                           "up within this many seconds is a failed start",
    "engine": "inference engine for f on the workers",
    "device": "cpu (onnxruntime) or cuda (torch, tensorrt)",
    "encoders_on_workers": "run each encoder on its backup worker instead of the frontend "
                           "(paper Remark 3)",
    "systematic_grace_ms": "coded mode: once any k results are in, wait up to this long for "
                           "missing systematic results, which give exact answers, before "
                           "decoding (0 = decode at once, as in the paper); unset = learned: "
                           "when at least half of recent missing systematic results came "
                           "within --decode-wait-cap-ms of decodability, wait their "
                           "--decode-wait-quantile; else decode at once",
    "decode_wait_quantile": "quantile of the recent latenesses (within the cap) that the "
                            "learned decode wait waits",
    "decode_wait_cap_ms": "the learned decode wait never exceeds this",
    "straggler_scale": "a worker call still missing this many times later than its "
                       "dispatch's first result is a straggler: the dispatch frees its "
                       "in-flight slot for the next one, and coded mode re-sends what it "
                       "cannot decode (0 = never); thread workers' dispatches needing w "
                       "rounds of the compute threads get w - 1 first-result times more",
    "straggler_min_ms": "a call is never a straggler sooner than this after its launch",
    "redispatch": "coded mode: a group that has more stragglers than parities re-sends its "
                  "missing systematic slots to workers that already answered it",
    "redispatch_copies": "coded mode: each re-sent slot goes to this many of those workers "
                         "(its first result counts; a re-sent call can straggle too)",
    "cancel_late_calls": "a coding group's worker calls still running once it is answered "
                         "are cancelled (a worker that has not started one skips it; ray "
                         "backend: ray.cancel stops it in the actor): at once when nothing "
                         "reads them, else after --decode-wait-cap-ms",
    "shadow_decode_fraction": "coded and parm modes: for this fraction of the coding groups in "
                              "which every exact answer and a parity came, rebuild one known "
                              "answer from the parity after answering, at low priority, and "
                              "compare it with the exact one (statistics endpoint 'shadow', "
                              "coded_shadow_* metrics; 0 = off)",
    "shadow_alert_below": "log a warning and set coded_shadow_alert when some head's windowed "
                          "shadow agreement is below this with 95 percent confidence (the upper end of "
                          "its Wilson interval is)",
    "shadow_window": "compared answers per head in the running shadow agreement",
    "frontend_inline_ms": "a frontend call (the encoders of a dispatch, or its heads) that "
                          "warm-up timings predict faster than this runs on the event loop "
                          "instead of the thread pool (0 = always the pool)",
    "max_queue_delay_ms": "longest a query waits for its coding group of k to fill; a partial "
                          "group is then padded with repeats of its last query",
    "max_groups_per_call": "under load, one dispatch batches up to this many complete coding "
                           "groups into each worker call (1 = one group per call)",
    "max_queue_size": "queued queries; a request finding the queue full waits for room (see "
                      "--admission-wait-ms), then gets 503 + Retry-After",
    "admission_wait_ms": "how long a request finding the queue full waits for room, its body "
                         "unread, before 503 + Retry-After (0 = refuse at once)",
    "max_waiting_requests": "requests waiting for room at once; more get 503 at once",
    "max_inflight_groups": "dispatches (each up to --max-groups-per-call groups) executing at "
                           "once; 0 = one per compute thread (--workers)",
    "max_batch_size": "largest batch B in one request",
    "max_body_bytes": "request bodies above this get 413",
    "worker_deadline_ms": "a worker call overdue by this is an erasure; the worker is restarted",
    "request_timeout_ms": "default request timeout (a request's timeout_ms parameter overrides)",
    "drain_timeout_s": "on SIGTERM/SIGINT, wait this long for in-flight requests",
    "keepalive_timeout_s": "close a connection that is idle, or whose request headers have not "
                           "all arrived, this long after it opened or after its last response",
    "read_timeout_s": "a request body must arrive within this many seconds (else 408)",
    "large_body_bytes": "request bodies above this many bytes are parsed in a helper process, "
                        "off the event loop",
    "gpu_decode": "with --mode coded --engine torch --device cuda, keep worker results on the GPU "
                  "and decode them there with kernels.cuda_decoder (host decoding if it cannot "
                  "load)",
    "verify_checksums": "check every bundle file's sha256 against the manifest at start-up",
    "gc_freeze": "once ready, move the start-up heap (models, modules) out of the cyclic "
                 "garbage collector's scans (gc.freeze), so a full collection under load is "
                 "short",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}
FAULT_HELP = {
    "delay_ms": "TEST ONLY: delay a worker's answer by this many ms ...",
    "delay_prob": "TEST ONLY: ... with this probability per call",
    "straggler_per_group": "TEST ONLY: instead, delay exactly one random worker of the first k "
                           "in each coding group by --fault-delay-ms",
    "fail_prob": "TEST ONLY: a worker call raises with this probability",
    "kill_worker": "TEST ONLY: this worker dies after --fault-kill-after-calls calls (once) and "
                   "is restarted by the supervisor",
    "kill_after_calls": "TEST ONLY: see --fault-kill-worker",
    "kill_repeat": "TEST ONLY: with --fault-kill-worker, every restarted incarnation dies "
                   "after --fault-kill-after-calls calls too",
    "kill_prob": "TEST ONLY: any worker call kills its worker with this probability (the "
                 "supervisor restarts it); for soak tests",
    "seed": "TEST ONLY: seed of the fault-injection random numbers",
}
def _choices() -> dict[str, tuple[str, ...]]:
    from runtime.modes import MODES
    from runtime.worker import BACKENDS

    return {"mode": tuple(MODES), "workers_backend": tuple(BACKENDS), "engine": ENGINES,
            "device": DEVICES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle directory (manifest.json + ONNX files)")
    add_dataclass_flags(parser, ServerConfig, helps=HELP, skip={"bundle", "faults"},
                        choices=_choices())
    add_dataclass_flags(parser, FaultConfig, helps=FAULT_HELP, prefix="fault_")
    return parser


def config_from_args(argv: list[str] | None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    return ServerConfig.from_dict(vars(args))


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Server(config).run_until(stop, on_ready=freeze_heap if config.gc_freeze else None)


def freeze_heap() -> int:
    """Collect once, then freeze what is left: the start-up heap (models, modules, the
    server's own objects) is never garbage, yet every full collection walked it (tens of
    thousands of objects, 13-33 ms on 2 cores, paused serving; frozen: 1-4 ms). Only for
    the serving process: objects frozen here are never collected again. Returns how many
    objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("start-up heap frozen: %d objects out of the collector's scans", frozen)
    return frozen


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    factory, loop_name = loop_factory()
    logger.info("event loop: %s", loop_name)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(config))
    except (ManifestError, ServingError, OSError, ValueError) as exc:
        logger.error("cannot serve %s: %s", config.bundle, exc)
        return 1
    return 0
