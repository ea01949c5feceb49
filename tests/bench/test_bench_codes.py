"""`--coding N,K` in every bench tool that takes a BUNDLE (bench/codes.py): the flag parses and
is checked against the bundle, `--coding` inside `--server-args` is refused, every server a
tool starts is told the code, and the record names the code measured. The bundle holds two
codes, (3,2) first and (4,3), so measuring the second one shows in k."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_harness import build_tiny_bundle  # noqa: E402

from bench import (  # noqa: E402
    latency,
    monitor,
    multihost,
    overhead,
    overload,
    profile,
    protocols,
    ray_overhead,
    served,
    soak,
    throughput,
    triton_peer,
)
from bench.codes import CodingError, check_coding, coding_server_args, load_code, refuse_coding_in  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.serverproc import BenchProcessError  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Schema 2: (3,2) first (what every tool measured before --coding), then (4,3)."""
    return build_tiny_bundle(tmp_path_factory.mktemp("codes") / "two", codes=[(3, 2), (4, 3)]).bundle


# -- bench/codes.py ---------------------------------------------------------------------------------
def test_load_code_selects_the_code_asked_for(bundle: Path) -> None:
    first = load_code(bundle, None)
    assert first.code.label == "3,2" and first.code_labels() == ["3,2", "4,3"]
    chosen = load_code(bundle, "4,3")
    assert (chosen.coding.n, chosen.coding.k) == (4, 3)
    assert [e.file for e in chosen.encoders] == ["codes/n4k3/enc_0.onnx"]
    assert chosen.parm == "codes/n4k3/parm.onnx"


def test_load_code_refuses_a_code_the_bundle_lacks_listing_its_codes(bundle: Path) -> None:
    with pytest.raises(CodingError, match=r"--coding 5,4: .* has no such code; its codes \(n,k\): 3,2, 4,3"):
        load_code(bundle, "5,4")
    with pytest.raises(CodingError, match="N,K with integers N >= K >= 1"):
        load_code(bundle, "4x3")
    assert issubclass(CodingError, BenchError)


def test_check_coding_normalises_and_raises_the_tools_error(bundle: Path) -> None:
    class ToolError(ValueError):
        pass

    assert check_coding(None, [bundle], ToolError) is None
    assert check_coding(" 4, 3", [bundle], ToolError) == "4,3"
    assert check_coding("4,3") == "4,3"  # text only, no bundle to check against
    for bad in ("4", "3,4", "a,b", "4,3,1", ""):
        with pytest.raises(ToolError, match="--coding: a code is named N,K"):
            check_coding(bad, [bundle], ToolError)
    with pytest.raises(ToolError, match="its codes .*: 3,2, 4,3"):
        check_coding("5,4", [bundle], ToolError)


def test_server_args_carry_the_code_and_refuse_a_second_spelling() -> None:
    assert coding_server_args(None) == []
    assert coding_server_args("4,3") == ["--coding", "4,3"]
    refuse_coding_in("--server-args", ["--workers", "2"])
    for args in (["--coding", "4,3"], ["--workers", "2", "--coding=4,3"]):
        with pytest.raises(CodingError, match="--server-args must not contain --coding .*use the tool's own"):
            refuse_coding_in("--server-args", args)


# -- every tool's flags -------------------------------------------------------------------------------
def _peer_config(argv: list[str]) -> triton_peer.PeerConfig:
    return triton_peer.PeerConfig(**vars(triton_peer.build_parser().parse_args([*argv, "--port", "8000"])))


def _from_args(module: ModuleType) -> Callable[[list[str]], Any]:
    return lambda argv: module.config_from_args(module.build_parser().parse_args(argv))


