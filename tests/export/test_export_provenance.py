"""Provenance commands are recorded as a user types them, never with a machine's paths."""

from __future__ import annotations

import pytest

from export.provenance import normalized_command


@pytest.mark.parametrize(
    ("command", "typed"),
    [
        (["/work/main/trainer/__main__.py", "classifier", "--k", "4"], "python -m trainer classifier --k 4"),
        (["/opt/venv/bin/python3.12", "-m", "export", "a.pt", "--out", "b"], "python -m export a.pt --out b"),
        ("/usr/bin/python -m bench accuracy", "python -m bench accuracy"),
        (["python", "-m", "export", "(test)"], "python -m export '(test)'"),
        (["/home/me/tools/train.py", "--k", "4"], "python train.py --k 4"),
        ([], None),
        (None, None),
    ],
)
def test_typed_command(command: object, typed: str | None) -> None:
    assert normalized_command(command) == typed  # type: ignore[arg-type]
