"""From a `RawDataset` to contiguous ids, splits and fixed candidate sets.

Per-user data: ratings threshold -> chronological order (stable tie-break on file order) ->
k-core -> drop users with too few interactions (counted) -> leave-one-out (train target = third
to last item, valid = second to last, test = last). Rows data keeps the split of its files.
Histories are truncated to the most recent `max_history` items; candidate sets are sampled
against the FULL known history, so a candidate is never an item the user already had.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from delrec.config import SEED, at_least, check_fields
from delrec.data.dataset import CANDIDATE_SPLITS, SPLITS, Instance
from delrec.data.raw import RawDataset
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
class UserSequences:
    """Every kept user's items (new ids), oldest first, users in id order: user u's are
    `items[offsets[u]:offsets[u + 1]]`. Columns, so that 100M interactions fit in memory."""

    users: list[str]
    items: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Processed:
    """A dataset ready to be written: titles by new id, and either per-user sequences (split by leave-one-out as
    they are written) or the instances of given splits. Splits and candidates are generated, not held."""

    raw_ids: list[str]
    titles: list[str]
    config: PreprocessConfig
    counts: dict
    sequences: UserSequences | None = None
    given: dict[str, list[Instance]] | None = None
    given_history: dict[str, list[list[int]]] = field(default_factory=dict)

    def rows(self, split: str) -> Iterator[tuple[Instance, list[int]]]:
        """(instance, the FULL history it was cut from) in id order: candidates avoid the full history."""
        cut = self.config.max_history
        if self.given is not None:
            for inst in self.given[split]:
                yield inst, self.given_history[split][inst.id]
            return
        offset = LEAVE_ONE_OUT[split]
        items, offsets, users = self.sequences.items, self.sequences.offsets.tolist(), self.sequences.users
        for index, user in enumerate(users):
            seq = items[offsets[index]:offsets[index + 1] - offset + 1].tolist()
            history = seq[:-1]
            yield Instance(index, tuple(history[-cut:]), seq[-1], user), history

    def instances(self, split: str) -> Iterator[Instance]:
        return (inst for inst, _ in self.rows(split))

    def candidates(self, split: str) -> Iterator[list[int]]:
        """The fixed candidate set of each instance: seeded by (seed, split, instance id), so it does not depend on
        the other instances or on the order they are drawn in."""
        split_index = CANDIDATE_SPLITS.index(split)
        for inst, history in self.rows(split):
            rng = keyed_rng(self.config.seed, split_index, inst.id)
            try:
                yield sample_candidates(inst.target, history, len(self.raw_ids), self.config.num_candidates, rng)
            except DelrecError as exc:
                raise DelrecError(f"{split} instance {inst.id}: {exc}") from None


# The leave-one-out target of each split, counted from the end of a user's sequence.
LEAVE_ONE_OUT = {"train": 3, "valid": 2, "test": 1}


def _id_order(raw_ids) -> list[str]:
    """Integer-like ids sort numerically (so 0..N-1 stay as they were), others as strings."""
    raw_ids = list(raw_ids)
    if all(r.lstrip("-").isdigit() for r in raw_ids):
        return sorted(raw_ids, key=int)
    return sorted(raw_ids)


def _ranks(codes: np.ndarray, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """For the distinct `codes` used: each code's position in `_id_order` of their ids (-1 for unused codes), and
    the ordered ids."""
    used = np.unique(codes).tolist()
    ordered = _id_order(ids[c] for c in used)
    position = {raw: rank for rank, raw in enumerate(ordered)}
    rank_of = np.full(len(ids), -1, dtype=np.int32)
    rank_of[used] = [position[ids[c]] for c in used]
    return rank_of, ordered


def _filter_events(raw: RawDataset, config: PreprocessConfig, dropped: Counter) -> tuple[np.ndarray, ...]:
    """Rating threshold, k-core and the minimum sequence length: the kept events' (user, item, timestamp) codes in
    file order."""
    events = raw.events
    user, item, timestamp = events.user, events.item, events.timestamp
    if config.min_rating is not None:
        if events.rating is None:
            raise DelrecError(f"{raw.source}: --min-rating was given but the data has no ratings")
        kept = events.rating >= config.min_rating  # NaN (no rating) is never kept
        dropped["interactions_below_min_rating"] = int(len(kept) - kept.sum())
        user, item, timestamp = user[kept], item[kept], timestamp[kept]
    num_users, num_items = len(events.user_ids), len(events.item_ids)
    if config.kcore > 0:
        users_before = int(np.count_nonzero(np.bincount(user, minlength=num_users)))
        items_before = int(np.count_nonzero(np.bincount(item, minlength=num_items)))
        kept = _kcore(user, item, config.kcore, num_users, num_items)
        user, item, timestamp = user[kept], item[kept], timestamp[kept]
        dropped["users_removed_by_kcore"] = users_before - int(np.count_nonzero(np.bincount(user, minlength=num_users)))
        dropped["items_removed_by_kcore"] = items_before - int(np.count_nonzero(np.bincount(item, minlength=num_items)))
    per_user = np.bincount(user, minlength=num_users)
    short = (per_user > 0) & (per_user < config.min_user_interactions)
    dropped[f"users_with_fewer_than_{config.min_user_interactions}_interactions"] = int(short.sum())
    if short.any():
        kept = ~short[user]
        user, item, timestamp = user[kept], item[kept], timestamp[kept]
    if not len(user):
        raise DelrecError(f"{raw.source}: no user has {config.min_user_interactions} or more interactions after filtering")
    return user, item, timestamp


def _kcore(user: np.ndarray, item: np.ndarray, k: int, num_users: int, num_items: int) -> np.ndarray:
    """Which events survive repeatedly dropping items with fewer than k events, then users with fewer than k."""
    kept = np.ones(len(user), dtype=bool)
    total = len(user)
    while True:
        survives = kept & (np.bincount(item[kept], minlength=num_items) >= k)[item]
        survives &= (np.bincount(user[survives], minlength=num_users) >= k)[user]
        remaining = int(survives.sum())
        if remaining == total:
            return kept
        kept, total = survives, remaining


def _sequences(raw: RawDataset, config: PreprocessConfig, dropped: Counter) -> tuple[UserSequences, list[str]]:
    """Kept users' sequences in chronological order (stable on file order) under new item ids, and the raw item ids
    in new-id order."""
    user, item, timestamp = _filter_events(raw, config, dropped)
    item_rank, raw_ids = _ranks(item, raw.events.item_ids)
    _check_titles(raw, set(raw_ids))
    user_rank, users = _ranks(user, raw.events.user_ids)
    user = user_rank[user]
    order = np.lexsort((timestamp, user))  # stable: equal timestamps keep file order
    del timestamp
    items = item_rank[item[order]]
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=len(users)), out=offsets[1:])
    return UserSequences(users, items, offsets), raw_ids


def _check_titles(raw: RawDataset, used: set[str]) -> None:
    missing = sorted(used - raw.titles.keys())
    if missing:
        raise DelrecError(
            f"{raw.title_origin or raw.source}: item '{missing[0]}' is used in the interactions but has no title "
            f"({len(missing)} such items); add titles for them"
        )


def keyed_rng(*key: int) -> np.random.Generator:
    """`np.random.default_rng(list(key))` at a third of its cost (the cost of preparing millions of users): SeedSequence
    reads a list of non-negative ints below 2**32 as the same uint32 words an array of them gives, so the stream is
    the same."""
    entropy = np.array(key, dtype=np.uint32) if 0 <= min(key) and max(key) < 2**32 else list(key)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def sample_candidates(
    target: int, exclude: Iterable[int], num_items: int, size: int, rng: np.random.Generator
) -> list[int]:
    """Target + size-1 distinct items drawn uniformly from the items not excluded, shuffled."""
    taken = set(exclude)
    taken.add(target)
    available = num_items - len(taken)
    if available < size - 1:
        raise DelrecError(
            f"cannot sample {size - 1} negatives: only {available} items are outside this history; "
            f"lower --num-candidates"
        )
    chosen: list[int] = []
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
        sequences, raw_ids = _sequences(raw, config, dropped)
    else:
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
    titles = [raw.titles[r] for r in raw_ids]
    if raw.events is not None:
        counts = _sequence_counts(sequences, len(raw_ids), config.max_history, dropped)
        processed = Processed(raw_ids, titles, config, counts, sequences=sequences)
    else:
        processed = _given(raw, raw_ids, titles, config, dropped)
    processed.counts["notes"] = dict(raw.notes)
    return processed


def _given(raw: RawDataset, raw_ids: list[str], titles: list[str], config: PreprocessConfig, dropped) -> Processed:
    """Rows data: the instances of the files' splits, histories cut to `max_history`."""
    new_id = {r: i for i, r in enumerate(raw_ids)}
    given: dict[str, list[Instance]] = {}
    full: dict[str, list[list[int]]] = {}
    for split in SPLITS:
        given[split], full[split] = [], []
        for row in raw.splits.get(split, []):
            history = [new_id[h] for h in row.history]
            given[split].append(Instance(len(given[split]), tuple(history[-config.max_history:]), new_id[row.target]))
            full[split].append(history)
        if not given[split]:
            raise DelrecError(f"{raw.source}: the {split} split is empty; rows data needs train, valid and test files")
    users, interactions = _maximal_sequences(given)
    lengths = [len(inst.history) for split in SPLITS for inst in given[split]]
    counts = _counts(users, len(raw_ids), {s: len(given[s]) for s in SPLITS}, interactions, lengths, dropped)
    return Processed(raw_ids, titles, config, counts, given=given, given_history=full)


def _sequence_counts(sequences: UserSequences, num_items: int, cut: int, dropped) -> dict:
    per_user = sequences.lengths()
    lengths = np.concatenate([np.minimum(per_user - LEAVE_ONE_OUT[s], cut) for s in SPLITS])
    instances = {s: len(sequences) for s in SPLITS}
    return _counts(len(sequences), num_items, instances, len(sequences.items), lengths, dropped)


def _counts(users: int, num_items: int, instances: dict, interactions: int, lengths, dropped) -> dict:
    return {
        "users": users,
        "items": num_items,
        "instances": instances,
        "interactions": interactions,
        "history_length": {"mean": round(float(np.mean(lengths)), 3), "max": int(np.max(lengths))},
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
