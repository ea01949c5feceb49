"""Test hosts on one machine: network namespaces on a private bridge, each one a Ray node.

    with NetnsCluster(workers=3) as cluster:
        cluster.run(0, [sys.executable, "-m", "runtime", "serve", BUNDLE,
                        "--workers-backend", "ray", "--ray-address", cluster.ray_address])

makes a switch namespace holding a bridge and one namespace per host, each joined to the
bridge by a veth pair with a private address (SUBNET.<i + 1>/24) and its own loopback; host
0 runs the Ray head (no CPUs, so worker actors go to the other hosts), hosts 1.. a Ray
worker node each with `cpus_per_node` CPUs and its own temporary directory. Nothing is
added to the machine's own namespace and no host has a route out, so no traffic leaves the
namespaces. Failures as a real fleet has them: `link(i, up=False)` cuts a host off,
`throttle(i, rate)` slows its link (tc tbf), `kill_raylet(i)` fails its node. Everything it
started is killed (every process inside its namespaces) and every namespace removed on exit.

Needs root (`ip netns`), iproute2 and Ray (`pip install -e '.[dist]'`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.errors import BenchError

logger = logging.getLogger(__name__)

SUBNET = "10.213.0"  # private (RFC 1918), used only inside the namespaces made here
RAY_PORT = 6379
NODE_TIMEOUT_S = 120.0


class NetnsError(BenchError, RuntimeError):
    """The namespaces or the Ray nodes could not be set up here."""


def _ip(*args: str) -> None:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if run.returncode:
        raise NetnsError(f"ip {' '.join(args)}: {run.stderr.strip()}")


def loopback_only() -> bool:
    """Whether this process's network namespace has nothing but loopback (where a local Ray
    instance binds to 127.0.0.1 instead of the machine's own address)."""
    return {name for _, name in socket.if_nameindex()} == {"lo"}


def require_loopback_only(what: str) -> None:
    """Refuse to start a local Ray instance on the machine's own network."""
    if not loopback_only():
        raise NetnsError(
            f"{what} starts a local Ray instance, which binds to this machine's non-loopback "
            "address; run it inside a private network namespace with only loopback up: "
            "unshare -n sh -c 'ip link set lo up && python -m bench ...'")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    name = f"cprobe{os.getpid()}"
    run = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if run.returncode:
        return f"cannot create network namespaces here (ip netns add: {run.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


ALIVE_MARK = "alive-ray-nodes:"


def alive_count(stdout: str) -> int:
    """The node count the probe printed after `ALIVE_MARK`; 0 when it printed none. Ray's
    driver can echo a node's log (a crashed raylet's stack trace) to stdout around it."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(ALIVE_MARK):
            return int(line.removeprefix(ALIVE_MARK))
    return 0


class NetnsCluster:
    def __init__(self, workers: int = 3, cpus_per_node: float = 1.0, subnet: str = SUBNET,
                 tag: str | None = None) -> None:
        if workers < 1:
            raise NetnsError(f"workers must be >= 1, got {workers}")
        self.tag = tag or f"c{os.getpid() % 100000}"
        self.hosts = [f"{self.tag}h{i}" for i in range(workers + 1)]  # 0 = the head
        self.switch = f"{self.tag}sw"
        self.subnet = subnet
        self.cpus_per_node = cpus_per_node
        self.ray_address = f"{self.address(0)}:{RAY_PORT}"
        self._root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/tmp"))  # short paths
        self._made: list[str] = []
        self._nodes: dict[int, subprocess.Popen] = {}
        # Ray's token authentication, with a token of this cluster's own: every process run
        # in it (nodes, the server, clients) gets it
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host + 1}"

    def wrap(self, host: int, argv: list[str]) -> list[str]:
        """argv as run inside host `host`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def run(self, host: int, argv: list[str], **popen: Any) -> subprocess.Popen:
        """argv started inside host `host` (with the cluster's Ray token in its environment)."""
        return subprocess.Popen(self.wrap(host, argv), **{"env": self.env, **popen})

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> NetnsCluster:
        try:
            self._make_network()
            self.start_node(0)
            for host in range(1, len(self.hosts)):
                self.start_node(host)
            self.wait_for_nodes(len(self.hosts))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_network(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def start_node(self, host: int) -> None:
        """Start host `host`'s Ray node (the head for host 0); again after `kill_raylet`."""
        old = self._nodes.pop(host, None)
        if old is not None:
            self._kill_group(old)
        ray = str(Path(sys.executable).with_name("ray"))
        argv = [ray, "start", "--block", "--node-ip-address", self.address(host),
                "--temp-dir", str(self._root / f"n{host}"), "--disable-usage-stats"]
        if host == 0:
            argv += ["--head", "--port", str(RAY_PORT), "--num-cpus", "0",
                     "--include-dashboard", "false"]
        else:
            argv += ["--address", self.ray_address, "--num-cpus", f"{self.cpus_per_node:g}",
                     "--resources", json.dumps({f"host{host}": 1})]
        log = open(self._root / f"node{host}.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            self._nodes[host] = self.run(host, argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         env={**self.env, "RAY_health_check_period_ms": "500",
                                              "RAY_health_check_failure_threshold": "4"})
        finally:
            log.close()

    def alive_nodes(self) -> int:
        """Ray nodes the head counts alive, asked from inside the head's namespace."""
        probe = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 f"print({ALIVE_MARK!r}, sum(n['Alive'] for n in ray.nodes()))")
        run = subprocess.run(self.wrap(0, [sys.executable, "-c", probe, self.ray_address]),
                             capture_output=True, text=True, timeout=60, env=self.env)
        return 0 if run.returncode else alive_count(run.stdout)

    def wait_for_nodes(self, count: int, timeout_s: float = NODE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while (alive := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise NetnsError(f"{alive} of {count} Ray nodes up after {timeout_s:.0f} s; "
                                 f"logs in {self._root}")
            time.sleep(1.0)

    def close(self) -> None:
        """Kill every process in the namespaces (SIGKILL: test hosts need no graceful
        stop, and a Ray node waits for its head otherwise), remove them and the files."""
        for ns in reversed(self._made):
            for pid in self.pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._nodes.values():
            self._kill_group(proc)
        self._nodes = {}
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made = []
        shutil.rmtree(self._root, ignore_errors=True)

    @staticmethod
    def pids(ns: str) -> list[int]:
        run = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                             timeout=30)
        return [int(p) for p in run.stdout.split()]

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        """SIGKILL a node's `ray start` and the processes of its session, then reap it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    # -- failures ----------------------------------------------------------------------------
    def link(self, host: int, up: bool) -> None:
        """Take host `host`'s only link down (cut off from every other host) or up again."""
        _ip("-n", self.hosts[host], "link", "set", "eth0", "up" if up else "down")

    def throttle(self, host: int, rate: str | None) -> None:
        """Limit host `host`'s outgoing link to `rate` (e.g. "2mbit"; a token bucket); None
        lifts the limit."""
        ns = self.hosts[host]
        if rate is None:
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True, timeout=30)
            return
        run = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0",
                              "root", "tbf", "rate", rate, "burst", "16kbit", "latency", "500ms"],
                             capture_output=True, text=True, timeout=30)
        if run.returncode:
            raise NetnsError(f"tc tbf on {ns}: {run.stderr.strip()}")

    def kill_raylet(self, host: int) -> int:
        """SIGKILL host `host`'s raylet (its node fails, and its actors with it); its pid."""
        for pid in self.pids(self.hosts[host]):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"/raylet"):
                os.kill(pid, signal.SIGKILL)
                return pid
        raise NetnsError(f"no raylet found in {self.hosts[host]}")
