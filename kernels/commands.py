"""Lazy sub-command dispatch shared by every package's `python -m <pkg>` entry point.

It lives in `kernels` because that is the one package every other package may import.
Each command's module is imported only when that command runs, so `--help` stays
instant and a CPU-only install never imports torch, TensorRT or pycuda by accident.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping


def dispatch(
    prog: str,
    description: str,
    commands: Mapping[str, tuple[str, str]],
    argv: list[str] | None = None,
) -> int:
    """Run `commands[argv[0]]`'s `main(argv[1:])`; `commands` maps name -> (module, help)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<12} {text}" for name, (_, text) in commands.items())
        + f"\n\nRun `{prog} COMMAND --help` for a command's flags.",
    )
    parser.add_argument("command", choices=list(commands), metavar="COMMAND")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command = parser.parse_args(argv[:1]).command
    module = importlib.import_module(commands[command][0])
    return int(module.main(argv[1:]) or 0)
