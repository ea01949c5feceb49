"""bench served: scoring served answers against labels."""

from __future__ import annotations

import numpy as np
import pytest

from bench.served import ServedBenchError, ServedConfig, score


def test_score_counts_reconstructed_answers_apart() -> None:
    labels = np.array([1, 2, 3, 4])
    classes = np.array([1, 2, 0, 0])
    reconstructed = np.array([False, True, True, False])
    got = score(classes, reconstructed, labels)
    assert got["accuracy"] == pytest.approx(2 / 4)
    assert got["reconstructed_fraction"] == pytest.approx(2 / 4)
    assert got["reconstructed_accuracy"] == pytest.approx(1 / 2)  # query 1 right, query 2 wrong
    assert score(classes, np.zeros(4, bool), labels)["reconstructed_accuracy"] is None


def test_config_is_validated(tmp_path) -> None:
    with pytest.raises(ServedBenchError, match="not a bundle"):
        ServedConfig(bundle=str(tmp_path))
    with pytest.raises(ServedBenchError, match="policies"):
        ServedConfig(policies=("nope",))
