"""Config dataclasses: one strict loader and one way from a dataclass to CLI flags.

It lives in `kernels` because that is the one package every other package may import
(see kernels/commands.py). Every package's config dataclasses go through these two:

- `strict_from_dict(cls, data, error)`: unknown keys are errors, never silently ignored,
  so a typo in a manifest, checkpoint or options dict fails loudly and names the fix;
- `add_dataclass_flags(parser, cls, ...)`: one `--field-name` flag per field, typed from
  the field's annotation, so CLI flags map one-to-one onto dataclass fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

C = TypeVar("C")


def check_keys(where: str, data: Any, allowed: Collection[str], required: Collection[str] = (),
               error: type[Exception] = ValueError) -> None:
    """Raise `error` unless `data` is a mapping whose keys are all in `allowed` and include
    every key of `required`."""
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping, got {type(data).__name__}")
    missing = sorted(set(required) - data.keys())
    unknown = sorted(data.keys() - set(allowed))
    if missing:
        raise error(f"{where}: missing required key(s) {missing}")
    if unknown:
        raise error(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def strict_from_dict(cls: type[C], data: Mapping[str, Any], error: type[Exception] = ValueError,
                     where: str | None = None) -> C:
    """`cls(**data)` after checking that every key names a field of the dataclass `cls`
    (fields without defaults must be present)."""
    required = {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    check_keys(where or cls.__name__, data, field_names(cls), required, error)
    return cls(**data)


def _flag_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, takes several values) for an annotation such as `int | None` or
    `tuple[int, ...]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _flag_type(args[0])
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return (args[0] if args else str), True
    if annotation in (int, float, str, bool):
        return annotation, False
    raise TypeError(f"no CLI flag type for annotation {annotation!r}")


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    helps: Mapping[str, str] | None = None,
    prefix: str = "",
    skip: Collection[str] = (),
    choices: Mapping[str, Collection[Any]] | None = None,
    defaults: Any = None,
    unset_defaults: bool = False,
) -> None:
    """One flag `--<prefix><field-name>` per field of the dataclass `cls` (dest
    `<prefix><field_name>`).

    `defaults`: an instance whose values are shown as defaults (the field defaults when
    None). `unset_defaults=True` gives every flag the default None, so a caller can tell
    "not given" from "given" (presets fill what the user did not set). Booleans become
    `--flag / --no-flag`; tuples take several values."""
    helps, choices = helps or {}, choices or {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        dest = prefix + field.name
        flag = "--" + dest.replace("_", "-")
        if defaults is not None:
            shown = getattr(defaults, field.name)
        elif field.default is not dataclasses.MISSING:
            shown = field.default
        elif field.default_factory is not dataclasses.MISSING:
            shown = field.default_factory()
        else:
            shown = None
        default = None if unset_defaults else shown
        text = helps.get(field.name, "")
        if shown is not None:
            text = f"{text} (default: {shown})" if text else f"default {shown}"
        kind, many = _flag_type(hints[field.name])
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=default, help=text)
            continue
        parser.add_argument(flag, dest=dest, type=kind, default=default,
                            nargs="+" if many else None, choices=choices.get(field.name),
                            help=text)


def dataclass_values(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The entries of a flat mapping (parsed flags) that belong to `cls`'s fields, with
    `prefix` removed and lists turned into tuples; None (flag not given) is left out."""
    out: dict[str, Any] = {}
    for name in field_names(cls):
        value = values.get(prefix + name)
        if value is None:
            continue
        out[name] = tuple(value) if isinstance(value, list) else value
    return out
