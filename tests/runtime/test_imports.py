"""runtime/ never imports torch, trainer or export at module level (only lazily, inside
the torch engine), so a torch-free serving install works. Parsed with `ast`, not imported."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
FORBIDDEN = ("torch", "trainer", "export", "tensorrt", "pycuda")
# Lazy imports allowed only inside these functions (engine loaders picked by --engine).
LAZY_ALLOWED = {"TorchRunner.__init__", "TensorRTRunner.__init__", "find_tensorrt_plan",
                "make_device_decoders", "import_ray"}


def _imports(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(top-level module, enclosing function path or '<module>', line) for every import."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            else:
                names = []
            for name in names:
                found.append((name.split(".")[0], ".".join(scope) or "<module>", child.lineno))
            visit(child, scope)

    visit(tree, [])
    return found


def _violations(source: str) -> list[str]:
    bad = []
    for module, scope, line in _imports(ast.parse(source)):
        if module in FORBIDDEN and scope not in LAZY_ALLOWED:
            bad.append(f"line {line}: import of {module!r} in {scope}")
    return bad


@pytest.mark.parametrize("path", sorted(RUNTIME.glob("*.py")), ids=lambda p: p.name)
def test_runtime_module_has_no_forbidden_import(path: Path) -> None:
    assert _violations(path.read_text()) == [], f"{path}: forbidden import"


def test_checker_catches_forbidden_imports() -> None:
    """The checker itself must be able to fail (module level, nested, and from-imports)."""
    assert _violations("import torch\n")
    assert _violations("from trainer.models import f\n")
    assert _violations("def g():\n    import export.bundle\n")
    assert _violations("try:\n    import torch\nexcept ImportError:\n    pass\n")
    assert not _violations("class TorchRunner:\n    def __init__(self):\n        import torch\n")


def test_serving_imports_no_torch_at_runtime() -> None:
    """Importing the whole server in a fresh interpreter loads no torch/trainer/export."""
    code = ("import sys, runtime.serve, runtime.server, runtime.modes, runtime.engines; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{FORBIDDEN!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=RUNTIME.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


IMPORT_NAMES = {"grpcio": "grpc", "protobuf": "google"}  # distributions named unlike their module


def _serve_extra() -> set[str]:
    """Import names of pyproject's core dependencies and its `serve` extra (the one list)."""
    project = tomllib.loads((RUNTIME.parent / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["serve"]]
    names = {re.split(r"[=<>;\[ ]", spec, maxsplit=1)[0] for spec in specs}
    return {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in names}


SERVE_EXTRA = _serve_extra()
OURS = {"runtime", "kernels"}


@pytest.mark.parametrize("path", sorted(RUNTIME.glob("*.py")), ids=lambda p: p.name)
def test_runtime_needs_only_the_serve_extra(path: Path) -> None:
    """`make serve` installs only `.[serve]`: every import outside the lazy GPU engines must
    come from the standard library, that extra, or our own runtime/kernels packages."""
    allowed = set(sys.stdlib_module_names) | SERVE_EXTRA | OURS
    extra = sorted({module for module, scope, _ in _imports(ast.parse(path.read_text()))
                    if module not in allowed and scope not in LAZY_ALLOWED})
    assert extra == [], f"{path.name} imports {extra}, which `pip install .[serve]` lacks"
