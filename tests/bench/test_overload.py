"""Overload bench: a tiny run (tiny bundle, 2 s per step, multipliers 1,2) whose record must
have every step and counts that add up. No timing asserts: rates depend on the machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_harness import build_tiny_bundle  # noqa: E402

from bench.overload import OverloadBenchError, OverloadConfig, build_parser, config_from_args, run  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("overload") / "tiny", k=2, n=3).bundle


def test_config_and_flags(bundle: Path, tmp_path: Path) -> None:
    cfg = config_from_args(build_parser().parse_args([str(bundle), "--multipliers", "1,3", "--batch", "2"]))
    assert cfg.multipliers == (1, 3) and cfg.batch == 2 and cfg.base_connections == 32
    with pytest.raises(OverloadBenchError, match="comma-separated integers"):
        config_from_args(build_parser().parse_args([str(bundle), "--multipliers", "1,x"]))
    with pytest.raises(OverloadBenchError, match=r"--multipliers must be integers >= 1, got \[0\]"):
        OverloadConfig(bundle=str(bundle), multipliers=(0,))
    with pytest.raises(OverloadBenchError, match="not a bundle"):
        OverloadConfig(bundle=str(tmp_path))


def test_tiny_overload_record_adds_up(bundle: Path, tmp_path: Path) -> None:
    cfg = OverloadConfig(bundle=str(bundle), duration_s=2.0, warmup_s=0.5, settle_s=0.2, base_connections=4,
                         multipliers=(1, 2),
                         server_args=("--max-queue-size", "16", "--max-batch-size", "8"),
                         out_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"), tag="t")
    record = run(cfg)
    steps = record["steps"]
    assert [(s["step"], s["connections"]) for s in steps] == [("capacity", 4), ("1x", 4), ("2x", 8)]
    for s in steps:
        assert s["sent"] == s["answered"] + s["unanswered"] > 0
        assert sum(s["statuses"].values()) == s["answered"]
        assert sum(s["errors"].values()) == s["unanswered"]
        for status, n in s["window_statuses"].items():
            assert n <= s["statuses"].get(status, 0) + (s["unanswered"] if status == "0" else 0)
        assert set(s["statuses"]) <= {"200", "503"}  # overload answers 503, never 500
        assert s["goodput_rps"] == pytest.approx(s["window_statuses"].get("200", 0) / cfg.duration_s)
        assert s["goodput_qps"] == pytest.approx(s["goodput_rps"] * cfg.batch)
        assert s["rejected_503"] == s["window_statuses"].get("503", 0)
        assert sum(p["ok_rps"] for p in s["per_second"]) == s["window_statuses"].get("200", 0)
        assert s["rss_peak_mib"] and s["rss_peak_mib"] >= s["rss_start_mib"]
    v = record["verdicts"]
    assert v["capacity_rps"] == steps[0]["goodput_rps"] and v["largest"] == "2x"
    assert set(v["goodput_ratio_vs_capacity"]) == {"1x", "2x"}
    assert isinstance(v["goodput_at_largest_ok"], bool) and isinstance(v["rss_bounded"], bool)
    saved = json.loads((tmp_path / "out" / "overload-t.json").read_text())
    assert saved["verdicts"] == v and (tmp_path / "out" / "overload-t.png").is_file()
