"""Throughput bench (wrk + PyTriton peer): configs, request bodies, wrk's output, the ceiling
arithmetic, targets and the peer's skip-with-reason; one short wrk run against the real
server on the tiny bundle. No timing asserts: rates depend on the machine."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_harness import build_tiny_bundle  # noqa: E402

from bench import throughput as tp  # noqa: E402
from bench.throughput import ThroughputBenchError, ThroughputConfig  # noqa: E402
from bench.triton_peer import PeerConfig, PeerConfigError, make_infer, peer_environment, triton_config_kwargs  # noqa: E402
from bench.wrk import (  # noqa: E402
    WrkError,
    WrkResult,
    binary_body,
    check_result,
    infer_url,
    json_body,
    make_body,
    parse_wrk_output,
    wrk_command,
)
from runtime.manifest import Manifest  # noqa: E402
from runtime.protocol import parse_infer_request  # noqa: E402

WRK_LINE = ('WRK_JSON {"requests": 1500, "duration_us": 2000000, "bytes": 123456, "errors_connect": 0, '
            '"errors_read": 0, "errors_write": 0, "errors_timeout": 0, "errors_status": 0, "mean_us": 10500.5, '
            '"p50_us": 10000, "p90_us": 15000, "p99_us": 25000, "max_us": 40000}')


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("throughput") / "tiny", k=2, n=3).bundle


@pytest.fixture(scope="module")
def manifest(bundle: Path) -> Manifest:
    return Manifest.load(bundle)


def _images(m: Manifest, b: int) -> np.ndarray:
    return np.random.default_rng(b).integers(0, 256, (b, *m.input.shape), dtype=np.uint8)


# -- configuration -------------------------------------------------------------------------------
def test_config_errors_are_clear(bundle: Path, tmp_path: Path) -> None:
    b = str(bundle)
    with pytest.raises(ThroughputBenchError, match="not a bundle"):
        ThroughputConfig(bundle=str(tmp_path))
    with pytest.raises(ThroughputBenchError, match=r"--modes must be distinct names from coded,.*got \['magic'\]"):
        ThroughputConfig(bundle=b, modes=("magic",))
    with pytest.raises(ThroughputBenchError, match="--modes must be distinct"):
        ThroughputConfig(bundle=b, modes=("coded", "coded"))
    with pytest.raises(ThroughputBenchError, match=r"--bodies must be distinct names from binary,json, got \['xml'\]"):
        ThroughputConfig(bundle=b, bodies=("xml",))
    with pytest.raises(ThroughputBenchError, match=r"--batches must be distinct integers >= 1, got \[0, 8\]"):
        ThroughputConfig(bundle=b, batches=(0, 8))
    with pytest.raises(ThroughputBenchError, match="--duration-s must be >= 1, got 0"):
        ThroughputConfig(bundle=b, duration_s=0)
    with pytest.raises(ThroughputBenchError, match=r"--connections \(2\) must be >= --wrk-threads \(4\)"):
        ThroughputConfig(bundle=b, connections=2, wrk_threads=4)
    with pytest.raises(ThroughputBenchError, match="--raw-duration-s"):
        ThroughputConfig(bundle=b, raw_duration_s=0)
    with pytest.raises(ThroughputBenchError, match="--batches must be comma-separated integers"):
        tp.config_from_args(tp.build_parser().parse_args([b, "--batches", "1,x"]))


def test_cli_flags_map_onto_the_config(bundle: Path) -> None:
    b = str(bundle)
    args = tp.build_parser().parse_args([b, "--modes", "coded,uncoded", "--batches", "1,32", "--bodies", "binary",
                                         "--server-args", "--workers 2", "--duration-s", "3", "--no-peer",
                                         "--connections", "8", "--tag", "t"])
    assert tp.config_from_args(args) == ThroughputConfig(
        bundle=b, modes=("coded", "uncoded"), batches=(1, 32), bodies=("binary",), server_args=("--workers", "2"),
        duration_s=3, peer=False, connections=8, tag="t")
    default = tp.config_from_args(tp.build_parser().parse_args([b]))
    assert default == ThroughputConfig(bundle=b)
    assert default.modes == ("coded", "uncoded", "replication", "parm", "approxifer")
    assert default.batches == (1, 8, 32) and default.bodies == ("binary", "json")


def test_parm_is_skipped_with_a_reason_without_parm_onnx(bundle: Path, manifest: Manifest) -> None:
    assert tp.skip_reason("parm", manifest, bundle) is None
    no_parm = dataclasses.replace(manifest, codes=(dataclasses.replace(manifest.code, parm=None),))
    assert "no ParM model" in tp.skip_reason("parm", no_parm, bundle)
    assert tp.skip_reason("coded", no_parm, bundle) is None


# -- request bodies --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 8])
def test_binary_and_json_bodies_parse_back(manifest: Manifest, batch: int) -> None:
    images = _images(manifest, batch)
    outputs = ["digit_logits"]
    binary = binary_body(manifest.input.name, images)
    assert binary.kind == "binary" and binary.batch == batch and binary.header_length > 0
    assert binary.headers()["Inference-Header-Content-Length"] == str(binary.header_length)
    req = parse_infer_request(binary.data, str(binary.header_length), manifest.input, outputs, 64)
    np.testing.assert_array_equal(req.raw, images)
    assert req.raw.dtype == np.uint8
    js = json_body(manifest.input.name, images)
    assert js.header_length == 0 and js.headers() == {"Content-Type": "application/json"}
    req = parse_infer_request(js.data, None, manifest.input, outputs, 64)
    np.testing.assert_array_equal(req.raw, images)
    assert make_body("json", manifest.input.name, images) == js


def test_body_errors(manifest: Manifest) -> None:
    with pytest.raises(WrkError, match="body kind must be one of"):
        make_body("xml", "INPUT", _images(manifest, 1))
    with pytest.raises(WrkError, match="uint8"):
        binary_body("INPUT", np.zeros((1, 1, 4, 4), np.float32))
    assert infer_url("http://127.0.0.1:8000/", "m") == "http://127.0.0.1:8000/v2/models/m/infer"


# -- wrk output ----------------------------------------------------------------------------------------
def test_parse_wrk_output_from_a_canned_line() -> None:
    stdout = f"Running 2s test @ http://127.0.0.1:1/v2/models/m/infer\n  1 threads and 16 connections\n{WRK_LINE}\n"
    r = parse_wrk_output(stdout)
    assert (r.requests, r.duration_s, r.bytes_read) == (1500, 2.0, 123456)
    assert r.requests_per_s == pytest.approx(750.0)
    assert (r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms) == (10.0, 15.0, 25.0, 40.0)
    assert r.mean_ms == pytest.approx(10.5005)
    assert set(r.errors.values()) == {0}
    assert check_result(r, "u") is r
    assert r.to_dict()["requests_per_s"] == pytest.approx(750.0)
    with pytest.raises(WrkError, match="expected one WRK_JSON line"):
        parse_wrk_output("Requests/sec: 10\n")
    with pytest.raises(WrkError, match="malformed WRK_JSON line"):
        parse_wrk_output('WRK_JSON {"requests": 1}\n')


def test_check_result_fails_loudly_on_errors() -> None:
    ok = parse_wrk_output(WRK_LINE)
    for key in ("errors_status", "errors_read", "errors_connect", "errors_timeout"):
        bad = WrkResult(**{**dataclasses.asdict(ok), "errors": {**ok.errors, key: 3}})
        with pytest.raises(WrkError, match=rf"'{key}': 3"):
            check_result(bad, "http://127.0.0.1:1/x")
    with pytest.raises(WrkError, match="no request was answered"):
        check_result(WrkResult(**{**dataclasses.asdict(ok), "requests": 0}), "u")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (bash bench/setup_peers.sh wrk)")
def test_wrk_command(tmp_path: Path) -> None:
    argv = wrk_command("http://127.0.0.1:1/x", tmp_path / "b.bin", 77, connections=16, duration_s=3)
    assert argv[1:7] == ["-t", "1", "-c", "16", "-d", "3s"]
    assert argv[-4:] == ["http://127.0.0.1:1/x", "--", str(tmp_path / "b.bin"), "77"]
    assert Path(argv[argv.index("-s") + 1]).name == "infer.lua"
    with pytest.raises(WrkError, match="connections >= threads"):
        wrk_command("u", tmp_path / "b.bin", 0, connections=1, duration_s=3, threads=2)


# -- ceilings, ratios, targets ---------------------------------------------------------------------------
def _best(per_s: float) -> dict[str, float]:
    return {"one_session_per_s": per_s, "session_per_cpu_per_s": per_s / 2, "best_per_s": per_s}


def test_ceiling_arithmetic() -> None:
    n, k = 5, 4
    assert [tp.groups_per_request(b, k) for b in (1, 4, 8, 9, 32)] == [1, 1, 2, 3, 8]
    assert tp.raw_batches((1, 8, 32), k) == ([1, 2, 8, 32], [1, 2, 8])
    f = {1: 600.0, 2: 900.0, 8: 1500.0, 32: 2000.0}  # images/s by batch
    enc = {1: 100.0, 2: 150.0, 8: 400.0}  # groups/s by G, one encoder
    raw = {"cpus": 2, "f": {str(b): _best(v) for b, v in f.items()},
           "encoders": {"0": {str(g): _best(v) for g, v in enc.items()}}}
    c = tp.ceilings(raw, (1, 8, 32), n, k)
    for b, g in ((1, 1), (8, 2), (32, 8)):
        row = c[str(b)]
        assert row["groups_per_request"] == g
        assert row["raw_f"] == f[b] and row["raw_f_x_k_over_n"] == pytest.approx(f[b] * k / n)
        assert row["coded"] == pytest.approx(k / (n / f[b] + 1 / enc[g]))  # k queries: n f runs + 1 Enc run
        assert row["coded_f_at_worker_batch"] == pytest.approx(k / (n / f[g] + 1 / enc[g]))
    two = tp.coded_ceiling(f[32], [enc[8], enc[8] / 2], n=6, k=4)  # two encoders add up
    assert two == pytest.approx(4 / (6 / f[32] + 1 / enc[8] + 2 / enc[8]))
    merged = tp.merge_raw(raw, {**raw, "f": {b: _best(2 * v["best_per_s"]) for b, v in raw["f"].items()}})
    assert merged["f"]["1"]["best_per_s"] == pytest.approx(900.0)
    assert (merged["f"]["1"]["best_per_s_before"], merged["f"]["1"]["best_per_s_after"]) == (600.0, 1200.0)


def _point(batch: int, body: str, images_per_s: float, server_cores: float = 1.9, client_cores: float = 0.05,
           busiest: float = 0.7) -> dict:
    return {"batch": batch, "body": body, "images_per_s": images_per_s, "requests_per_s": images_per_s / batch,
            "cpu": {"server_cores": server_cores, "client_cores": client_cores, "busiest_thread": "python (main)",
                    "busiest_thread_cores": busiest, "server_core_ms_per_image": 1e3 * server_cores / images_per_s}}


def _record(peer: dict) -> dict:
    ceil = {"1": {"groups_per_request": 1, "raw_f": 1000.0, "raw_f_x_k_over_n": 800.0, "coded": 700.0,
                  "coded_f_at_worker_batch": 700.0},
            "32": {"groups_per_request": 8, "raw_f": 2000.0, "raw_f_x_k_over_n": 1600.0, "coded": 1500.0,
                   "coded_f_at_worker_batch": 1300.0}}
    servers = {"coded": {"points": [_point(1, "binary", 600.0), _point(32, "binary", 1200.0, 1.0, 0.02, 0.95),
                                    {"batch": 1, "body": "json", "error": "wrk: errors"}]},
               "uncoded": {"points": [_point(32, "binary", 1900.0)]},
               "parm": {"skipped": "no parm.onnx"}}
    return {"config": {"batches": [1, 32], "bodies": ["binary", "json"]}, "raw": {"cpus": 2}, "n": 5, "k": 4,
            "ceilings": ceil, "servers": servers, "peer": peer}


def test_ratios_and_targets_with_the_peer() -> None:
    rec = _record({"points": [_point(1, "binary", 300.0), _point(32, "binary", 1000.0)]})
    rows = {(r["batch"], r["body"]): r for r in tp.ratio_rows(rec)}
    assert rows[(32, "binary")]["coded_vs_ceiling"] == pytest.approx(1200 / 1500)
    assert rows[(32, "binary")]["coded_vs_ceiling_f_at_worker_batch"] == pytest.approx(1200 / 1300, abs=1e-4)
    assert rows[(32, "binary")]["coded_vs_raw_f_x_k_over_n"] == pytest.approx(1200 / 1600)
    assert rows[(32, "binary")]["uncoded_vs_raw_f"] == pytest.approx(1900 / 2000)
    assert rows[(1, "binary")]["coded_vs_peer"] == pytest.approx(2.0)
    assert rows[(1, "json")]["coded_vs_peer"] is None  # the failed point gives no ratio
    t = {(x["name"], x["batch"]): x for x in tp.targets(rec)}
    ceiling = t[("coded >= 0.85 x compute ceiling", 32)]
    assert ceiling["met"] is False and ceiling["value"] == pytest.approx(0.8)
    assert "one thread is the bottleneck" in ceiling["limit"]  # 1.02 of 2 cores busy, one thread at 0.95
    assert t[("coded >= 1.5 x PyTriton peer", 1)]["met"] is True
    peer32 = t[("coded >= 1.5 x PyTriton peer", 32)]
    assert peer32["met"] is False and peer32["value"] == pytest.approx(1.2)
    uncoded = t[("uncoded >= 0.9 x raw f", 32)]
    assert uncoded["met"] is True and "limit" not in uncoded
    assert all(x["body"] == "binary" for x in t.values())


def test_targets_say_why_the_peer_was_not_measured() -> None:
    rec = _record({"skipped": ".venv-triton/bin/python not found (no PyTriton venv)"})
    peer_targets = [x for x in tp.targets(rec) if "PyTriton" in x["name"]]
    assert [x["met"] for x in peer_targets] == [None, None]
    assert all("not measured: .venv-triton/bin/python not found" in x["limit"] for x in peer_targets)
    assert tp.failed_points(rec) == ["coded b=1 json"]


def test_limit_reason_names_saturated_cores_and_wrk() -> None:
    text = tp.limit_reason(_point(32, "binary", 1000.0, server_cores=1.6, client_cores=0.3), 2, 0.5, "raw f")
    assert text.startswith("CPU-bound: server 1.60 + wrk 0.30 + other jobs 0.00 of 2 cores busy")
    shared = _point(32, "binary", 1000.0, server_cores=1.2, client_cores=0.02)
    shared["cpu"]["other_cores"] = 0.7
    assert "other jobs on this shared machine took 0.70 of the 2 cores" in tp.limit_reason(shared, 2, 0.5, "raw f")
    assert "wrk shares the 2 cores (0.30 of them)" in text and "vs 0.500 for raw f" in text
    idle = tp.limit_reason(_point(32, "binary", 1000.0, server_cores=0.5, busiest=0.3), 2, 0.5, "raw f")
    assert idle.startswith("cores not saturated")


def test_cpu_snapshot_counts_this_process() -> None:
    before = tp.cpu_snapshot(os.getpid())
    sum(i * i for i in range(300_000))  # some CPU
    use = tp.cpu_use(before, tp.cpu_snapshot(os.getpid()), 1.0)
    assert use["server_cpu_s"] >= 0 and use["busiest_thread_cores"] >= 0
    assert "main thread" in use["busiest_thread"]


# -- the PyTriton peer -------------------------------------------------------------------------------------
def test_peer_is_skipped_with_a_reason_when_the_venv_is_missing(bundle: Path, manifest: Manifest,
                                                                tmp_path: Path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    env, reason = peer_environment(missing)
    assert env is None and "not found" in reason and "bench/setup_peers.sh" in reason
    cfg = ThroughputConfig(bundle=str(bundle), peer_python=str(missing))
    assert tp.run_peer(cfg, manifest, [], tmp_path) == {"skipped": reason}
    assert tp.run_peer(dataclasses.replace(cfg, peer=False), manifest, [], tmp_path) == {
        "skipped": "disabled (--no-peer)"}


def test_peer_is_skipped_when_pytriton_is_not_importable() -> None:
    pytest.importorskip("onnxruntime")
    try:
        import pytriton  # noqa: F401
        pytest.skip("pytriton is importable in this venv")
    except ImportError:
        pass
    env, reason = peer_environment(sys.executable)
    assert env is None and "cannot import pytriton" in reason


def test_peer_that_cannot_start_is_skipped_with_its_log(bundle: Path, manifest: Manifest, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv that passes the probe but whose peer dies (here: no pytriton) -> skipped, with the log tail."""
    pytest.importorskip("onnxruntime")
    try:
        import pytriton  # noqa: F401
        pytest.skip("pytriton is importable in this venv")
    except ImportError:
        pass
    monkeypatch.setattr(tp, "peer_environment", lambda python: (dict(os.environ), None))
    cfg = ThroughputConfig(bundle=str(bundle), peer_python=sys.executable, peer_ready_timeout_s=60)
    peer = tp.run_peer(cfg, manifest, [], tmp_path)
    assert peer["skipped"].startswith("triton peer did not start: triton peer exited with code 1")
    assert "pytriton" in peer["skipped"]


