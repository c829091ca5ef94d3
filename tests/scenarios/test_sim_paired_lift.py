"""The ground-truth lift prediction of the ab scenario: a paired ratio with a delta-method CI over requests."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.scenarios.ab import paired_lift
from recforge.synthetic.online import DayTraffic, Requests


def _traffic(prob: np.ndarray) -> DayTraffic:
    n, k = prob.shape
    zeros = np.zeros(n, dtype=np.int64)
    requests = Requests(0, zeros, zeros, zeros, zeros)
    return DayTraffic(requests, np.zeros((n, k), dtype=np.int64), prob, np.zeros((n, k), dtype=bool),
                      [{}] * n, [""] * n, np.zeros(n, dtype=bool))


def test_point_estimate_is_the_ratio_of_expected_ctrs():
    rng = np.random.default_rng(0)
    weak = rng.uniform(0.05, 0.15, (500, 10))
    strong = weak * 1.2
    lift, (low, high) = paired_lift(_traffic(strong), _traffic(weak), 0.05)
    assert lift == pytest.approx(0.2)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.2)  # perfectly paired: no uncertainty


def test_the_interval_covers_the_population_lift_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    # A population of requests; each sample draws 400 of them, and both arms answer the same ones.
    base = rng.uniform(0.02, 0.3, (20000, 1))
    weak_pop = np.clip(base + rng.normal(0, 0.03, (20000, 10)), 0.001, 0.999)
    strong_pop = np.clip(base * 1.15 + rng.normal(0, 0.05, (20000, 10)), 0.001, 0.999)
    truth = strong_pop.mean() / weak_pop.mean() - 1
    covered = 0
    for _ in range(300):
        rows = rng.integers(0, 20000, 400)
        _, (low, high) = paired_lift(_traffic(strong_pop[rows]), _traffic(weak_pop[rows]), 0.05)
        covered += low <= truth <= high
    assert 0.90 <= covered / 300 <= 0.99
