"""Latency under load (`python -m bench latency --load-fractions ...`): configuration, rates,
fault flags, the targets' arithmetic, the echo floor server, the figure, and (slow) one
short end-to-end run on a tiny linear bundle.

The targets are computed here from made-up measurements and the factors in LOAD_TARGETS,
so a wrong ratio, a swapped reference or a target read at the wrong load fails loudly.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench import latency
from bench.latency import (
    LOAD_FAULTS,
    LOAD_MODES,
    LOAD_TARGETS,
    TARGET_FRACTION,
    LatencyBenchError,
    LatencyConfig,
    estimated_load_s,
    fault_args,
    load_point,
    load_server_args,
    load_targets,
    rates_for,
)
from bench.loadgen import LoadConfig, LoadRecord, make_images, parse_reconstructed, poisson_arrivals_s, request_for


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.devbundle import build_linear_bundle

    return build_linear_bundle(tmp_path_factory.mktemp("bundle") / "k2", k=2, shape=(1, 4, 4))


def test_load_config_errors(bundle: Path) -> None:
    b = (str(bundle),)
    cases = [
        ({"load_fractions": (0.5, 0.0)}, "load-fractions must be finite and > 0"),
        ({"load_fractions": (0.5, float("inf"))}, "load-fractions must be finite and > 0"),
        ({"load_fractions": (0.5, 0.5)}, "load-fractions has a repeat"),
        ({"load_modes": ("coded", "reference")}, "load-modes must be a non-empty subset"),
        ({"load_modes": ()}, "load-modes must be a non-empty subset"),
        ({"load_faults": ("none", "none")}, "load-faults must be a non-empty subset"),
        ({"load_faults": ("crash",)}, "load-faults must be a non-empty subset"),
        ({"load_queries": 1}, "load-queries must be >= 2"),
        ({"capacity_concurrency": 0}, "capacity-concurrency must be >= 2"),
        ({"load_warmup_requests": -1}, "load-warmup-requests must be >= 0"),
        ({"capacity_duration_s": 0.0}, "capacity-duration-s must be > 0"),
        ({"delay_prob": 0.0}, r"delay-prob must be in \(0, 1\]"),
        ({"delay_prob": 1.5}, r"delay-prob must be in \(0, 1\]"),
        ({"send_rate_tolerance": 1.0}, r"send-rate-tolerance must be in \[0, 1\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(LatencyBenchError, match=match):
            LatencyConfig(bundles=b, **kwargs)
    with pytest.raises(LatencyBenchError, match="one bundle per run, got 2"):
        LatencyConfig(bundles=(*b, *b), load_fractions=(0.5,))
    LatencyConfig(bundles=(*b, *b))  # several bundles are fine for the paper / Poisson parts
    with pytest.raises(LatencyBenchError, match=r"unknown key\(s\) \['load_rate'\]"):
        LatencyConfig.from_dict({"bundles": list(b), "load_rate": 3})


def test_load_flags_map_onto_the_config(bundle: Path) -> None:
    b = str(bundle)
    args = latency.build_parser().parse_args(
        [b, "--load-fractions", "0.3,0.5", "--load-modes", "uncoded,coded", "--load-faults", "none,delay-prob",
         "--load-queries", "40", "--load-warmup-requests", "3", "--delay-prob", "0.2", "--capacity-concurrency",
         "8", "--capacity-duration-s", "1.5", "--send-rate-tolerance", "0.1"])
    assert latency.config_from_args(args) == LatencyConfig(
        bundles=(b,), load_fractions=(0.3, 0.5), load_modes=("uncoded", "coded"), load_faults=("none", "delay-prob"),
        load_queries=40, load_warmup_requests=3, delay_prob=0.2, capacity_concurrency=8, capacity_duration_s=1.5,
        send_rate_tolerance=0.1)
    default = latency.config_from_args(latency.build_parser().parse_args([b]))
    assert default.load_fractions == () and default.load_modes == LOAD_MODES and default.load_faults == LOAD_FAULTS


def test_rates_are_fractions_of_the_capacity() -> None:
    capacity, fractions = 812.5, (0.3, 0.5, 0.9)
    assert rates_for(capacity, fractions) == pytest.approx([f * capacity for f in fractions])
    for bad in (0.0, -3.0, float("nan")):
        with pytest.raises(LatencyBenchError, match="capacity must be a positive number"):
            rates_for(bad, fractions)


def test_fault_settings_map_to_server_flags(bundle: Path) -> None:
    cfg = LatencyConfig(bundles=(str(bundle),), delay_ms=70.0, delay_prob=0.25, seed=5,
                        max_queue_delay_ms=3.0, server_args=("--workers", "3"))
    assert fault_args("none", cfg) == []
    strag = fault_args("straggler", cfg)
    assert "--fault-straggler-per-group" in strag and "--fault-delay-prob" not in strag
    prob = fault_args("delay-prob", cfg)
    assert prob[prob.index("--fault-delay-prob") + 1] == "0.25" and "--fault-straggler-per-group" not in prob
    for args in (strag, prob):
        assert args[args.index("--fault-delay-ms") + 1] == "70.0" and args[args.index("--fault-seed") + 1] == "5"
    full = load_server_args("replication", "delay-prob", cfg)
    assert full[:2] == ["--mode", "replication"] and full[-2:] == ["--workers", "3"]
    assert full[full.index("--max-queue-delay-ms") + 1] == "3.0"
    with pytest.raises(LatencyBenchError, match="unknown fault setting"):
        fault_args("crash", cfg)


def _row(mode: str, fault: str, fraction: float, p50: float, p999: float, recon: float = 0.0,
         keeps_up: bool = True) -> dict[str, Any]:
    return {"mode": mode, "fault": fault, "fraction": fraction, "loadgen": {"keeps_up": keeps_up},
            "stats": {"p50_ms": p50, "p99.9_ms": p999, "reconstructed_fraction": recon}}


def _table(scale: float) -> list[dict[str, Any]]:
    """Rows at TARGET_FRACTION where every target's ratio is exactly `scale` x its factor."""
    by_name = {t.name: t for t in LOAD_TARGETS}
    f = TARGET_FRACTION
    unc_p50, unc_p999_delay = 4.0, 200.0
    unc_p999 = scale * by_name["uncoded_p99.9_within_5x_its_p50"].factor * unc_p50
    coded_p999 = scale * by_name["coded_p99.9_within_1.5x_uncoded"].factor * unc_p999
    coded_delay = scale * by_name["coded_p99.9_within_0.3x_uncoded_delay_prob"].factor * unc_p999_delay
    coded_strag = scale * by_name["coded_straggler_p99.9_within_1.1x_coded_no_faults"].factor * coded_p999
    return [_row("uncoded", "none", f, unc_p50, unc_p999), _row("coded", "none", f, 3.0, coded_p999, recon=0.07),
            _row("uncoded", "delay-prob", f, 5.0, unc_p999_delay), _row("coded", "delay-prob", f, 5.0, coded_delay),
            _row("coded", "straggler", f, 5.0, coded_strag),
            _row("coded", "none", 0.9, 1.0, 1e6)]  # another load: must not be read