def test_peer_config_binds_loopback_only(bundle: Path, tmp_path: Path) -> None:
    kw = triton_config_kwargs(PeerConfig(bundle=str(bundle), port=8123))
    assert kw["http_address"] == "127.0.0.1" and kw["http_port"] == 8123
    assert kw["allow_grpc"] is False and kw["allow_metrics"] is False
    assert kw["allow_sagemaker"] is False and kw["allow_vertex_ai"] is False
    with pytest.raises(PeerConfigError, match="not a bundle"):
        PeerConfig(bundle=str(tmp_path), port=1)
    with pytest.raises(PeerConfigError, match="--instances must be >= 1"):
        PeerConfig(bundle=str(bundle), port=1, instances=0)


def test_peer_model_matches_onnx_runtime_reference(bundle: Path, manifest: Manifest) -> None:
    from bench.soakload import ort_reference

    images = _images(manifest, 5)
    out = make_infer(bundle, manifest, threads=1)(images)
    task = manifest.primary_head.task
    ref = ort_reference(bundle, manifest, images)[task]
    np.testing.assert_allclose(out[f"{task}_logits"], ref, rtol=1e-5, atol=1e-5)
    assert out[f"{task}_class"].shape == (5, 1)
    np.testing.assert_array_equal(out[f"{task}_class"][:, 0], ref.argmax(axis=1))


