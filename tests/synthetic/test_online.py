"""The online simulator's pure parts: traffic, ground-truth clicks, events (the HTTP side is covered end to end)."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.config import GenerateConfig
from recforge.synthetic.online import (
    CLICK_DELAY_S,
    SCROLL_S,
    build_events,
    click_probabilities,
    draw_clicks,
    draw_requests,
    shown_items,
)
from recforge.synthetic.world import DEVICES, SECONDS_PER_DAY, build_world, period_start


@pytest.fixture(scope="module")
def world():
    return build_world(GenerateConfig(users=200, items=60, events=1000, days=3, seed=5))


def test_requests_fall_inside_their_day_and_are_seeded(world):
    day = 3
    a = draw_requests(world, 5000, day, np.random.default_rng(1))
    b = draw_requests(world, 5000, day, np.random.default_rng(1))
    np.testing.assert_array_equal(a.users, b.users)
    start = period_start(world.config) + day * SECONDS_PER_DAY
    last_event = a.timestamps + SCROLL_S * 9 + CLICK_DELAY_S
    assert (a.timestamps >= start).all()
    # Every event of a request stays in the request's hour (so in its day's partition too).
    assert (last_event < start + 3600 * (a.hours + 1)).all()
    np.testing.assert_array_equal((a.timestamps - start) // 3600, a.hours)
    assert (np.diff(a.timestamps) >= 0).all()
    # Users follow the world's activity: the most active user is drawn far more than an average one.
    counts = np.bincount(a.users, minlength=world.n_users)
    assert counts[np.argmax(world.user_activity)] > 3 * counts.mean()
    # Most requests come from the user's own device.
    assert (a.devices == world.user_device[a.users]).mean() > 0.8
    bodies = a.bodies(10, False)
    assert bodies[0] == {"user_id": int(a.users[0]), "context": {"hour": int(a.hours[0]),
                                                                 "device": DEVICES[a.devices[0]]},
                         "k": 10, "exclude_seen": False}


def test_click_probabilities_are_the_world_truth_at_each_slot(world):
    requests = draw_requests(world, 4, 3, np.random.default_rng(2))
    responses = [{"items": [{"item_id": i} for i in ids]} for ids in ([5, 7, 9], [1], [], [2, 3, 4, 8])]
    items = shown_items(responses, 4)
    assert items.tolist() == [[5, 7, 9, -1], [1, -1, -1, -1], [-1] * 4, [2, 3, 4, 8]]
    prob = click_probabilities(world, requests, items)
    for row in range(4):
        for slot in range(4):
            if items[row, slot] < 0:
                assert prob[row, slot] == 0.0
                continue
            truth = world.click_probability(requests.users[row], items[row, slot], requests.hours[row],
                                            requests.devices[row], slot, 3)
            assert prob[row, slot] == pytest.approx(float(truth))
    with pytest.raises(ValueError, match="does not have"):
        click_probabilities(world, requests, np.full((4, 4), world.n_items))


def test_clicks_are_bernoulli_draws_of_those_probabilities(world):
    requests = draw_requests(world, 20000, 3, np.random.default_rng(3))
    items = np.random.default_rng(4).integers(0, world.n_items, (len(requests), 10))
    prob = click_probabilities(world, requests, items)
    clicks = draw_clicks(prob, np.random.default_rng(5))
    assert np.array_equal(clicks, draw_clicks(prob, np.random.default_rng(5)))
    # The realized click rate per slot follows the truth (within 4 standard errors).
    se = np.sqrt(prob.mean(0) * (1 - prob.mean(0)) / len(requests))
    assert (np.abs(clicks.mean(0) - prob.mean(0)) < 4 * se).all()
    # The top slot is clicked more than the last: the position effect comes through.
    assert clicks[:, 0].mean() > clicks[:, 9].mean()
    assert not draw_clicks(np.zeros((3, 3)), np.random.default_rng(0)).any()


def test_events_echo_the_response_and_carry_the_logs_context(world):
    requests = draw_requests(world, 2, 3, np.random.default_rng(6))
    responses = [{"request_id": f"r{i}", "assignments": {"exp": "a"}, "model_version": "retrieval:1,ranker:2",
                  "items": [{"item_id": 10 + i}, {"item_id": 20 + i}]} for i in range(2)]
    items = shown_items(responses, 3)
    clicks = np.array([[False, True, False], [False, False, False]])
    events = build_events(requests, responses, items, clicks)
    assert [(e["type"], e["request_id"], e["item_id"], e["position"]) for e in events] == [
        ("impression", "r0", 10, 0), ("impression", "r0", 20, 1), ("click", "r0", 20, 1),
        ("impression", "r1", 11, 0), ("impression", "r1", 21, 1)]
    first = events[0]
    assert first["user_id"] == int(requests.users[0]) and first["assignments"] == {"exp": "a"}
    assert first["model_version"] == "retrieval:1,ranker:2"
    assert first["context"] == {"hour": int(requests.hours[0]), "device": DEVICES[requests.devices[0]]}
    assert first["timestamp"] == int(requests.timestamps[0])
    assert events[2]["timestamp"] == events[1]["timestamp"] + CLICK_DELAY_S
    assert events[1]["timestamp"] == events[0]["timestamp"] + SCROLL_S
