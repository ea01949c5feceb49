"""`python -m bench COMMAND ...`: seeded benchmarks that write JSON + PNG under bench/results/."""

from __future__ import annotations

from kernels.commands import dispatch

COMMANDS = {
    "accuracy": ("bench.accuracy", "degraded-mode accuracy: Coded-InvNet vs ParM vs ApproxIFER"),
    "latency": ("bench.latency", "end-to-end tail latency of the real server under stragglers"),
    "overhead": ("bench.overhead", "compute time of Enc, f, g and decode time against k"),
    "encoders": ("bench.encoders", "encoder Pareto front on one f: degraded accuracy against Enc/f"),
    "throughput": ("bench.throughput", "every mode under wrk beside raw f, the coded ceiling, a Triton peer"),
    "monitor": ("bench.monitor", "the live decode-quality monitor on MNIST, then Fashion-MNIST traffic"),
    "multihost": ("bench.multihost", "the paper's latency setup on a Ray fleet of network-namespace hosts"),
    "ray-overhead": ("bench.ray_overhead", "one coding group on Ray actors against threads (per-group cost)"),
    "protocols": ("bench.protocols", "KServe v2 over HTTP beside gRPC unary and streaming"),
    "served": ("bench.served", "served accuracy and tails per decode policy, with and without stragglers"),
    "profile": ("bench.profile", "py-spy: where a request's CPU time goes, stage by stage"),
    "kernel": ("bench.kernel", "online-decoder kernel latency and bandwidth (CUDA or numpy)"),
    "soak": ("bench.soak", "long run under faults and malformed input; every answer checked; SIGTERM"),
    "overload": ("bench.overload", "goodput, p99 and 503s at 1x..8x the capacity's connections"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m bench", __doc__ or "", COMMANDS, argv)
