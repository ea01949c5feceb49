"""CLI flags map one-to-one onto ServerConfig fields; bad options fail clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runtime.config import FaultConfig, ServerConfig
from runtime.errors import ConfigError
from runtime.serve import build_parser, config_from_args, main


def test_every_field_has_exactly_one_flag() -> None:
    dests = {a.dest for a in build_parser()._actions} - {"help"}
    fields = {f.name for f in dataclasses.fields(ServerConfig)} - {"faults"}
    fault_fields = {"fault_" + f.name for f in dataclasses.fields(FaultConfig)}
    assert dests == fields | fault_fields


def test_flags_reach_the_config() -> None:
    config = config_from_args([
        "some/bundle", "--mode", "parm", "--http-port", "0", "--max-queue-delay-ms", "7.5",
        "--encoders-on-workers", "--fault-straggler-per-group", "--fault-delay-ms", "50",
        "--fault-kill-worker", "1", "--fault-kill-after-calls", "3"])
    assert config.bundle == "some/bundle" and config.mode == "parm" and config.http_port == 0
    assert config.max_queue_delay_ms == 7.5 and config.encoders_on_workers
    assert config.faults == FaultConfig(delay_ms=50.0, straggler_per_group=True, kill_worker=1,
                                        kill_after_calls=3)


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "fancy"}, "--mode must be one of"),
    ({"engine": "torch"}, "pass --device cuda"),
    ({"device": "cuda"}, "runs on the CPU here"),
    ({"max_queue_size": 0}, "--max-queue-size must be >= 1"),
    ({"fault_delay_prob": 1.5}, r"--fault-delay-prob must be in \[0, 1\]"),
    ({"fault_kill_worker": 1}, "go together"),
    ({"colour": "red"}, r"unknown server option\(s\) \['colour'\]"),
])
def test_invalid_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_dict({"bundle": "b", **options})


def test_missing_bundle_exits_nonzero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main([str(tmp_path / "nope"), "--http-port", "0", "--metrics-port", "-1"]) == 1
    assert "no manifest" in caplog.text


def test_bad_flag_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["b", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1" in capsys.readouterr().err


def test_loop_factory_prefers_uvloop() -> None:
    from runtime.loops import loop_factory

    factory, name = loop_factory()
    try:
        import uvloop
    except ImportError:
        assert name == "asyncio"
    else:
        assert name == "uvloop" and factory is uvloop.new_event_loop
