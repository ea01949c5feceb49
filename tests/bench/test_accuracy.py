"""bench accuracy: table writing, not-run reporting and setting errors (its scoring is
trainer.coded_eval, tested in tests/trainer/test_coded_eval.py)."""

from __future__ import annotations

import json

import pytest

from bench.accuracy import NOT_RUN, AccuracyBenchError, AccuracyConfig, main, parse_setting, run
from bench.errors import BenchError


def test_not_run_when_checkpoints_missing(tmp_path) -> None:
    config = AccuracyConfig(datasets=["mnist"], settings=["5,4", "6,4"], runs_dir=str(tmp_path / "runs"),
                            out_dir=str(tmp_path / "out"))
    record = run(config, ["test"])
    assert {r["status"] for r in record["rows"]} == {NOT_RUN}
    assert len(record["rows"]) == 6
    saved = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert saved["rows"] == record["rows"]
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| mnist | (5,4) | ParM |" in md and NOT_RUN in md
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0


def test_setting_errors() -> None:
    assert parse_setting("11,10") == (11, 10)
    with pytest.raises(AccuracyBenchError, match="'n,k' like '5,4'"):
        parse_setting("5-4")
    with pytest.raises(AccuracyBenchError, match="n > k >= 2"):
        AccuracyConfig(settings=["4,4"])


def test_bad_flags_exit_2_naming_the_problem(tmp_path, caplog) -> None:
    assert main(["--settings", "5-4", "--out-dir", str(tmp_path)]) == 2
    assert "a setting is 'n,k' like '5,4', got '5-4'" in caplog.text
    assert issubclass(AccuracyBenchError, BenchError)  # one hierarchy for every benchmark
    assert not (tmp_path / "accuracy.json").exists()
