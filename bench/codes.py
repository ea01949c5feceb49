"""`--coding N,K`: which of a bundle's codes a benchmark measures, in one place.

A bundle may hold several codes (runtime/manifest.py); the server serves the first unless
`serve --coding N,K` picks another. Every bench tool that takes a BUNDLE has the same flag
with the same meaning, and goes through this module for all of it: the flag's text is
checked when the tool's config is built (`check_coding`), the manifest is loaded with that
code selected (`load_code`), every server the tool starts gets `coding_server_args`, and
`--coding` inside a tool's `--server-args` is refused (`refuse_coding_in`), so there is one
way to say which code is measured and the record's `code` is always the code served.

Pure Python + runtime.manifest, so bench/triton_peer.py can use it from its own venv.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.errors import BenchError
from runtime.manifest import Manifest, ManifestError, code_label, parse_code_label

CODING_FLAG = "--coding"  # the server's flag (runtime/serve.py), spelled the same in every tool
CODING_HELP = "the bundle's code to measure, N,K (e.g. 4,3); default: its first code, as the server serves"


class CodingError(BenchError):
    """`--coding` is malformed, names no code of the bundle, or is given twice."""


def check_coding(coding: str | None, bundles: Iterable[str | Path] = (),
                 error: type[Exception] = CodingError) -> str | None:
    """`coding` as "n,k" (None stays None) after checking that it is N,K text and that every
    bundle in `bundles` holds that code; raises `error` (the tool's config error) otherwise."""
    if coding is None:
        return None
    try:
        label = code_label(*parse_code_label(coding))
    except ManifestError as exc:
        raise error(f"{CODING_FLAG}: {exc}") from exc
    for bundle in bundles:
        try:
            load_code(bundle, label)
        except (CodingError, ManifestError) as exc:
            raise error(str(exc)) from exc
    return label


def load_code(bundle: str | Path, coding: str | None) -> Manifest:
    """The bundle's manifest with `coding` ("n,k") as its selected (first) code; None = the
    bundle's first code. CodingError names the code asked for and the bundle's codes."""
    manifest = Manifest.load(bundle)
    if coding is None:
        return manifest
    try:
        n, k = parse_code_label(coding)
    except ManifestError as exc:
        raise CodingError(f"{CODING_FLAG}: {exc}") from exc
    try:
        return manifest.select_code(n, k)
    except ManifestError as exc:  # no such code: say so in the tool's terms
        raise CodingError(f"{CODING_FLAG} {code_label(n, k)}: {bundle} has no such code; its codes (n,k): "
                          f"{', '.join(manifest.code_labels())}") from exc


def coding_server_args(coding: str | None) -> list[str]:
    """The server flags that serve `coding`: ["--coding", "n,k"], or [] for the first code."""
    return [] if coding is None else [CODING_FLAG, coding]


def refuse_coding_in(flag: str, args: Sequence[str], error: type[Exception] = CodingError) -> None:
    """Raise `error` when extra server flags (`flag`: the tool option that carries them, e.g.
    "--server-args") contain --coding: the tool's own --coding says it, and names it in the record."""
    given = [a for a in args if a == CODING_FLAG or a.startswith(CODING_FLAG + "=")]
    if given:
        raise error(f"{flag} must not contain {CODING_FLAG} (got {given[0]!r}): use the tool's own "
                    f"{CODING_FLAG} N,K, which also loads that code's manifest and names it in the record")