# -- real runs -------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (bash bench/setup_peers.sh wrk)")
def test_short_wrk_run_against_the_real_server(bundle: Path, tmp_path: Path) -> None:
    from bench.report import throughput_section

    cfg = ThroughputConfig(bundle=str(bundle), modes=("coded",), batches=(2,), bodies=("binary", "json"),
                           connections=4, duration_s=1, warmup_s=0, raw_duration_s=0.1, peer=False,
                           out_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"), tag="t")
    record = tp.run(cfg)
    points = record["servers"]["coded"]["points"]
    assert [(p["batch"], p["body"]) for p in points] == [(2, "binary"), (2, "json")]
    for p in points:
        assert "error" not in p and p["requests"] > 0
        assert p["images_per_s"] == pytest.approx(2 * p["requests_per_s"])
        assert p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert p["cpu"]["server_cpu_s"] > 0
        # each request (2 images, k=2) fills one group; the batcher may merge requests
        assert p["queries_per_dispatch"] is not None and 2 <= p["queries_per_dispatch"] <= 4 * 2
    assert record["peer"] == {"skipped": "disabled (--no-peer)"}
    assert set(record["ceilings"]) == {"2"} and record["raw"]["f"].keys() == {"1", "2"}
    assert tp.failed_points(record) == []
    saved = json.loads((tmp_path / "out" / "throughput-t.json").read_text())
    assert saved["targets"] == record["targets"] and (tmp_path / "out" / "throughput-t.png").is_file()
    text = "\n".join(throughput_section(tmp_path / "out" / "throughput-t.json", "throughput-t.png"))
    assert "| coded | 2 | binary |" in text and "PyTriton peer (uncoded) | skipped: disabled" in text


@pytest.mark.slow
def test_real_pytriton_peer(bundle: Path, manifest: Manifest, tmp_path: Path) -> None:
    """Starts PyTriton's tritonserver from .venv-triton (about 10-20 s) and drives it with wrk."""
    cfg = ThroughputConfig(bundle=str(bundle), batches=(1,), bodies=("binary",), connections=2, duration_s=1,
                           warmup_s=0)
    env, reason = peer_environment(cfg.peer_python)
    if env is None or shutil.which("wrk") is None:
        pytest.skip(reason or "wrk not installed")
    bodies, _, _ = tp.request_bodies(cfg, manifest)
    peer = tp.run_peer(cfg, manifest, bodies, tmp_path)
    assert "skipped" not in peer, peer.get("skipped")
    assert len(peer["points"]) == 1 and peer["points"][0]["requests"] > 0
    assert peer["points"][0]["queries_per_dispatch"] >= 1  # its statistics endpoint is open


def test_queries_per_dispatch_from_two_statistics_readings() -> None:
    assert tp.queries_per_dispatch((100, 10), (1108, 18)) == pytest.approx(126.0)
    assert tp.queries_per_dispatch(None, (1, 1)) is None
    assert tp.queries_per_dispatch((5, 3), (5, 3)) is None  # nothing executed in between


def test_dispatch_counts_reads_the_statistics_endpoint() -> None:
    import http.server
    import json
    import threading

    class Stats(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != "/v2/models/m/stats":
                self.send_error(404)
                return
            body = json.dumps({"model_stats": [{"inference_count": 512, "execution_count": 4}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Stats)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert tp.dispatch_counts(f"{base}/v2/models/m/infer") == (512, 4)
        assert tp.dispatch_counts(f"{base}/v2/models/other/infer") is None  # 404: unknown, not an error
    finally:
        server.shutdown()
        server.server_close()


def test_the_ceiling_limit_names_the_measured_dispatch_size() -> None:
    rec = _record({"points": []})
    rec["servers"]["coded"]["points"][1]["queries_per_dispatch"] = 126.0
    ceiling = {(x["name"], x["batch"]): x for x in tp.targets(rec)}[("coded >= 0.85 x compute ceiling", 32)]
    assert "dispatches carried 126.0 queries: each worker call ran 32 images" in ceiling["limit"]