# tool -> (argv -> config, its config error, whether it passes --server-args through)
TOOLS: dict[str, tuple[Callable[[list[str]], Any], type[Exception], bool]] = {
    "latency": (_from_args(latency), latency.LatencyBenchError, True),
    "throughput": (_from_args(throughput), throughput.ThroughputBenchError, True),
    "overhead": (_from_args(overhead), overhead.OverheadBenchError, False),
    "monitor": (_from_args(monitor), monitor.MonitorBenchError, True),
    "overload": (_from_args(overload), overload.OverloadBenchError, True),
    "profile": (_from_args(profile), profile.ProfileBenchError, True),
    "protocols": (_from_args(protocols), protocols.ProtocolsBenchError, True),
    "served": (_from_args(served), served.ServedBenchError, False),
    "soak": (_from_args(soak), soak.SoakBenchError, True),
    "ray-overhead": (_from_args(ray_overhead), ray_overhead.RayOverheadError, False),
    "multihost": (_from_args(multihost), multihost.MultihostError, False),
    "triton-peer": (_peer_config, triton_peer.PeerConfigError, False),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_takes_coding_and_checks_it(tool: str, bundle: Path) -> None:
    make, error, passes_server_args = TOOLS[tool]
    b = str(bundle)
    assert make([b]).coding is None  # the bundle's first code, as the server
    assert make([b, "--coding", "4,3"]).coding == "4,3"
    with pytest.raises(error, match="--coding: a code is named N,K"):
        make([b, "--coding", "4"])
    with pytest.raises(error, match="--coding 5,4: .*its codes .*: 3,2, 4,3"):
        make([b, "--coding", "5,4"])
    if passes_server_args:
        with pytest.raises(error, match="--server-args must not contain --coding"):
            make([b, "--server-args", "--workers 2 --coding 4,3"])


def test_latency_refuses_coding_in_the_ray_args_too(bundle: Path) -> None:
    with pytest.raises(latency.LatencyBenchError, match="--ray-args must not contain --coding"):
        latency.LatencyConfig(bundles=(str(bundle),), ray_args=("--coding", "4,3"))


@pytest.mark.parametrize("module", [latency, throughput, overhead, monitor, overload, profile, protocols, served,
                                    soak, ray_overhead, multihost, triton_peer], ids=lambda m: m.__name__)
def test_help_names_the_flag(module: ModuleType) -> None:
    text = " ".join(module.build_parser().format_help().split())  # argparse wraps the help
    assert "--coding CODING the bundle's code to measure, N,K" in text


# -- the servers each tool starts are told the code --------------------------------------------------
class _Stop(Exception):
    """Raised by the fake server in place of starting one."""


def _fake_server(monkeypatch: pytest.MonkeyPatch, module: ModuleType, exc: type[Exception] = _Stop
                 ) -> list[list[str]]:
    """Replace `module.ServerProcess` by one that records its flags and raises `exc`."""
    started: list[list[str]] = []

    class FakeServer:
        def __init__(self, bundle: str | Path, args: list[str], *rest: Any, **kw: Any) -> None:
            started.append(list(args))
            raise exc("not started")

    monkeypatch.setattr(module, "ServerProcess", FakeServer)
    return started


def _pair(args: list[str]) -> list[str]:
    i = args.index("--coding")
    return args[i:i + 2]


def test_latency_servers_and_record_use_the_code(bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    started = _fake_server(monkeypatch, latency, BenchProcessError)
    cfg = latency.LatencyConfig(bundles=(str(bundle),), coding="4,3", modes=("reference", "coded"))
    result = latency.bench_bundle(str(bundle), cfg, tmp_path)
    assert (result["code"], result["n"], result["k"], result["concurrency"]) == ("4,3", 4, 3, 3)
    assert [_pair(a) for a in started] == [["--coding", "4,3"]] * 2
    assert [m["server_args"] for m in result["modes"]] == started
    assert _pair(latency.load_server_args("coded", "straggler", cfg)) == ["--coding", "4,3"]
    plain = latency.LatencyConfig(bundles=(str(bundle),))
    assert "--coding" not in latency.server_args_for("coded", plain) + latency.load_server_args("coded", "none", plain)


def test_throughput_servers_use_the_code(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = _fake_server(monkeypatch, throughput, BenchProcessError)
    cfg = throughput.ThroughputConfig(bundle=str(bundle), coding="4,3")
    entry = throughput.run_mode("coded", cfg, load_code(bundle, "4,3"), [], tmp_path)
    assert _pair(entry["server_args"]) == ["--coding", "4,3"] and started == [entry["server_args"]]
    peer = triton_peer.PeerProcess(bundle, "tiny", sys.executable, {}, tmp_path / "peer.log", coding="4,3")
    assert _pair(peer.command) == ["--coding", "4,3"]


@pytest.mark.parametrize("tool", ["overload", "profile", "protocols"])
def test_single_server_tools_use_the_code(tool: str, bundle: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    module = {"overload": overload, "profile": profile, "protocols": protocols}[tool]
    started = _fake_server(monkeypatch, module)
    config = TOOLS[tool][0]([str(bundle), "--coding", "4,3", "--run-dir", str(tmp_path / "run"),
                             "--out-dir", str(tmp_path / "out")])
    with pytest.raises(_Stop):
        module.run(config)
    assert [_pair(a) for a in started] == [["--coding", "4,3"]]


def test_served_and_monitor_servers_use_the_code(bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(0).integers(0, 256, (12, *load_code(bundle, None).input.shape), dtype=np.uint8)
    monkeypatch.setattr(served, "load_images", lambda m, num, seed: (images, np.zeros(len(images), int), "given"))
    started = _fake_server(monkeypatch, served)
    with pytest.raises(_Stop):
        served.run(served.ServedConfig(bundle=str(bundle), coding="4,3", run_dir=str(tmp_path)))
    live = _fake_server(monkeypatch, monitor)
    cfg = monitor.MonitorConfig(bundle=str(bundle), coding="4,3")
    with pytest.raises(_Stop):
        monitor._throughput(cfg, load_code(bundle, "4,3"), images, None, tmp_path)
    assert [_pair(a) for a in started + live] == [["--coding", "4,3"]] * 2


def test_soak_server_flags_carry_the_code(bundle: Path) -> None:
    flags = soak.SoakConfig(bundle=str(bundle), coding="4,3", server_args=("--workers", "2")).server_flags(9000)
    assert _pair(flags) == ["--coding", "4,3"] and flags[-2:] == ["--workers", "2"]
    assert "--coding" not in soak.SoakConfig(bundle=str(bundle)).server_flags(9000)


def test_multihost_sizes_the_fleet_by_the_code_and_passes_it_on(bundle: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class FakeCluster:
        ray_address = "10.0.0.1:6379"

        def __init__(self, workers: int, cpus_per_node: int) -> None:
            seen["workers"] = workers

        def __enter__(self) -> FakeCluster:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def run(self, host: int, argv: list[str], cwd: Path) -> Any:
            seen["argv"] = argv
            return argparse.Namespace(wait=lambda: 0)

    monkeypatch.setattr(multihost, "unavailable_reason", lambda: None)
    monkeypatch.setattr(multihost, "NetnsCluster", FakeCluster)
    assert multihost.run(multihost.MultihostConfig(bundle=str(bundle), coding="4,3")) == 0
    assert seen["workers"] == 4 and _pair(seen["argv"]) == ["--coding", "4,3"]


def test_ray_overhead_thread_pool_runs_the_code(bundle: Path) -> None:
    """The thread half of `bench ray-overhead` on the (4,3) code: n = 4 workers, any 3 done."""
    cfg = ray_overhead.RayOverheadConfig(bundle=str(bundle), coding="4,3", batches=(1,), groups=10, warmup=0)
    x = np.zeros((1, *load_code(bundle, "4,3").input.shape), np.float32)
    samples = asyncio.run(ray_overhead._pool("thread", cfg, {1: x}))
    assert len(samples[1]) == 10 and all(s > 0 for s in samples[1])


# -- end to end ---------------------------------------------------------------------------------------
def test_overhead_times_the_selected_codes_models(bundle: Path, tmp_path: Path) -> None:
    common = {"bundle": str(bundle), "batch_size": 2, "ks": (2,), "repeats": 2, "warmup": 0, "decode_repeats": 3,
              "skip_encoder_export": True, "out_dir": str(tmp_path)}
    chosen = overhead.run(overhead.OverheadConfig(coding="4,3", tag="c43", **common))
    default = overhead.run(overhead.OverheadConfig(tag="first", **common))
    assert chosen["code"] == "4,3" and default["code"] == "3,2"
    assert chosen["components"]["enc_0"]["file"] == "codes/n4k3/enc_0.onnx"
    assert chosen["components"]["parm"]["file"] == "codes/n4k3/parm.onnx"
    assert default["components"]["enc_0"]["file"] == "codes/n3k2/enc_0.onnx"
    enc = chosen["ratio_to_f"]["enc_0"]
    assert chosen["targets"]["enc_over_f_per_query"] == [round(enc / 3, 4)]  # per query: / k = 3
    on_disk = json.loads((tmp_path / "overhead-c43.json").read_text())
    assert on_disk["code"] == "4,3" and on_disk["config"]["coding"] == "4,3"


def test_latency_against_a_real_server_serving_the_code(bundle: Path, tmp_path: Path) -> None:
    """A real server with --coding 4,3: waves of k = 3 queries, every one answered."""
    cfg = latency.config_from_args(latency.build_parser().parse_args(
        [str(bundle), "--coding", "4,3", "--modes", "coded-clean", "--num-queries", "6", "--warmup-requests", "0",
         "--delay-ms", "0", "--out-dir", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--tag", "t"]))
    record = latency.run(cfg)
    (result,) = record["bundles"]
    assert (result["code"], result["n"], result["k"], result["concurrency"]) == ("4,3", 4, 3, 3)
    (mode,) = result["modes"]
    assert "error" not in mode and _pair(mode["server_args"]) == ["--coding", "4,3"]
    assert mode["paper"]["stats"]["failed"] == 0
    assert json.loads((tmp_path / "out" / "latency-t.json").read_text())["bundles"][0]["code"] == "4,3"
