"""From a `RawDataset` to contiguous ids, splits and fixed candidate sets.

Per-user data: ratings threshold -> chronological order (stable tie-break on file order) ->
k-core -> drop users with too few interactions (counted) -> leave-one-out (train target = third
to last item, valid = second to last, test = last). Rows data keeps the split of its files.
Histories are truncated to the most recent `max_history` items; candidate sets are sampled
against the FULL known history, so a candidate is never an item the user already had.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from delrec.config import SEED, at_least, check_fields
from delrec.data.dataset import CANDIDATE_SPLITS, SPLITS, Instance
from delrec.data.raw import Event, RawDataset
from delrec.errors import DelrecError


@dataclass
class PreprocessConfig:
    num_candidates: int = field(
        default=20, metadata={"help": "Size C of the fixed candidate sets (target + C-1 sampled items).",
                              "range": at_least(2)}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the candidate sampling.", "range": SEED})
    max_history: int = field(
        default=50, metadata={"help": "Keep at most this many most recent history items.", "range": at_least(1)}
    )
    min_rating: float | None = field(
        default=None, metadata={"help": "Drop interactions rated below this (per-user data with ratings)."}
    )
    kcore: int = field(
        default=0, metadata={"help": "Repeatedly drop users and items with fewer interactions than this (0: off).",
                             "range": at_least(0, text="0 (off) or a positive count of interactions")}
    )
    min_user_interactions: int = field(
        default=3, metadata={"help": "Drop (and count) users with fewer interactions; leave-one-out needs 3 (train, "
                             "valid and test each need one item).", "range": at_least(3)}
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class Processed:
    """A dataset ready to be written: titles by new id, instances per split, candidates."""

    raw_ids: list[str]
    titles: list[str]
    splits: dict[str, list[Instance]]
    candidates: dict[str, list[list[int]]]
    counts: dict


def _id_order(raw_ids) -> list[str]:
    """Integer-like ids sort numerically (so 0..N-1 stay as they were), others as strings."""
    raw_ids = list(raw_ids)
    if all(r.lstrip("-").isdigit() for r in raw_ids):
        return sorted(raw_ids, key=int)
    return sorted(raw_ids)


def _user_sequences(raw: RawDataset, config: PreprocessConfig, dropped: Counter) -> dict[str, list[Event]]:
    events = raw.events
    if config.min_rating is not None:
        if all(e.rating is None for e in events):
            raise DelrecError(f"{raw.source}: --min-rating was given but the data has no ratings")
        kept = [e for e in events if e.rating is not None and e.rating >= config.min_rating]
        dropped["interactions_below_min_rating"] = len(events) - len(kept)
        events = kept
    by_user: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_user[event.user].append(event)
    for seq in by_user.values():
        seq.sort(key=lambda e: (e.timestamp, e.order))
    if config.kcore > 0:
        by_user = _kcore(by_user, config.kcore, dropped)
    short = [u for u, seq in by_user.items() if len(seq) < config.min_user_interactions]
    for user in short:
        del by_user[user]
    dropped[f"users_with_fewer_than_{config.min_user_interactions}_interactions"] = len(short)
    if not by_user:
        raise DelrecError(f"{raw.source}: no user has {config.min_user_interactions} or more interactions after filtering")
    return by_user


def _kcore(by_user: dict[str, list[Event]], k: int, dropped: Counter) -> dict[str, list[Event]]:
    users_before = len(by_user)
    items_before = len({e.item for seq in by_user.values() for e in seq})
    while True:
        item_count = Counter(e.item for seq in by_user.values() for e in seq)
        filtered = {}
        for user, seq in by_user.items():
            seq = [e for e in seq if item_count[e.item] >= k]
            if len(seq) >= k:
                filtered[user] = seq
        if sum(map(len, filtered.values())) == sum(map(len, by_user.values())):
            break
        by_user = filtered
    dropped["users_removed_by_kcore"] = users_before - len(by_user)
    dropped["items_removed_by_kcore"] = items_before - len({e.item for seq in by_user.values() for e in seq})
    return by_user


def _check_titles(raw: RawDataset, used: set[str]) -> None:
    missing = sorted(used - raw.titles.keys())
    if missing:
        raise DelrecError(
            f"{raw.title_origin or raw.source}: item '{missing[0]}' is used in the interactions but has no title "
            f"({len(missing)} such items); add titles for them"
        )


def sample_candidates(
    target: int, exclude: set[int], num_items: int, size: int, rng: np.random.Generator
) -> list[int]:
    """Target + size-1 distinct items drawn uniformly from the items not excluded, shuffled."""
    available = num_items - len(exclude | {target})
    if available < size - 1:
        raise DelrecError(
            f"cannot sample {size - 1} negatives: only {available} items are outside this history; "
            f"lower --num-candidates"
        )
    chosen: list[int] = []
    taken = exclude | {target}
    while len(chosen) < size - 1:
        for item in rng.integers(0, num_items, size=2 * (size - len(chosen))).tolist():
            if item not in taken:
                taken.add(item)
                chosen.append(item)
                if len(chosen) == size - 1:
                    break
    chosen.insert(int(rng.integers(0, size)), target)
    return chosen


def preprocess(raw: RawDataset, config: PreprocessConfig) -> Processed:
    dropped: Counter = Counter()
    if raw.events is not None:
        sequences = _user_sequences(raw, config, dropped)
        used = {e.item for seq in sequences.values() for e in seq}
    else:
        sequences = None
        used = set(raw.titles)
        for rows in raw.splits.values():
            for row in rows:
                used.update(row.history)
                used.add(row.target)
    _check_titles(raw, used)
    raw_ids = _id_order(used)
    if config.num_candidates > len(raw_ids):
        raise DelrecError(
            f"--num-candidates {config.num_candidates} is larger than the catalogue ({len(raw_ids)} items)"
        )
    new_id = {r: i for i, r in enumerate(raw_ids)}
    splits: dict[str, list[Instance]] = {s: [] for s in SPLITS}
    full_history: dict[str, list[set[int]]] = {s: [] for s in SPLITS}
    cut = config.max_history

    def add(split: str, history: list[int], target: int, user: str | None) -> None:
        splits[split].append(Instance(len(splits[split]), tuple(history[-cut:]), target, user))
        full_history[split].append(set(history))

    if sequences is not None:
        for user in _id_order(sequences):
            items = [new_id[e.item] for e in sequences[user]]
            for offset, split in zip((3, 2, 1), SPLITS):
                add(split, items[:-offset], items[-offset], user)
    else:
        for split in SPLITS:
            for row in raw.splits.get(split, []):
                add(split, [new_id[h] for h in row.history], new_id[row.target], None)
        for split in SPLITS:
            if not splits[split]:
                raise DelrecError(f"{raw.source}: the {split} split is empty; rows data needs train, valid and test files")

    candidates = {}
    for split_index, split in enumerate(CANDIDATE_SPLITS):
        lists = []
        for inst, seen in zip(splits[split], full_history[split]):
            rng = np.random.default_rng([config.seed, split_index, inst.id])
            try:
                lists.append(sample_candidates(inst.target, seen, len(raw_ids), config.num_candidates, rng))
            except DelrecError as exc:
                raise DelrecError(f"{split} instance {inst.id}: {exc}") from None
        candidates[split] = lists

    counts = _counts(splits, len(raw_ids), sequences, dropped)
    counts["notes"] = dict(raw.notes)
    return Processed(raw_ids, [raw.titles[r] for r in raw_ids], splits, candidates, counts)


def _counts(splits, num_items, sequences, dropped) -> dict:
    if sequences is not None:
        users = len(sequences)
        interactions = sum(map(len, sequences.values()))
    else:
        users, interactions = _maximal_sequences(splits)
    lengths = [len(inst.history) for split in SPLITS for inst in splits[split]]
    return {
        "users": users,
        "items": num_items,
        "instances": {s: len(splits[s]) for s in SPLITS},
        "interactions": interactions,
        "history_length": {"mean": round(float(np.mean(lengths)), 3), "max": int(max(lengths))},
        "density": round(interactions / (users * num_items), 6),
        "dropped": dict(dropped),
    }


def _maximal_sequences(splits) -> tuple[int, int]:
    """Rows data has no user ids. Count as users the sequences (history + next) that no other
    row of the same split continues (as a longer prefix or, for files that keep only the last
    L items, as the next sliding window); exact for LLaRA's and DLLM2Rec's files. Each row is
    one observed next-item event, so interactions = rows."""
    users = 0
    for split in SPLITS:
        histories = {inst.history for inst in splits[split]}
        window = max((len(h) for h in histories), default=0)
        for inst in splits[split]:
            full = inst.history + (inst.target,)
            if full not in histories and full[-window:] not in histories:
                users += 1
    return users, sum(len(splits[s]) for s in SPLITS)
