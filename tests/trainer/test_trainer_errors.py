"""The trainer's exceptions live in one module under one base, and trainer imports only kernels."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import trainer
from trainer import errors
from trainer.errors import InverseNotConverged, TrainerError

TRAINER = Path(trainer.__file__).parent
MODULES = sorted(TRAINER.rglob("*.py"))


def test_every_trainer_error_is_a_trainer_error_and_a_value_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10
    assert all(issubclass(c, TrainerError) and issubclass(c, ValueError) for c in classes)
    # a numerical outcome, not bad input: callers catching RuntimeError keep working
    assert issubclass(InverseNotConverged, RuntimeError)


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "errors.py"], ids=lambda p: p.stem)
def test_no_module_defines_its_own_exception(path: Path) -> None:
    tree = ast.parse(path.read_text())
    own = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
           and any(getattr(base, "id", "").endswith(("Error", "Exception")) for base in node.bases)]
    assert own == [], f"{path.name} defines {own}; put them in trainer/errors.py"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_trainer_imports_only_kernels_of_our_packages(path: Path) -> None:
    ours = {"bench", "experiments", "export", "runtime"}
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not [n for n in names if n.split(".")[0] in ours], f"{path.name} imports {names}"
