"""`python -m experiments COMMAND ...`: studies that chose the recipes (not benchmarks).

They drive the trainer and `bench accuracy`, and write their records under
experiments/results/.
"""

from __future__ import annotations

from kernels.commands import dispatch

COMMANDS = {
    "classifiers": ("experiments.classifiers", "compare trained classifiers: recipe, train vs test accuracy, time"),
    "codability": ("experiments.codability", "one f's clean, degraded and served accuracy (trains its encoder)"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m experiments", __doc__ or "", COMMANDS, argv)
