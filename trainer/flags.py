"""Config dataclass <-> CLI flags with budget presets, shared by the trainer commands.

Every dataclass field except the required ones becomes `--field-name` with default None,
so that `config_from_args` can tell "not given" from "given": a preset fills the fields
the user did not set, and explicit flags always win.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection, Mapping
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
