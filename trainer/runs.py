"""Where a run directory keeps its checkpoints: one owner for the names that the
re-train pipeline (`python -m trainer train-all`) writes and `python -m bench accuracy`
reads, so the two can never disagree.

    RUNS/<dataset>/classifier.pt
    RUNS/<dataset>/encoder_k<k>.pt           (n = k + 1)
    RUNS/<dataset>/encoder_n<n>_k<k>.pt      (any other n)
    RUNS/<dataset>/parm_k<k>.pt
"""

from __future__ import annotations

from pathlib import Path

from trainer.errors import SettingError

# The (n, k) settings of the degraded-mode accuracy table.
DEFAULT_SETTINGS = ("3,2", "5,4", "11,10", "4,2", "6,4")


def parse_setting(text: str) -> tuple[int, int]:
    """'n,k' -> (n, k), with n > k >= 2."""
    try:
        n, k = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise SettingError(f"a setting is 'n,k' like '5,4', got {text!r}") from exc
    if not n > k >= 2:
        raise SettingError(f"a setting needs n > k >= 2, got {text!r}")
    return n, k


def classifier_path(runs: Path, dataset: str) -> Path:
    return runs / dataset / "classifier.pt"


def encoder_path(runs: Path, dataset: str, n: int, k: int) -> Path:
    return runs / dataset / (f"encoder_k{k}.pt" if n == k + 1 else f"encoder_n{n}_k{k}.pt")


def parm_path(runs: Path, dataset: str, k: int) -> Path:
    return runs / dataset / f"parm_k{k}.pt"
