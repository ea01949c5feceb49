"""Latency / overhead / throughput benches: configuration, target arithmetic, plots, decode timing.

No server and no benchmark run here: those are measured by `python -m bench ...` and
recorded under bench/results/. These tests pin the pieces that turn measurements into
reported numbers, so a wrong ratio or a mislabelled mode fails loudly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.latency import (
    LatencyBenchError,
    LatencyConfig,
    backend_ratios,
    quantile_curve,
    server_args_for,
    targets,
)
from bench.loadgen import LoadRecord
from bench.overhead import OverheadBenchError, OverheadConfig, decode_vs_k
from bench.throughput import ThroughputBenchError, ThroughputConfig


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.devbundle import build_linear_bundle

    return build_linear_bundle(tmp_path_factory.mktemp("bundle") / "k2", k=2, shape=(1, 4, 4))


def test_linear_dev_bundle_is_exact_and_loads(bundle: Path) -> None:
    import onnxruntime as ort

    from runtime.manifest import Manifest, verify_checksums

    m = Manifest.load(bundle)
    verify_checksums(bundle, m)
    assert (m.coding.n, m.coding.k, m.embedding_shape) == (3, 2, (1, 4, 4))

    def sess(rel: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(bundle / rel), providers=["CPUExecutionProvider"])

    x = np.random.default_rng(0).standard_normal((5, 2, 1, 4, 4)).astype(np.float32)  # (B, k, C, H, W)
    f, enc, head, parm = sess(m.f), sess(m.encoders[0].file), sess(m.heads[0].file), sess(m.parm)
    z = np.stack([f.run(None, {"x": x[:, j]})[0] for j in range(2)], axis=1)  # (B, k, 1, 4, 4)
    parity_z = f.run(None, {"x": enc.run(None, {"x": x})[0]})[0]
    np.testing.assert_allclose(parity_z, z.mean(axis=1), atol=1e-5)  # f linear: encoder exact
    logits = sum(head.run(None, {"z": z[:, j]})[0] for j in range(2))
    np.testing.assert_allclose(parm.run(None, {"x": x})[0], logits, atol=1e-4)


def test_latency_modes_map_to_server_flags(bundle: Path) -> None:
    cfg = LatencyConfig(bundles=(str(bundle),), delay_ms=50.0, seed=7, server_args=("--workers", "2"))
    ref = server_args_for("reference", cfg)
    assert ref[:2] == ["--mode", "uncoded"] and not any(a.startswith("--fault") for a in ref)
    clean = server_args_for("coded-clean", cfg)
    assert clean[:2] == ["--mode", "coded"] and not any(a.startswith("--fault") for a in clean)
    coded = server_args_for("coded", cfg)
    assert coded[:2] == ["--mode", "coded"]
    assert coded[coded.index("--fault-delay-ms") + 1] == "50.0"
    assert "--fault-straggler-per-group" in coded and coded[-2:] == ["--workers", "2"]
    assert coded[coded.index("--fault-seed") + 1] == "7"


def test_latency_config_errors(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(LatencyBenchError, match="need at least one BUNDLE"):
        LatencyConfig()
    with pytest.raises(LatencyBenchError, match="not a bundle"):
        LatencyConfig(bundles=(str(tmp_path),))
    with pytest.raises(LatencyBenchError, match="modes must be a non-empty subset"):
        LatencyConfig(bundles=(str(bundle),), modes=("coded", "magic"))
    with pytest.raises(LatencyBenchError, match="poisson-rates must be > 0"):
        LatencyConfig(bundles=(str(bundle),), poisson_rates=(0.0,))
    with pytest.raises(LatencyBenchError, match="backends must be a non-empty subset of"):
        LatencyConfig(bundles=(str(bundle),), backends=("thread", "mpi"))
    with pytest.raises(LatencyBenchError, match="the under-load run uses the thread backend"):
        LatencyConfig(bundles=(str(bundle),), backends=("ray",), load_fractions=(0.5,))
    with pytest.raises(LatencyBenchError, match=r"LatencyConfig: unknown key\(s\) \['queries'\]"):
        LatencyConfig.from_dict({"bundles": [str(bundle)], "queries": 3})


def _paper(p999: float) -> dict:
    return {"paper": {"stats": {"p99.9_ms": p999}}}


def test_targets_ratios() -> None:
    result = {"modes": [{"mode": "reference", **_paper(10.0)}, {"mode": "uncoded", **_paper(120.0)},
                        {"mode": "coded", **_paper(10.4)}, {"mode": "coded-clean", **_paper(5.2)},
                        {"mode": "parm", "error": "server died"}]}
    t = targets(result)
    assert t["coded_over_reference"] == pytest.approx(1.04)
    assert t["coded_within_1.05x_reference"] is True
    assert t["coded_over_uncoded"] == pytest.approx(10.4 / 120.0, abs=1e-3)
    assert t["coded_within_0.5x_uncoded"] is True
    assert t["coded_over_coded_clean"] == pytest.approx(2.0)
    assert set(t["p99.9_ms"]) == {"reference", "uncoded", "coded", "coded-clean"}  # the failed mode is left out
    missed = targets({"modes": [{"mode": "reference", **_paper(10.0)}, {"mode": "coded", **_paper(11.0)}]})
    assert missed["coded_within_1.05x_reference"] is False and "coded_over_uncoded" not in missed


def test_backend_ratios_divide_each_backend_by_the_thread_one() -> None:
    def run(backend: str, p50: float, p999: float) -> dict:
        return {"bundle": "b", "backend": backend, "modes": [
            {"mode": "coded", "paper": {"stats": {"p50_ms": p50, "p99.9_ms": p999}}},
            {"mode": "uncoded", "error": "server died"}]}

    ratios = backend_ratios([run("thread", 4.0, 20.0), run("ray", 9.0, 30.0)])
    assert ratios == {"b ray/thread": {"coded": {"p50": 2.25, "p99.9": 1.5}}}
    assert backend_ratios([run("ray", 9.0, 30.0)]) == {}  # nothing to compare with


def test_quantile_curve_uses_successful_requests_only() -> None:
    lat = list(np.arange(1.0, 101.0))
    rec = LoadRecord(config={}, wall_s=1.0, latency_ms=[*lat, 5000.0], status=[200] * 100 + [503],
                     reconstructed=[False] * 101, errors={})
    q = quantile_curve(rec)
    assert q["fraction"][0] == 0.0 and q["fraction"][-1] == 1.0
    assert q["latency_ms"][0] == 1.0 and q["latency_ms"][-1] == 100.0
    assert np.all(np.diff(q["latency_ms"]) >= 0)


def test_decode_vs_k_is_exact_for_both_decoders(bundle: Path) -> None:
    cfg = OverheadConfig(bundle=str(bundle), ks=(2, 5), decode_repeats=3)
    rows = decode_vs_k(cfg, (16, 7, 7))
    assert [r["k"] for r in rows] == [2, 5]
    for r in rows:
        assert r["embedding_elements"] == 784
        # float32 inputs, float64 solve: k * parity - sum of k-1 terms loses ~k float32 ulps.
        assert r["max_abs_err_one_shot"] < 1e-5 and r["max_abs_err_online"] < 1e-5
        assert r["one_shot_us"] > 0 and r["online_us"] > 0 and r["online_last_arrival_us"] > 0


def test_overhead_and_throughput_config_errors(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(OverheadBenchError, match="not a bundle"):
        OverheadConfig(bundle=str(tmp_path))
    with pytest.raises(OverheadBenchError, match="k >= 1"):
        OverheadConfig(bundle=str(bundle), ks=(0, 2))
    with pytest.raises(OverheadBenchError, match="--batch-size must be >= 1"):
        OverheadConfig(bundle=str(bundle), batch_size=0)
    with pytest.raises(ThroughputBenchError, match="--connections must be >= 1"):
        ThroughputConfig(bundle=str(bundle), connections=0)
    with pytest.raises(ThroughputBenchError, match="--backends must be distinct names from thread,ray"):
        ThroughputConfig(bundle=str(bundle), backends=("ray", "ray"))


def test_throughput_backend_ratios_divide_by_the_thread_servers() -> None:
    from bench.throughput import backend_ratio_rows

    def section(images_per_s: float) -> dict:
        return {"points": [{"batch": 1, "body": "binary", "images_per_s": images_per_s},
                           {"batch": 8, "body": "binary", "error": "wrk failed"}]}

    record = {"servers": {"coded": section(1000.0)},
              "servers_by_backend": {"ray": {"coded": section(400.0), "uncoded": section(300.0)}}}
    rows = backend_ratio_rows(record)
    assert rows == [{"backend": "ray", "mode": "coded", "batch": 1, "body": "binary",
                     "images_per_s": 400.0, "images_per_s_ratio": 0.4},
                    {"backend": "ray", "mode": "uncoded", "batch": 1, "body": "binary",
                     "images_per_s": 300.0, "images_per_s_ratio": None}]  # no thread server to compare


def test_plots_write_pngs(tmp_path: Path) -> None:
    from bench.plots import latency_figure, throughput_figure

    curve = {"fraction": [0.0, 0.5, 1.0], "latency_ms": [1.0, 2.0, 9.0]}
    stats = {"p50_ms": 2.0, "p99_ms": 8.0, "p99.9_ms": 9.0, "mean_ms": 3.0, "throughput_rps": 100.0}
    mode = {"mode": "coded", "paper": {"stats": stats, "quantiles": curve},
            "poisson": [{"rate_per_s": 10.0, "stats": stats}]}
    png = latency_figure([{"k": 2, "n": 3, "delay_ms": 100.0, "modes": [mode]}], tmp_path / "l.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # throughput: the wrk layout (bench/throughput.py); a failed point and a skipped peer are left out
    points = [{"batch": 1, "body": "binary", "images_per_s": 900.0}, {"batch": 8, "body": "binary", "error": "x"}]
    rec = {"config": {"batches": [1, 8], "bodies": ["binary"]}, "servers": {"coded": {"points": points},
                                                                          "parm": {"skipped": "no parm.onnx"}},
           "peer": {"skipped": "no venv"},
           "ceilings": {"1": {"coded": 1500.0, "raw_f": 2000.0}, "8": {"coded": 2500.0, "raw_f": 3000.0}},
           "targets": [{"name": "coded >= 0.85 x compute ceiling", "batch": 8, "value": None, "met": None}]}
    png = throughput_figure(rec, tmp_path / "t.png", "t")
    assert png.stat().st_size > 1000


def test_cli_flags_map_one_to_one_onto_the_configs(bundle: Path) -> None:
    from bench import kernel, latency, overhead, throughput
    from bench.errors import BenchError
    from kernels.configs import dataclass_values

    b = str(bundle)
    cfg = latency.config_from_args(latency.build_parser().parse_args(
        [b, "--modes", "coded,uncoded", "--poisson-rates", "10,30", "--server-args", "--workers 2",
         "--num-queries", "7", "--delay-ms", "50", "--tag", "t"]))
    assert cfg == LatencyConfig(bundles=(b,), modes=("coded", "uncoded"), poisson_rates=(10.0, 30.0),
                                server_args=("--workers", "2"), num_queries=7, delay_ms=50.0, tag="t")
    assert latency.config_from_args(latency.build_parser().parse_args([b])) == LatencyConfig(bundles=(b,))
    cfg = overhead.config_from_args(overhead.build_parser().parse_args(
        [b, "--ks", "2,3", "--skip-encoder-export", "--batch-size", "8", "--reference-f-presets", "paper"]))
    assert cfg == OverheadConfig(bundle=b, ks=(2, 3), skip_encoder_export=True, batch_size=8,
                                 reference_f_presets=("paper",))
    assert overhead.config_from_args(overhead.build_parser().parse_args([b])) == OverheadConfig(bundle=b)
    cfg = throughput.config_from_args(throughput.build_parser().parse_args(
        [b, "--modes", "coded", "--connections", "4", "--raw-duration-s", "0.5"]))
    assert cfg == ThroughputConfig(bundle=b, modes=("coded",), connections=4, raw_duration_s=0.5)
    assert throughput.config_from_args(throughput.build_parser().parse_args([b])) == ThroughputConfig(bundle=b)
    args = kernel.build_parser().parse_args(["--ds", "8,16", "--backend", "numpy", "--unfused", "none"])
    assert kernel.KernelBenchConfig.from_dict(dataclass_values(kernel.KernelBenchConfig, vars(args))) == (
        kernel.KernelBenchConfig(ds=(8, 16), backend="numpy", unfused="none"))
    for error in (LatencyBenchError, OverheadBenchError, ThroughputBenchError, kernel.KernelBenchError):
        assert issubclass(error, BenchError)


def test_ray_overhead_config_errors() -> None:
    from bench.ray_overhead import RayOverheadConfig, RayOverheadError

    with pytest.raises(RayOverheadError, match="batches must be >= 1"):
        RayOverheadConfig(batches=(0,))
    with pytest.raises(RayOverheadError, match="groups must be >= 10"):
        RayOverheadConfig(groups=3)
    assert RayOverheadConfig(batches=("1", "8")).batches == (1, 8)


def test_a_local_ray_instance_is_refused_outside_a_loopback_only_namespace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.netns_cluster as netns

    monkeypatch.setattr(netns, "loopback_only", lambda: False)
    with pytest.raises(netns.NetnsError, match="inside a private network namespace"):
        netns.require_loopback_only("--backends ray")
    monkeypatch.setattr(netns, "loopback_only", lambda: True)
    netns.require_loopback_only("--backends ray")


def test_monitor_config_errors(bundle: Path, tmp_path: Path) -> None:
    from bench.monitor import MonitorBenchError, MonitorConfig

    with pytest.raises(MonitorBenchError, match="not a bundle"):
        MonitorConfig(bundle=str(tmp_path))
    with pytest.raises(MonitorBenchError, match="--fraction must be in"):
        MonitorConfig(bundle=str(bundle), fraction=0.0)
    with pytest.raises(MonitorBenchError, match="--shift-images must be >= 1"):
        MonitorConfig(bundle=str(bundle), shift_images=0)


def test_monitor_offline_agreement_is_exact_on_the_linear_bundle(bundle: Path) -> None:
    """The linear dev bundle's encoder is exact, so every rebuilt answer agrees."""
    from bench.monitor import offline_agreement
    from runtime.manifest import Manifest

    m = Manifest.load(bundle)
    images = np.random.default_rng(0).integers(0, 256, (40, *m.input.shape), dtype=np.uint8)
    result = offline_agreement(str(bundle), m, images, groups=30, seed=1)
    for head in result.values():
        assert head["agreement"] == 1.0 and head["compared"] == 30
        assert head["interval_95"][0] < 1.0 == head["interval_95"][1]