@pytest.mark.parametrize(("scale", "met"), [(0.8, True), (1.25, False)])
def test_load_targets_ratios_from_inputs(scale: float, met: bool) -> None:
    out = load_targets(_table(scale))
    assert out["fraction"] == TARGET_FRACTION and set(out["targets"]) == {t.name for t in LOAD_TARGETS}
    for t in LOAD_TARGETS:
        got = out["targets"][t.name]
        assert got["ratio"] == pytest.approx(scale * t.factor, rel=1e-3)
        assert got["ratio"] == pytest.approx(got["value_ms"] / got["reference_ms"], rel=1e-3)
        assert got["met"] is met and got["factor"] == t.factor and got["loadgen_kept_up"] is True
    assert out["coded_reconstructed_fraction_no_faults"] == 0.07


def test_load_targets_missing_inputs_say_why() -> None:
    table = _table(1.0)
    table[0]["loadgen"]["keeps_up"] = False  # uncoded without faults: its loadgen fell behind
    del table[3]["stats"]  # coded with delay-prob: every request failed
    table[3]["error"] = "no successful requests"
    out = load_targets(table)["targets"]
    assert out["coded_p99.9_within_1.5x_uncoded"]["loadgen_kept_up"] is False
    delay = out["coded_p99.9_within_0.3x_uncoded_delay_prob"]
    assert delay["met"] is None and "no successful measurement of coded (fault delay-prob)" in delay["reason"]
    elsewhere = load_targets(table, fraction=0.7)
    assert "fraction 0.7 not measured" in elsewhere["reason"]
    assert all(t["met"] is None for t in elsewhere["targets"].values())
    assert elsewhere["coded_reconstructed_fraction_no_faults"] is None


def test_estimated_duration_from_inputs(bundle: Path) -> None:
    cfg = LatencyConfig(bundles=(str(bundle),), load_queries=1000)
    rates, series, start_s = [100.0, 250.0], 6, 2.5
    per_series = sum(1000 / r + latency.LOADGEN_START_S for r in rates)
    assert estimated_load_s(cfg, rates, series, start_s) == pytest.approx((series + 1) * per_series + series * start_s)


def _poisson_record(n: int, rate: float, statuses: list[int], stretch: float = 1.0) -> LoadRecord:
    sched = poisson_arrivals_s(rate, n, seed=0)
    cfg = LoadConfig(pattern="poisson", rate_per_s=rate, num_requests=n)
    return LoadRecord(config=vars(cfg), wall_s=float(sched[-1]) + 0.01, latency_ms=[2.0] * n, status=statuses,
                      reconstructed=[False] * n, errors={}, sent_s=list(sched * stretch))


