"""Every `python -m <pkg> [COMMAND] --help` works, and every command's module imports.

`python -m <pkg> --help` prints before any command module is imported, so on its own it
passes while a sub-command is broken; the second test imports each command's module from
its package's COMMANDS table and runs that command's `main(["--help"])`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

PACKAGES = ("kernels", "trainer", "export", "runtime", "bench", "experiments")
# Packages whose `python -m` dispatches through a COMMANDS table (kernels.commands.dispatch).
DISPATCHED = ("kernels", "trainer", "runtime", "bench", "experiments")


@pytest.mark.parametrize("package", PACKAGES)
def test_module_help(package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", package, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower()


def _commands() -> list[tuple[str, str, str]]:
    """(package, command, module) for every COMMANDS entry; export has verbs instead."""
    rows = []
    for package in DISPATCHED:
        commands = importlib.import_module(f"{package}.cli").COMMANDS
        rows += [(package, name, module) for name, (module, _) in commands.items()]
    return rows


@pytest.fixture
def process_state() -> Iterator[None]:
    """A command's main may set logger levels or a SIGTERM handler before it parses: undo them."""
    loggers = {name: logging.getLogger(name).level for name in PACKAGES}
    sigterm = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, sigterm)
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)


def _help_of(main: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main(argv)  # type: ignore[operator]
    except SystemExit as exc:  # argparse's --help exits 0
        code = exc.code
    assert code in (0, None), f"main({argv}) exited with {code}"
    return capsys.readouterr().out


@pytest.mark.parametrize(("package", "command", "module"), _commands(), ids=lambda v: str(v))
def test_every_command_imports_and_prints_help(
    package: str, command: str, module: str, capsys: pytest.CaptureFixture[str], process_state: None
) -> None:
    main = importlib.import_module(module).main  # a broken import fails here
    assert "usage:" in _help_of(main, ["--help"], capsys).lower(), f"python -m {package} {command} --help"


@pytest.mark.parametrize("verb", [None, "verify", "trt"])
def test_every_export_verb_prints_help(verb: str | None, capsys: pytest.CaptureFixture[str],
                                       process_state: None) -> None:
    from export.cli import main

    assert "usage:" in _help_of(main, [*([verb] if verb else []), "--help"], capsys).lower()


def test_every_export_module_imports() -> None:
    """export's verbs import their modules only when they run: import them all here."""
    import export

    for info in pkgutil.iter_modules(export.__path__, "export."):
        if not info.name.endswith(".__main__"):  # __main__ runs the CLI on import
            importlib.import_module(info.name)
