"""What every benchmark's `main` does the same way: SIGTERM stops the child processes
(through `finally`), the bench's own logger talks at INFO, and an invalid configuration is
one log line and exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from bench.serverproc import install_sigterm_handler

logger = logging.getLogger("bench")

C = TypeVar("C")


def comma_list(text: str, kind: Callable[[str], Any] = str) -> tuple[Any, ...]:
    """"a,b,,c" -> ("a", "b", "c") (converted by `kind`)."""
    return tuple(kind(x) for x in text.split(",") if x)


def bench_main(argv: list[str] | None, parser: argparse.ArgumentParser,
               make_config: Callable[[argparse.Namespace], C], run: Callable[[C], object],
               errors: tuple[type[BaseException], ...]) -> int:
    """Parse `argv`, build the config (an `errors` exception exits 2), run it; the exit
    code is what `run` returns when that is an int, else 0."""
    install_sigterm_handler()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    try:
        config = make_config(parser.parse_args(argv))
    except errors as exc:
        logger.error("%s", exc)
        return 2
    result = run(config)
    return result if isinstance(result, int) else 0
