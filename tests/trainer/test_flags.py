"""Config dataclass <-> CLI flags: presets fill what the user left unset, flags win."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from trainer import flags


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
    flags.add_config_flags(parser, _Config(out=""), skip=("out",), presets=PRESETS)
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