def test_load_point_flags_a_late_loadgen_and_keeps_failed_points(bundle: Path) -> None:
    cfg = LatencyConfig(bundles=(str(bundle),), send_rate_tolerance=0.05)
    on_time = load_point(_poisson_record(200, 500.0, [200] * 200), cfg)
    assert on_time["loadgen"]["keeps_up"] is True and on_time["loadgen"]["in_flight_limit_reached"] is False
    assert on_time["stats"]["goodput_rps"] == on_time["stats"]["throughput_rps"] > 0
    late = load_point(_poisson_record(200, 500.0, [200] * 200, stretch=1.2), cfg)  # sent at 1/1.2 of the rate
    assert late["loadgen"]["send_rate_ratio"] == pytest.approx(1 / 1.2) and late["loadgen"]["keeps_up"] is False
    failed = load_point(_poisson_record(50, 500.0, [503] * 50), cfg)
    assert "stats" not in failed and "no successful requests" in failed["error"]


def test_echo_server_answers_a_real_request(tmp_path: Path) -> None:
    from bench.echo import EchoProcess
    from bench.loadgen import run_load

    image = make_images((1, 4, 4), 1, seed=0)[0]
    body, headers = request_for(image, LoadConfig(input_shape=(1, 4, 4)))
    with EchoProcess(tmp_path / "echo.log") as echo:
        assert echo.url.startswith("http://127.0.0.1:")
        req = urllib.request.Request(f"{echo.url}/v2/models/m1/infer", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw = resp.read()
            assert resp.status == 200
        load = LoadConfig(url=echo.url, input_shape=(1, 4, 4), pattern="poisson", rate_per_s=200.0,
                          num_requests=20, timeout_s=5.0)
        record = asyncio.run(run_load(load))
        proc = echo.proc
    answer = json.loads(raw)
    assert answer["model_name"] == "m1" and answer["outputs"][0]["shape"] == [1]
    assert parse_reconstructed(raw, "reconstructed") is False
    assert record.status == [200] * 20
    assert proc is not None and proc.returncode == 0  # stopped by SIGTERM, cleanly


def test_record_name_stays_out_of_the_paper_latency_report() -> None:
    from fnmatch import fnmatch

    from bench.report import SECTIONS

    name = latency.LOAD_RECORD_NAME.format(suffix="-mnist-default")
    assert not any(fnmatch(name, pattern) for _, pattern, _ in SECTIONS)  # its renderer would need `bundles`


def test_load_latency_figure_writes_a_png(tmp_path: Path) -> None:
    from bench.plots import load_latency_figure

    record = {"capacity": {"rates_from": "uncoded", "uncoded": {"capacity_rps": 900.0}},
              "fault_settings": {f: {"label": f} for f in LOAD_FAULTS}, "targets": {"fraction": TARGET_FRACTION},
              "floor": [_row("echo", "none", x, 1.0, 2.0) for x in (0.3, 0.5)],
              "table": [_row(m, f, x, 1.0, 10.0 * (1 + x), keeps_up=x < 0.5)  # hollow markers too
                        for m in ("uncoded", "coded") for f in LOAD_FAULTS for x in (0.3, 0.5)]}
    png = load_latency_figure(record, tmp_path / "load.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_under_load_end_to_end_on_a_tiny_bundle(bundle: Path, tmp_path: Path) -> None:
    cfg = LatencyConfig(bundles=(str(bundle),), load_fractions=(0.2, TARGET_FRACTION), load_modes=("uncoded", "coded"),
                        load_queries=60, load_warmup_requests=10, capacity_concurrency=8, capacity_duration_s=1.0,
                        delay_ms=20.0, out_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"), tag="t")
    record = latency.run(cfg)
    on_disk = json.loads((tmp_path / "out" / "load-latency-t.json").read_text())
    assert on_disk["benchmark"] == "latency-load" and (tmp_path / "out" / "load-latency-t.png").is_file()
    cap = record["capacity"]
    assert cap["uncoded"]["capacity_rps"] > 0 and cap["coded"]["capacity_rps"] > 0
    assert record["rates_per_s"] == pytest.approx([f * cap["uncoded"]["capacity_rps"] for f in cfg.load_fractions],
                                                  rel=1e-3)
    assert record["series_errors"] == [] and len(record["floor"]) == len(cfg.load_fractions)
    keys = {(r["mode"], r["fault"], r["fraction"]) for r in record["table"]}
    assert keys == {(m, f, x) for m in cfg.load_modes for f in LOAD_FAULTS for x in cfg.load_fractions}
    assert all(r["stats"]["failed"] == 0 for r in record["table"] + record["floor"])
    assert all(t["met"] is not None for t in record["targets"]["targets"].values())
    assert record["targets"]["coded_reconstructed_fraction_no_faults"] is not None
