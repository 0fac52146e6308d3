from collections import defaultdict

import numpy as np
import pytest
import torch

from delrec.data.synthetic import make_synthetic, synthetic_world
from delrec.metrics import full_ranking_metrics


def sequences(raw):
    """Per user, the item indices (raw id "i{k}" -> k) in time order."""
    by_user = defaultdict(list)
    for event in sorted(raw.events.to_events(), key=lambda e: (e.timestamp, e.order)):
        by_user[event.user].append(int(event.item[1:]))
    return by_user


def test_same_seed_same_dataset_other_seed_differs():
    a, b = make_synthetic(num_users=50, seed=3), make_synthetic(num_users=50, seed=3)
    assert a.events.to_events() == b.events.to_events() and a.titles == b.titles
    c = make_synthetic(num_users=50, seed=4)
    assert c.events.to_events() != a.events.to_events() and c.titles != a.titles


def test_titles_unique_readable_and_cover_items():
    for num_items in (200, 5000):
        raw = make_synthetic(num_users=30, num_items=num_items, seed=1)
        titles = list(raw.titles.values())
        assert set(raw.titles) == {f"i{k}" for k in range(num_items)}
        assert len(set(titles)) == num_items
        assert all(t and t == t.strip() and t.replace(" ", "").replace(":", "").replace("'", "").isalpha()
                   for t in titles)
    assert {e.item for e in raw.events.to_events()} <= raw.titles.keys()


def test_events_shape():
    raw = make_synthetic(num_users=120, min_length=6, max_length=30, seed=2)
    assert raw.protocol == "leave-one-out"
    assert [e.order for e in raw.events.to_events()] == list(range(len(raw.events.to_events())))
    assert all(e.rating is None for e in raw.events.to_events())
    by_user = defaultdict(list)
    for event in raw.events.to_events():
        by_user[event.user].append(event)
    assert set(by_user) == {f"u{u}" for u in range(120)}
    for events in by_user.values():
        assert 6 <= len(events) <= 30
        times = [e.timestamp for e in events]
        assert all(a < b for a, b in zip(times, times[1:]))
        assert len({e.item for e in events}) == len(events)  # users never repeat an item


def test_world_matches_dataset_and_follow_prob():
    world = synthetic_world(200, seed=5)
    assert world.num_items == 200
    assert sorted(np.concatenate(world.franchises).tolist()) == list(range(200))
    assert np.isclose(world.popularity.sum(), 1.0)
    assert make_synthetic(num_users=5, seed=5).titles == {f"i{k}": t for k, t in enumerate(world.titles)}
    edges = {(a, b) for a in range(200) for b in world.successors[a].tolist() if b >= 0}

    def edge_share(follow_prob):
        seqs = sequences(make_synthetic(num_users=200, seed=5, follow_prob=follow_prob)).values()
        pairs = [pair for seq in seqs for pair in zip(seq, seq[1:])]
        return np.mean([pair in edges for pair in pairs])

    assert edge_share(1.0) > 0.95
    assert edge_share(0.0) < 0.1


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_length"):
        make_synthetic(num_items=10, max_length=11)
    with pytest.raises(ValueError, match="min_length"):
        make_synthetic(min_length=8, max_length=7)
    with pytest.raises(ValueError, match="follow_prob"):
        make_synthetic(follow_prob=1.5)


def test_transitions_beat_popularity_on_leave_one_out():
    raw = make_synthetic(seed=0)
    num_items = len(raw.titles)
    seqs = list(sequences(raw).values())
    histories = [seq[:-1] for seq in seqs]
    targets = torch.tensor([seq[-1] for seq in seqs])

    transitions = np.zeros((num_items, num_items))
    popularity = np.zeros(num_items)
    for history in histories:
        np.add.at(transitions, (history[:-1], history[1:]), 1.0)
        np.add.at(popularity, history, 1.0)
    last = [history[-1] for history in histories]
    transition_scores = torch.from_numpy(transitions[last])
    popularity_scores = torch.from_numpy(np.tile(popularity, (len(seqs), 1)))

    markov = full_ranking_metrics(transition_scores, targets, histories)
    popular = full_ranking_metrics(popularity_scores, targets, histories)
    assert markov["hr@10"] >= 2 * popular["hr@10"]
    assert markov["hr@10"] > 0.5
