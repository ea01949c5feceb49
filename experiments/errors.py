"""The experiments' exceptions: under bench's base, so one hierarchy covers every study and
benchmark, and each command's `main` maps them to exit 2."""

from __future__ import annotations

from bench.errors import BenchError


class ExperimentError(BenchError):
    """An experiment cannot run as asked: the message names the flag or file and the fix."""


class ClassifiersError(ExperimentError):
    """Bad flags of `python -m experiments classifiers`, or an unreadable checkpoint."""


class CodabilityError(ExperimentError):
    """Bad flags of `python -m experiments codability`, or a checkpoint that is not a finished classifier."""
