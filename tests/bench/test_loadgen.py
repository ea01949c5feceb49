"""Load generator: pure helpers, config validation, and one real HTTP run against a stub."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from bench.loadgen import (
    LoadConfig,
    LoadgenError,
    LoadRecord,
    build_parser,
    config_from_args,
    infer_body,
    infer_body_binary,
    make_images,
    parse_reconstructed,
    poisson_arrivals_s,
    run_load,
    send_stats,
    summarize,
    summarize_record,
)


def test_poisson_arrivals_are_seeded_increasing_and_at_the_rate() -> None:
    a = poisson_arrivals_s(200.0, 20_000, seed=3)
    np.testing.assert_array_equal(a, poisson_arrivals_s(200.0, 20_000, seed=3))
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    # Mean gap of 20,000 exponential(1/200 s) draws: std of the mean is 5e-3/sqrt(2e4) ~ 3.5e-5 s.
    np.testing.assert_allclose(np.diff(a).mean(), 1 / 200.0, rtol=0.03)
    with pytest.raises(LoadgenError, match="rate_per_s > 0"):
        poisson_arrivals_s(0.0, 10, seed=0)


def test_summarize_matches_numpy_percentiles() -> None:
    lat = np.random.default_rng(0).exponential(10.0, size=5000)
    s = summarize(lat, num_ok=5000, wall_s=2.0)
    np.testing.assert_allclose(s["p50_ms"], np.median(lat), rtol=1e-12)
    np.testing.assert_allclose(s["p99.9_ms"], np.sort(lat)[-6:-4].mean(), rtol=0.05)
    np.testing.assert_allclose(s["mean_ms"], lat.mean(), rtol=1e-12)
    assert s["throughput_rps"] == 2500.0
    with pytest.raises(LoadgenError, match="no successful requests"):
        summarize([], 0, 1.0)


def test_summarize_record_excludes_failures() -> None:
    rec = LoadRecord(
        config={},
        wall_s=1.0,
        latency_ms=[1.0, 2.0, 1000.0, 3.0],
        status=[200, 200, 503, 200],
        reconstructed=[False, True, False, False],
        errors={"http_503": 1},
    )
    s = summarize_record(rec)
    assert s["count"] == 3 and s["failed"] == 1
    np.testing.assert_allclose(s["max_ms"], 3.0)
    np.testing.assert_allclose(s["reconstructed_fraction"], 0.25)


def test_infer_body_is_kserve_v2_json() -> None:
    img = make_images((1, 4, 4), 1, seed=0)[0]
    body = json.loads(infer_body(img, "INPUT"))
    (tensor,) = body["inputs"]
    assert tensor["shape"] == [1, 1, 4, 4] and tensor["datatype"] == "UINT8"
    np.testing.assert_array_equal(np.array(tensor["data"], dtype=np.uint8).reshape(1, 4, 4), img)
    assert parse_reconstructed(b'{"parameters": {"reconstructed": true}}', "reconstructed")
    assert not parse_reconstructed(b'{"outputs": []}', "reconstructed")


def test_binary_body_is_header_then_raw_bytes() -> None:
    img = make_images((1, 4, 4), 1, seed=1)[0]
    body, header_len = infer_body_binary(img, "INPUT")
    header = json.loads(body[:header_len])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(body[header_len:], dtype=np.uint8).reshape(1, 4, 4), img)


def test_loadgen_argv_round_trips_through_the_cli() -> None:
    from pathlib import Path

    from bench.serverproc import loadgen_argv

    cfg = LoadConfig(pattern="poisson", rate_per_s=12.5, input_shape=(3, 8, 8), binary_input=False)
    argv = loadgen_argv(cfg, Path("out.json"))
    assert argv[1:3] == ["-m", "bench.loadgen"]
    assert config_from_args(build_parser().parse_args(argv[3:])) == cfg


def test_config_validation_errors() -> None:
    with pytest.raises(LoadgenError, match="127.0.0.1"):
        LoadConfig(url="http://example.com:8000")
    with pytest.raises(LoadgenError, match="needs rate_per_s > 0"):
        LoadConfig(pattern="poisson")
    with pytest.raises(LoadgenError, match="pattern must be one of"):
        LoadConfig(pattern="burst")
    with pytest.raises(LoadgenError, match="duration_s must be >= 0 and is for pattern 'closed' only"):
        LoadConfig(pattern="waves", duration_s=2.0)
    with pytest.raises(LoadgenError, match="duration_s must be >= 0"):
        LoadConfig(duration_s=-1.0)
    with pytest.raises(LoadgenError, match=r"LoadConfig: unknown key\(s\) \['rate'\]"):
        LoadConfig.from_dict({"rate": 3})
    args = build_parser().parse_args(["--input-shape", "3,32,32", "--out", "x.json"])
    assert config_from_args(args).input_shape == (3, 32, 32)
    bad = build_parser().parse_args(["--input-shape", "3x32", "--out", "x.json"])
    with pytest.raises(LoadgenError, match="C,H,W"):
        config_from_args(bad)


def _poisson_record(sent_s: list[float], latency_ms: list[float], rate: float = 100.0) -> LoadRecord:
    cfg = LoadConfig(pattern="poisson", rate_per_s=rate, num_requests=len(sent_s), max_in_flight=3)
    n = len(sent_s)
    return LoadRecord(config=vars(cfg), wall_s=1.0, latency_ms=latency_ms, status=[200] * n,
                      reconstructed=[False] * n, errors={}, sent_s=sent_s)


def test_send_stats_compare_the_sends_with_the_schedule() -> None:
    n, rate = 400, 100.0
    sched = poisson_arrivals_s(rate, n, seed=0)
    on_time = send_stats(_poisson_record(list(sched + 0.001), [1.0] * n, rate))  # every send 1 ms late
    assert on_time["send_rate_ratio"] == pytest.approx(1.0)
    assert on_time["scheduled_rate_per_s"] == pytest.approx((n - 1) / sched[-1])
    assert on_time["send_lag_p50_ms"] == pytest.approx(1.0) and on_time["send_lag_max_ms"] == pytest.approx(1.0)
    half = send_stats(_poisson_record(list(sched * 2), [1.0] * n, rate))  # sent at half the rate
    assert half["send_rate_ratio"] == pytest.approx(0.5) and half["target_rate_per_s"] == rate
    with pytest.raises(LoadgenError, match="needs a poisson record"):
        send_stats(LoadRecord(config={"pattern": "closed"}, wall_s=1.0, sent_s=[0.0, 1.0]))


def test_send_stats_peak_in_flight_counts_open_requests() -> None:
    n = 6
    sched = poisson_arrivals_s(100.0, n, seed=0)
    # Every request stays open until 10 s after the first: all n open at once at the end.
    stats = send_stats(_poisson_record(list(sched), [(10.0 - t) * 1e3 for t in sched]))
    assert stats["peak_in_flight"] == n and stats["max_in_flight"] == 3
    # Each answered before the next is sent: never more than one open.
    gaps_ms = np.diff(sched) * 1e3
    stats = send_stats(_poisson_record(list(sched), [*(0.5 * gaps_ms), 1.0]))
    assert stats["peak_in_flight"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StubServer:
    """KServe-like stub in a thread: every 3rd request reconstructed, request 7 gets a 503."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.seen: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _infer(self, request: web.Request) -> web.Response:
        raw = await request.read()
        header_len = request.headers.get("Inference-Header-Content-Length")
        if header_len is None:
            nbytes = len(json.loads(raw)["inputs"][0]["data"])
        else:
            header = json.loads(raw[: int(header_len)])
            nbytes = len(raw) - int(header_len)
            assert header["inputs"][0]["parameters"]["binary_data_size"] == nbytes
        idx = len(self.seen)
        self.seen.append(nbytes)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.002)
        self.in_flight -= 1
        if idx == 7:
            return web.json_response({"error": "queue full"}, status=503)
        return web.json_response({"outputs": [], "parameters": {"reconstructed": idx % 3 == 0}})

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v2/models/{name}/infer", self._infer)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> _StubServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stub server did not start within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.mark.parametrize(("pattern", "binary"), [("waves", True), ("closed", True), ("poisson", False)])
def test_run_load_against_stub_server(pattern: str, binary: bool) -> None:
    with _StubServer() as stub:
        cfg = LoadConfig(
            url=f"http://127.0.0.1:{stub.port}",
            input_shape=(1, 8, 8),
            pattern=pattern,
            num_requests=40,
            concurrency=4,
            rate_per_s=400.0,
            warmup_requests=0,
            timeout_s=10.0,
            binary_input=binary,
        )
        t0 = time.perf_counter()
        record = asyncio.run(run_load(cfg))
        elapsed_s = time.perf_counter() - t0
    assert len(stub.seen) == 40 and set(stub.seen) == {64}  # each request sent once, 1x8x8
    if pattern != "poisson":
        assert stub.max_in_flight <= 4
    assert record.status.count(503) == 1 and record.status.count(200) == 39
    assert record.errors == {"http_503": 1}
    assert sum(record.reconstructed) == 14  # server arrivals 0,3,...,39 (7, the 503, is not one)
    assert all(lat >= 2.0 for lat in record.latency_ms)  # the stub sleeps 2 ms
    assert record.wall_s <= elapsed_s
    assert len(record.sent_s) == 40 and all(0.0 <= t <= record.wall_s for t in record.sent_s)
    if pattern == "poisson":  # never sent before its scheduled time
        sched = poisson_arrivals_s(cfg.rate_per_s, 40, cfg.seed)
        assert all(t >= s - 1e-6 for t, s in zip(record.sent_s, sched, strict=True))
    rt = LoadRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert rt.status == record.status and rt.sent_s == record.sent_s


def test_closed_loop_with_a_duration_stops_on_time() -> None:
    with _StubServer() as stub:
        cfg = LoadConfig(url=f"http://127.0.0.1:{stub.port}", input_shape=(1, 8, 8), pattern="closed",
                         num_requests=100_000, concurrency=4, duration_s=0.3, timeout_s=10.0)
        record = asyncio.run(run_load(cfg))
    n = len(record.status)
    assert 0 < n < 100_000 and n == len(stub.seen) == len(record.latency_ms) == len(record.sent_s)
    assert max(record.sent_s) < cfg.duration_s  # no query started after the duration
    assert record.wall_s < cfg.duration_s + 1.0  # only the last in-flight queries after it
