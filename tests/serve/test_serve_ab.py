"""A/B assignment is a pure function: sticky, uniform, weight-proportional and independent across salts."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.serve import ab

USERS = [f"user-{i}" for i in range(20_000)]


def test_unit_hash_is_deterministic_and_in_unit_interval() -> None:
    values = [ab.unit_hash(u, "s") for u in USERS[:100]]
    assert values == [ab.unit_hash(u, "s") for u in USERS[:100]]
    assert all(0.0 <= v < 1.0 for v in values)
    # Ints and their decimal strings are the same user (ids arrive either way over JSON).
    assert ab.unit_hash(42, "s") == ab.unit_hash("42", "s")


def test_unit_hash_is_uniform() -> None:
    u = np.array([ab.unit_hash(user, "salt-a") for user in USERS])
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = len(USERS) / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # chi-square(19) at p = 0.001


def test_salts_give_independent_assignments() -> None:
    a = np.array([ab.unit_hash(user, "salt-a") for user in USERS])
    b = np.array([ab.unit_hash(user, "salt-b") for user in USERS])
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(len(USERS))
    table = np.histogram2d(a, b, bins=2, range=((0, 1), (0, 1)))[0]
    expected = len(USERS) / 4
    assert float(((table - expected) ** 2 / expected).sum()) < 16.3  # chi-square(3) at p = 0.001


def test_assign_follows_weights_and_is_sticky() -> None:
    experiment = ab.Experiment("e", "salt", (ab.Variant("a", 1.0), ab.Variant("b", 3.0, ranker="2")))
    picks = [ab.assign(user, experiment).name for user in USERS]
    share_b = picks.count("b") / len(picks)
    assert abs(share_b - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(picks))
    assert picks[:500] == [ab.assign(user, experiment).name for user in USERS[:500]]
    assert ab.assign_all("user-1", [experiment]) == {"e": ab.assign("user-1", experiment)}


def test_pick_buckets_edges() -> None:
    assert ab.pick(0.0, [1, 1]) == 0
    assert ab.pick(0.4999, [1, 1]) == 0
    assert ab.pick(0.5, [1, 1]) == 1
    assert ab.pick(0.9999999999, [1, 2, 0]) == 1  # the tail never lands in a zero-weight bucket
    assert ab.pick(0.3, [0, 1]) == 1


def test_canary_share_is_a_fixed_user_fraction() -> None:
    inside = [u for u in USERS if ab.in_canary(u, "ranker", 0.1)]
    assert abs(len(inside) / len(USERS) - 0.1) < 4 * np.sqrt(0.09 / len(USERS))
    assert inside == [u for u in USERS if ab.in_canary(u, "ranker", 0.1)]
    assert not any(ab.in_canary(u, "ranker", 0.0) for u in USERS[:100])
    assert all(ab.in_canary(u, "ranker", 1.0) for u in USERS[:100])


@pytest.mark.parametrize("variants", [(), (ab.Variant("a", 0.0),), (ab.Variant("a", 1.0), ab.Variant("a", 1.0)),
                                      (ab.Variant("a", -1.0), ab.Variant("b", 2.0))])
def test_bad_experiments_are_refused(variants: tuple[ab.Variant, ...]) -> None:
    with pytest.raises(ValueError, match="experiment 'bad'"):
        ab.Experiment("bad", "salt", variants)
