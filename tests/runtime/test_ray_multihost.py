"""A real multi-host Ray fleet on one machine (bench/netns_cluster.py): a Ray head and the
server in one network namespace, a Ray worker node in each of three others, joined by a
private bridge. Failures come from the nodes and the network: a node's raylet killed, a
host's link taken down, a host's link throttled. Every request is still answered once,
the rebuilt ones flagged, and each failed worker comes back when its node does.

Needs root (ip netns) and Ray; skips with the reason otherwise. No traffic leaves the
namespaces the test makes, and it removes them all."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_harness import TinyModel, metric_value

from bench.loadgen import LoadConfig, LoadRecord
from bench.netns_cluster import NetnsCluster, unavailable_reason
from bench.serverproc import loadgen_argv

REPO = Path(__file__).resolve().parents[2]
PORT, METRICS_PORT = 8000, 8002  # inside the head's namespace: nothing else listens there
SAFETY_S = 120.0  # bounds waits for Ray to notice a failure and recover; reached on failure


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install -e '.[dist]'")
    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    with NetnsCluster(workers=3, cpus_per_node=1) as made:
        yield made


def _head_get(cluster: NetnsCluster, url: str) -> tuple[int, str]:
    code = ("import sys, urllib.request, urllib.error\n"
            "try:\n    r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); "
            "print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n"
            "except OSError:\n    print(0)\n")
    run = subprocess.run(cluster.wrap(0, [sys.executable, "-c", code, url]), capture_output=True,
                         text=True, timeout=60)
    status, _, body = run.stdout.partition("\n")
    return int(status or 0), body


def _metrics(cluster: NetnsCluster) -> str:
    return _head_get(cluster, f"http://127.0.0.1:{METRICS_PORT}/metrics")[1]


def _wait(predicate, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + SAFETY_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SAFETY_S:g} s: {what}")
        time.sleep(0.5)


def _start_load(cluster: NetnsCluster, out: Path, requests: int) -> subprocess.Popen:
    config = LoadConfig(url=f"http://127.0.0.1:{PORT}", model_name="tiny", input_shape=(1, 4, 4),
                        pattern="closed", concurrency=4, num_requests=requests, timeout_s=60.0)
    return cluster.run(0, loadgen_argv(config, out), cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT)


def _finish(load: subprocess.Popen, out: Path) -> LoadRecord:
    assert load.wait(timeout=SAFETY_S * 2) == 0
    return LoadRecord.from_dict(json.loads(out.read_text()))


def _percentiles(record: LoadRecord) -> str:
    import numpy as np

    ms = np.asarray(record.latency_ms)
    return f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms"


def _all_up(cluster: NetnsCluster) -> bool:
    return metric_value(_metrics(cluster), "coded_worker_ready") == 3


def test_a_ray_fleet_on_network_namespaces_survives_failed_nodes_and_links(
        cluster: NetnsCluster, tiny: TinyModel, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = cluster.run(0, [sys.executable, "-m", "runtime", "serve", str(tiny.bundle),
                                 "--workers-backend", "ray", "--ray-address", cluster.ray_address,
                                 "--ray-num-cpus", "1", "--http-port", str(PORT),
                                 "--metrics-port", str(METRICS_PORT), "--grpc-port", "-1",
                                 "--max-queue-delay-ms", "5", "--log-level", "INFO"],
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _head_get(cluster, f"http://127.0.0.1:{PORT}/v2/health/ready")[0] == 200,
              "the server ready")
        placed = set(re.findall(r"Ray actor up \(pid \d+, node \w+ at ([\d.]+)\)",
                                log_path.read_text()))
        assert placed == {cluster.address(i) for i in (1, 2, 3)}  # one actor per worker host

        def failures() -> float:
            return metric_value(_metrics(cluster), "coded_worker_failures_total")

        def under_load(name: str, fault, heal, fails: bool) -> LoadRecord:  # noqa: ANN001
            out = tmp_path / f"{name}.json"
            before = metric_value(_metrics(cluster), "nv_inference_count")
            failed_before = failures()
            load = _start_load(cluster, out, requests=300)
            _wait(lambda: metric_value(_metrics(cluster), "nv_inference_count") >= before + 40,
                  f"{name}: load under way")
            fault()
            record = _finish(load, out)
            assert record.status == [200] * 300, (name, record.errors)  # each answered
            print(f"{name}: {_percentiles(record)}, {sum(record.reconstructed)} rebuilt")
            if fails:  # Ray tells the server once it finds the node dead (health checks)
                _wait(lambda: failures() > failed_before, f"{name}: the server sees the failure")
                assert not _all_up(cluster)
            heal()
            _wait(lambda: _all_up(cluster), f"{name}: every worker back")
            return record

        records = [
            under_load("healthy", lambda: None, lambda: None, fails=False),
            under_load("raylet killed on host 1", lambda: cluster.kill_raylet(1),
                       lambda: cluster.start_node(1), fails=True),
            under_load("host 2 cut off", lambda: cluster.link(2, up=False),
                       lambda: (cluster.link(2, up=True), cluster.start_node(2)), fails=True),
            under_load("host 3 throttled", lambda: cluster.throttle(3, "256kbit"),
                       lambda: cluster.throttle(3, None), fails=False),
        ]
        for record in records[1:]:
            assert sum(record.reconstructed) > 0  # decoded around the failed or slow host
        text = _metrics(cluster)
        assert metric_value(text, "nv_inference_request_success") == 4 * 300
        assert metric_value(text, "coded_reconstructed_responses_total") == sum(
            sum(r.reconstructed) for r in records)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        print(log_path.read_text()[-3000:])
