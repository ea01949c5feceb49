"""Every package's `python -m <pkg> --help` works on a fresh install (issue 2's done-when)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["kernels", "trainer", "export", "runtime", "bench"])
def test_module_help(package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", package, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower()
