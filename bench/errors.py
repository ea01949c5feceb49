"""The benchmarks' exceptions: one base, so `python -m bench` maps every bad input to exit 2."""

from __future__ import annotations


class BenchError(ValueError):
    """A benchmark cannot run as asked: the message names the flag or file and the fix."""
