"""The sequential world: seeded, exactly as many events as asked, and its structure is really there."""

from __future__ import annotations

import numpy as np

from recforge.config import GenerateConfig
from recforge.synthetic.sequences import FOLLOW, SUCCESSORS, generate_sequences

CFG = GenerateConfig(world="sequential", users=300, items=200, events=20_000, days=5, categories=8, seed=3)


def test_the_log_is_seeded_sorted_and_exactly_as_long_as_asked():
    a, b = generate_sequences(CFG), generate_sequences(CFG)
    assert a.equals(b) and a.num_rows == CFG.events
    times = a.column("timestamp").to_numpy()
    assert np.all(np.diff(times) >= 0)
    assert a.column_names == ["user_id", "item_id", "timestamp", "category"]
    assert not generate_sequences(CFG.model_copy(update={"seed": 4})).equals(a)


def test_each_users_next_item_is_mostly_one_of_a_few_successors():
    table = generate_sequences(CFG)
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    times = table.column("timestamp").to_numpy()
    order = np.lexsort((times, users))
    users, items, times = users[order], items[order], times[order]
    same_session = (users[1:] == users[:-1]) & (times[1:] - times[:-1] < 600)
    pairs = np.stack([items[:-1][same_session], items[1:][same_session]], axis=1)
    # How concentrated each item's next items are: the top SUCCESSORS next items of an item cover most
    # of what follows it (about FOLLOW), where a sequence without structure would spread over the catalog.
    covered, total = 0, 0
    for item in np.unique(pairs[:, 0]):
        following = pairs[pairs[:, 0] == item, 1]
        if len(following) < 20:
            continue
        counts = np.sort(np.bincount(following))[::-1]
        covered += counts[:SUCCESSORS].sum()
        total += len(following)
    assert total > 2000 and covered / total > FOLLOW * 0.8
    categories = table.column("category").to_numpy()[order]
    assert np.mean(categories[1:][same_session] == categories[:-1][same_session]) > 0.7  # sessions keep an intent
