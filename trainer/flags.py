"""Config dataclass <-> CLI flags with budget presets, shared by the trainer commands.

Every dataclass field except the required ones becomes `--field-name` with default None,
so that `config_from_args` can tell "not given" from "given": a preset fills the fields
the user did not set, and explicit flags always win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

C = TypeVar("C")


def add_config_flags(
    parser: argparse.ArgumentParser,
    defaults: Any,
    skip: Collection[str],
    presets: Mapping[str, Mapping[str, Any]],
    str_fields: Collection[str] = ("data_dir",),
) -> argparse.ArgumentParser:
    """Add `--preset` and one flag per field of the dataclass instance `defaults`."""
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="budget preset; explicit flags win")
    for field in dataclasses.fields(defaults):
        if field.name in skip:
            continue
        value = getattr(defaults, field.name)
        kind = str if field.name in str_fields else type(value)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                            help=f"default {value}")
    return parser


def config_from_args(config_cls: type[C], presets: Mapping[str, Mapping[str, Any]],
                     args: argparse.Namespace) -> C:
    """The preset's values, overridden by every flag the user gave."""
    values = dict(presets[args.preset]) if args.preset else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "preset"})
    return config_cls(**values)


def run_command(
    name: str,
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
    make_config: Callable[[argparse.Namespace], C],
    run: Callable[..., dict[str, Any]],
    summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """The `main` of a trainer command: flags -> config -> run(config, command=...) -> one JSON line
    (`summary` of the result; by default the result without its "history").

    Bad input (any ValueError: a config, checkpoint, ideal-data cache or dataset error) is
    reported as one log line naming the problem, with exit code 2 instead of a traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        result = run(make_config(args), command=["python", "-m", "trainer", name, *argv])
    except ValueError as exc:
        logging.getLogger(f"trainer.{name}").error("%s", exc)
        return 2
    if summary is None:  # training metrics: everything but the per-evaluation history
        result = {key: value for key, value in result.items() if key != "history"}
    else:
        result = summary(result)
    print(json.dumps(result))  # noqa: T201 - the command's result line
    return 0
