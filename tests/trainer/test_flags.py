"""Config dataclass <-> CLI flags: presets fill what the user left unset, flags win; the
command a checkpoint records is the one a user types."""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass

import pytest

from trainer import flags
from trainer.errors import TrainerError


@dataclass
class _Config:
    out: str
    steps: int = 100
    lr: float = 1e-3
    data_dir: str | None = None


PRESETS = {"cpu": {"steps": 7, "lr": 0.5}}


def _parse(argv: list[str]) -> _Config:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    flags.add_preset_flags(parser, _Config, PRESETS, skip=("out",))
    return flags.config_from_args(_Config, PRESETS, parser.parse_args(argv))


def test_dataclass_defaults_without_preset() -> None:
    assert _parse(["--out", "x"]) == _Config(out="x")


def test_preset_fills_and_explicit_flags_win() -> None:
    assert _parse(["--out", "x", "--preset", "cpu"]) == _Config(out="x", steps=7, lr=0.5)
    assert _parse(["--out", "x", "--preset", "cpu", "--steps", "3", "--data-dir", "d"]) == _Config(
        out="x", steps=3, lr=0.5, data_dir="d")


def test_flag_types_follow_the_defaults() -> None:
    with pytest.raises(SystemExit):
        _parse(["--out", "x", "--steps", "many"])


def test_unknown_preset_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse(["--out", "x", "--preset", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_run_command_records_the_typed_command_and_maps_trainer_errors_to_exit_2(capsys, caplog) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    flags.add_preset_flags(parser, _Config, PRESETS, skip=("out",))
    seen = []

    def run(config: _Config, command: list[str]) -> dict:
        seen.append(command)
        if config.steps < 0:
            raise TrainerError("steps must be >= 0")
        return {"steps": config.steps, "history": [1, 2]}

    make = functools.partial(flags.config_from_args, _Config, PRESETS)
    assert flags.run_command("demo", ["--out", "x", "--steps", "3"], parser, make, run) == 0
    assert seen == [["python", "-m", "trainer", "demo", "--out", "x", "--steps", "3"]]
    assert json.loads(capsys.readouterr().out) == {"steps": 3}  # the history is left out
    assert flags.run_command("demo", ["--out", "x", "--steps", "-1"], parser, make, run) == 2
    assert "steps must be >= 0" in caplog.text
