"""Learned deadlines (runtime.deadlines): quantiles of recent healthy call times, capped."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.deadlines import CompletionTimes, LearnedBound


def test_quantile_of_the_recent_window_only() -> None:
    times = CompletionTimes(window=4, refresh=1)
    assert times.quantile(0, 0.5) is None  # nothing seen yet
    for seconds in (9.0, 9.0, 1.0, 2.0, 3.0, 4.0):  # the first two fall out of the window
        times.observe(0, seconds)
    assert times.samples(0) == 4
    assert times.quantile(0, 1.0) == 4.0
    assert times.quantile(0, 0.5) == pytest.approx(float(np.quantile([1, 2, 3, 4], 0.5)))
    assert times.quantile(1, 0.5) is None  # keys are apart


def test_quantiles_are_refreshed_every_few_observations_not_every_call() -> None:
    times = CompletionTimes(window=64, refresh=3)
    times.observe(0, 1.0)
    assert times.quantile(0, 1.0) == 1.0
    times.observe(0, 5.0)
    times.observe(0, 5.0)
    assert times.quantile(0, 1.0) == 1.0  # cached: 2 observations since
    times.observe(0, 5.0)
    assert times.quantile(0, 1.0) == 5.0  # 3 since: recomputed


def test_bound_is_capped_and_unknown_until_enough_samples() -> None:
    times = CompletionTimes(refresh=1)
    bound = LearnedBound(quantile=1.0, cap_s=0.5, min_samples=3, unknown_s=0.25)
    times.observe(0, 0.1)
    times.observe(0, 0.2)
    assert times.bound_s([0], bound) == 0.25  # two samples: not enough to learn from
    times.observe(0, 0.3)
    assert times.bound_s([0], bound) == pytest.approx(0.3)
    for _ in range(3):
        times.observe(1, 2.0)
    assert times.bound_s([1], bound) == 0.5  # capped
    assert times.bound_s([0, 1], bound) == 0.5  # the slowest of the workers waited for
    assert times.bound_s([], bound) == 0.0


@pytest.mark.parametrize("kwargs", [{"quantile": 0.0}, {"quantile": 1.5}, {"cap_s": -1.0},
                                    {"min_samples": 0}, {"unknown_s": -0.1}])
def test_bound_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LearnedBound(**kwargs)
