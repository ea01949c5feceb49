"""`python -m bench multihost [BUNDLE]`: the paper's latency setup on a Ray fleet of test
hosts (bench/netns_cluster.py: network namespaces on a private bridge, one Ray worker node
per worker, the Ray head and the server in another) beside the in-process thread backend,
in one `bench latency` run inside the head's namespace:

    python -m bench latency BUNDLE --backends thread,ray [--coding N,K] \\
        --ray-args "--ray-address HEAD:6379 --ray-num-cpus 1" --modes ... --tag multihost...

with one host per worker of the code measured (the bundle's first, or `--coding N,K`).
Each worker actor then sits on its own node and every call crosses a veth pair and a
bridge, as between machines. Needs root (ip netns) and Ray. The record is the latency
bench's (bench/results/serving/latency-<tag>.json + .png); the namespaces and every process
in them are removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code
from bench.entry import bench_main
from bench.errors import BenchError
from bench.netns_cluster import NetnsCluster, unavailable_reason
from bench.serverproc import REPO_ROOT

logger = logging.getLogger(__name__)


class MultihostError(BenchError):
    """Invalid multihost configuration, or no namespaces here."""


@dataclass
class MultihostConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to measure, "N,K"; None = its first
    modes: str = "reference,coded-clean,uncoded,coded"
    num_queries: int = 2000
    delay_ms: float = 100.0
    tag: str = "multihost"

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise MultihostError(f"--num-queries must be >= 1, got {self.num_queries}")
        self.coding = check_coding(self.coding, [self.bundle], MultihostError)


def run(config: MultihostConfig) -> int:
    if (reason := unavailable_reason()) is not None:
        raise MultihostError(reason)
    n = load_code(config.bundle, config.coding).coding.n
    with NetnsCluster(workers=n, cpus_per_node=1) as cluster:
        logger.info("Ray fleet up: head %s, %d worker hosts", cluster.ray_address, n)
        argv = [sys.executable, "-m", "bench", "latency", config.bundle, *coding_server_args(config.coding),
                "--backends", "thread,ray",
                "--ray-args", f"--ray-address {cluster.ray_address} --ray-num-cpus 1",
                "--modes", config.modes, "--num-queries", str(config.num_queries),
                "--delay-ms", str(config.delay_ms), "--tag", config.tag]
        proc = cluster.run(0, argv, cwd=REPO_ROOT)
        return proc.wait()


def build_parser() -> argparse.ArgumentParser:
    from kernels.configs import add_dataclass_flags

    p = argparse.ArgumentParser(prog="python -m bench multihost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=MultihostConfig.bundle)
    add_dataclass_flags(p, MultihostConfig, skip=("bundle",), helps={"coding": CODING_HELP})
    return p


def config_from_args(args: argparse.Namespace) -> MultihostConfig:
    return MultihostConfig(**{k: v for k, v in vars(args).items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), config_from_args, run, (MultihostError,))
