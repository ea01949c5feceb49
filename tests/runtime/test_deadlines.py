"""The learned decode wait (runtime.deadlines): wait only as long as waiting has paid."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.deadlines import NEVER, DecodeWait, Lateness


def test_waits_the_cap_while_learning() -> None:
    lateness = Lateness(DecodeWait(cap_s=0.005, min_samples=4))
    for _ in range(3):
        lateness.observe(0.001)
    assert lateness.wait_s() == 0.005  # 3 < 4 samples: wait the cap, and learn


def test_waits_the_quantile_of_results_that_came_within_the_cap() -> None:
    lateness = Lateness(DecodeWait(quantile=0.5, cap_s=0.005, min_pay=0.5, min_samples=4), refresh=1)
    values = [0.001, 0.002, 0.003, 0.004, 1.0]  # 4 of 5 came within the cap
    for v in values:
        lateness.observe(v)
    assert lateness.wait_s() == pytest.approx(float(np.quantile(values[:4], 0.5)))


def test_decodes_at_once_when_waiting_does_not_pay() -> None:
    lateness = Lateness(DecodeWait(cap_s=0.005, min_pay=0.5, min_samples=4), refresh=1)
    for v in (0.1, 0.1, NEVER, 0.001):  # a straggler in most groups: 1 of 4 within the cap
        lateness.observe(v)
    assert lateness.wait_s() == 0.0
    for _ in range(8):  # the stragglers went away: waiting pays again (window of recent ones)
        lateness.observe(0.001)
    assert lateness.wait_s() == pytest.approx(0.001)


def test_the_window_forgets_old_latenesses() -> None:
    lateness = Lateness(DecodeWait(cap_s=0.005, min_samples=2), window=4, refresh=1)
    for v in (NEVER, NEVER, NEVER, NEVER, 0.002, 0.002, 0.002, 0.002):
        lateness.observe(v)
    assert lateness.samples == 4 and lateness.wait_s() == pytest.approx(0.002)


@pytest.mark.parametrize("kwargs", [{"quantile": 0.0}, {"quantile": 1.5}, {"cap_s": -1.0},
                                    {"min_samples": 0}, {"min_pay": 1.5}])
def test_policy_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DecodeWait(**kwargs)
