"""Config dataclass -> CLI flags with budget presets, and the `main` of every trainer command.

The flags come from `kernels.configs.add_dataclass_flags` (one `--field-name` per field)
with every default None, so that `config_from_args` can tell "not given" from "given": a
preset fills the fields the user did not set, and explicit flags always win.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from kernels.configs import add_dataclass_flags, dataclass_values
from kernels.errors import CodingError
from trainer.errors import TrainerError

C = TypeVar("C")


def command_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m trainer NAME`, its module docstring as the description."""
    return argparse.ArgumentParser(prog=f"python -m trainer {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_preset_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    skip: Collection[str] = (),
    choices: Mapping[str, Collection[Any]] | None = None,
) -> argparse.ArgumentParser:
    """Add `--preset` and one unset-by-default flag per field of `config_cls` not in `skip`
    (`choices`: the allowed values of some fields' flags)."""
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="budget preset; explicit flags win")
    add_dataclass_flags(parser, config_cls, skip=skip, choices=choices, unset_defaults=True)
    return parser


def config_from_args(config_cls: type[C], presets: Mapping[str, Mapping[str, Any]],
                     args: argparse.Namespace) -> C:
    """The preset's values, overridden by every flag the user gave."""
    values = dict(presets[args.preset]) if args.preset else {}
    values.update(dataclass_values(config_cls, vars(args)))
    return config_cls(**values)


def typed_command(*args: str) -> list[str]:
    """`python -m trainer ARGS...` as a user types it (not this machine's interpreter path):
    what checkpoints record as provenance."""
    return ["python", "-m", "trainer", *args]


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

    Bad input (a TrainerError: config, checkpoint, ideal-data cache or dataset; or a coding
    error from kernels) is reported as one log line naming the problem, with exit code 2
    instead of a traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        result = run(make_config(args), command=typed_command(name, *argv))
    except (TrainerError, CodingError) as exc:
        logging.getLogger(f"trainer.{name}").error("%s", exc)
        return 2
    if summary is None:  # training metrics: everything but the per-evaluation history
        result = {key: value for key, value in result.items() if key != "history"}
    else:
        result = summary(result)
    print(json.dumps(result))  # noqa: T201 - the command's result line
    return 0
