"""A synthetic dataset with planted sequential structure and generated titles.

Why: it needs no download, builds in milliseconds, and we KNOW what a good sequential
recommender must learn from it, so pipeline and model bugs show up as missing lift over
popularity instead of as a vague number on real data.

Generator (everything follows from `seed`; numpy only):

- Catalogue: the items, in a random order, are cut into franchises of 1-5 installments (a game
  series, an artist's albums). Each franchise gets a unique name from word lists ("Crimson
  Voyage", "The Silent Harbor"; "... of Emberfall" once two-word names run short); later
  installments carry a sequel number ("Crimson Voyage III") and some items an edition subtitle
  (": Deluxe Edition"). Titles are unique, so a title identifies its item, and the structure is
  readable in the text: a language model can learn that "X II" follows "X".
- Successors: every item has a primary successor, the next installment (after a franchise's
  last one: the first installment of the next franchise in a random cycle of franchises), and
  half of the items also a secondary successor drawn uniformly from the other items.
- Popularity: Zipf, weight 1 / rank**popularity_exponent over a random order of the items.
- Users: a length uniform on min_length..max_length; the first item is drawn by popularity;
  each later step follows a successor of the current item with probability `follow_prob`
  (uniformly among the successors the user has not seen), otherwise, or when no unseen
  successor is left, jumps to an unseen item drawn by popularity. Users never repeat an item,
  as in ratings data, so `max_length <= num_items`.
- Timestamps: a start within 2020, then gaps of at least a minute (about a day on average):
  strictly increasing per user.

Hence a first-order transition model beats popularity by a wide margin, more so as
`follow_prob` grows. Ids are strings: users "u0".., items "i0".. where item "i{k}" is index k
of `SyntheticWorld`, the ground truth that `synthetic_world(num_items, seed)` rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delrec.data.raw import Event, EventColumns, RawDataset

ADJECTIVES = (
    "Crimson", "Silent", "Hollow", "Golden", "Broken", "Frozen", "Hidden", "Distant", "Burning",
    "Silver", "Emerald", "Forgotten", "Iron", "Wandering", "Midnight", "Scarlet", "Endless",
    "Quiet", "Shattered", "Velvet", "Ancient", "Radiant", "Lonely", "Wild", "Crystal", "Northern",
    "Sunken", "Electric", "Pale", "Restless", "Sacred", "Twisted", "Amber", "Obsidian", "Gentle",
    "Savage", "Lost", "Eternal", "Painted", "Stormy", "Secret", "Azure", "Faded", "Bitter",
    "Luminous", "Copper", "Wicked", "Last",
)
NOUNS = (
    "Voyage", "Harbor", "Kingdom", "Garden", "Frontier", "Empire", "Lantern", "River", "Citadel",
    "Horizon", "Orchard", "Tide", "Forest", "Crown", "Machine", "Signal", "Valley", "Archive",
    "Mirror", "Compass", "Engine", "Legacy", "Echo", "Meadow", "Storm", "Throne", "Island",
    "Canyon", "Cathedral", "Circus", "Desert", "Lighthouse", "Labyrinth", "Odyssey", "Parade",
    "Requiem", "Sanctuary", "Summit", "Symphony", "Tower", "Village", "Wanderer", "Bridge",
    "Carnival", "Outpost", "Railway", "Chronicle", "Dawn",
)
PLACES = (
    "Emberfall", "Northwind", "Ashford", "Stonehaven", "Silverlake", "Ravenmoor", "Eastmarch",
    "Duskwood", "Highcliff", "Mistvale", "Brightwater", "Thornbury", "Greywater", "Oakheart",
    "Sunspire", "Frostholm", "Redmere", "Windmere", "Blackwater", "Goldcrest", "Starfall",
    "Moonbrook", "Ironvale", "Deepwell",
)
EDITIONS = (
    ": Deluxe Edition", ": Remastered", ": Director's Cut", ": Collector's Edition",
    ": Special Edition", ": Anniversary Edition",
)
SEQUEL_SUFFIXES = ("", " II", " III", " IV", " V")  # one per installment: franchises hold 1-5 items
EDITION_SHARE = 0.15
SECOND_SUCCESSOR_SHARE = 0.5
START_2020 = 1_577_836_800.0  # 2020-01-01T00:00:00Z
_REJECTION_ROUNDS = 8
MAX_ITEMS = len(ADJECTIVES) * len(NOUNS) * (1 + len(PLACES))
"""The most items the title generator can always name: one franchise name each (57,600)."""
MAX_USERS = 1_000_000
"""The most users: one million take ~4 GB and a minute to generate, far beyond a demo or a test."""


@dataclass(frozen=True)
class SyntheticWorld:
    """The planted ground truth; arrays are indexed by item index k (raw id "i{k}")."""

    titles: list[str]
    franchises: list[np.ndarray]  # item indices of each franchise, in installment order
    successors: np.ndarray  # int64 [N, 2]: primary successor, secondary one or -1
    popularity: np.ndarray  # float64 [N], sums to 1

    @property
    def num_items(self) -> int:
        return len(self.titles)


def _seeds(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent streams for the world and the users, so the world is rebuilt from the seed alone."""
    world, users = np.random.SeedSequence(seed).spawn(2)
    return world, users


def _franchise_names(count: int, rng: np.random.Generator) -> list[str]:
    two_word = len(ADJECTIVES) * len(NOUNS)
    capacity = two_word * (1 + len(PLACES))
    if count > capacity:
        raise ValueError(f"the title generator has names for at most {capacity} franchises, {count} needed")
    codes = rng.choice(two_word if count <= two_word else capacity, size=count, replace=False)
    names = []
    for code in codes.tolist():
        place, pair = divmod(code, two_word)
        adjective, noun = divmod(pair, len(NOUNS))
        # The article depends on the word pair only, so names stay unique.
        name = f"{'The ' if (adjective + noun) % 3 == 0 else ''}{ADJECTIVES[adjective]} {NOUNS[noun]}"
        names.append(name + (f" of {PLACES[place - 1]}" if place else ""))
    return names


def synthetic_world(num_items: int = 200, seed: int = 0, popularity_exponent: float = 1.0) -> SyntheticWorld:
    """The catalogue, successor structure and popularity that `make_synthetic` uses for this seed."""
    if not 2 <= num_items <= MAX_ITEMS:  # checked before any array of num_items is allocated
        raise ValueError(f"num_items must be between 2 and {MAX_ITEMS} (the titles the generator can always "
                         f"name), got {num_items}")
    rng = np.random.default_rng(_seeds(seed)[0])
    order = rng.permutation(num_items)
    sizes = rng.integers(1, len(SEQUEL_SUFFIXES) + 1, size=num_items)
    ends = np.cumsum(sizes)
    ends = np.append(ends[ends < num_items], num_items)
    starts = np.concatenate([[0], ends[:-1]])
    franchises = [order[s:e] for s, e in zip(starts, ends)]

    successors = np.full((num_items, 2), -1, dtype=np.int64)
    successors[order[:-1], 0] = order[1:]  # the next installment within a franchise...
    cycle = rng.permutation(len(franchises))
    next_franchise = np.empty_like(cycle)
    next_franchise[cycle] = np.roll(cycle, -1)
    successors[order[ends - 1], 0] = order[starts[next_franchise]]  # ...or the next franchise's first
    has_second = np.flatnonzero(rng.random(num_items) < SECOND_SUCCESSOR_SHARE)
    second = rng.integers(0, num_items - 1, size=has_second.size)
    second += second >= has_second  # any item but itself
    keep = second != successors[has_second, 0]
    successors[has_second[keep], 1] = second[keep]

    weights = 1.0 / (rng.permutation(num_items) + 1.0) ** popularity_exponent
    popularity = weights / weights.sum()

    names = _franchise_names(len(franchises), rng)
    editions = rng.integers(0, len(EDITIONS), size=num_items)
    with_edition = rng.random(num_items) < EDITION_SHARE
    titles = [""] * num_items
    for name, members in zip(names, franchises):
        for installment, item in enumerate(members.tolist()):
            suffix = EDITIONS[editions[item]] if with_edition[item] else ""
            titles[item] = name + SEQUEL_SUFFIXES[installment] + suffix
    return SyntheticWorld(titles, franchises, successors, popularity)


def _draw_unseen(popularity: np.ndarray, seen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per row of `seen` [R, S], drawn by popularity among the items not in that row.

    Rejection sampling keeps it O(R * S) per round; the rare rows still clashing after a few
    rounds (users who saw most of the popular mass) are drawn exactly from their masked weights.
    """
    cdf = np.cumsum(popularity)
    rows = seen.shape[0]

    def draw(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(cdf) - 1)

    out = draw(rows)
    todo = np.arange(rows)
    for _ in range(_REJECTION_ROUNDS):
        todo = todo[(seen[todo] == out[todo, None]).any(1)]
        if not todo.size:
            return out
        out[todo] = draw(todo.size)
    todo = todo[(seen[todo] == out[todo, None]).any(1)]
    if todo.size:
        weights = np.tile(popularity, (todo.size, 1))
        weights[np.arange(todo.size)[:, None], seen[todo]] = 0.0
        masked_cdf = weights.cumsum(1)
        u = rng.random(todo.size) * masked_cdf[:, -1]
        out[todo] = (masked_cdf <= u[:, None]).sum(1)
    return out


def _walks(world: SyntheticWorld, lengths: np.ndarray, follow_prob: float, rng: np.random.Generator) -> np.ndarray:
    """Item sequences [U, max(lengths)], simulated for all users at once, one step at a time."""
    users = len(lengths)
    seq = np.empty((users, int(lengths.max())), dtype=np.int64)
    seq[:, 0] = _draw_unseen(world.popularity, seq[:, :0], rng)
    every = np.arange(users)
    for step in range(1, seq.shape[1]):
        seen = seq[:, :step]
        succ = world.successors[seq[:, step - 1]]
        unseen = (succ >= 0) & ~(seen[:, :, None] == succ[:, None, :]).any(1)
        # Both open: a fair coin; one open: that one (the column is irrelevant when none is).
        column = np.where(unseen.all(1), rng.random(users) < 0.5, ~unseen[:, 0]).astype(np.int64)
        follow = (rng.random(users) < follow_prob) & unseen.any(1)
        seq[:, step] = succ[every, column]
        jump = np.flatnonzero(~follow)
        seq[jump, step] = _draw_unseen(world.popularity, seen[jump], rng)
    return seq


def make_synthetic(
    num_users: int = 600,
    num_items: int = 200,
    min_length: int = 6,
    max_length: int = 30,
    seed: int = 0,
    follow_prob: float = 0.8,
    popularity_exponent: float = 1.0,
) -> RawDataset:
    """Per-user events (no ratings) and titles of a synthetic dataset; see the module docstring."""
    if not 1 <= num_users <= MAX_USERS:
        raise ValueError(f"num_users must be between 1 and {MAX_USERS}, got {num_users}")
    if not 1 <= min_length <= max_length <= num_items:
        raise ValueError(
            f"need 1 <= min_length <= max_length <= num_items (users never repeat an item), "
            f"got {min_length}, {max_length}, {num_items}"
        )
    if not 0.0 <= follow_prob <= 1.0:
        raise ValueError(f"follow_prob must be in [0, 1], got {follow_prob}")
    world = synthetic_world(num_items, seed, popularity_exponent)
    rng = np.random.default_rng(_seeds(seed)[1])
    lengths = rng.integers(min_length, max_length + 1, size=num_users)
    seq = _walks(world, lengths, follow_prob, rng)
    gaps = np.floor(60.0 + rng.exponential(86_400.0, size=seq.shape))
    starts = np.floor(START_2020 + rng.uniform(0.0, 365 * 86_400.0, size=num_users))
    times = starts[:, None] + np.cumsum(gaps, axis=1) - gaps[:, :1]

    item_ids = [f"i{k}" for k in range(num_items)]
    events = []
    for user in range(num_users):
        user_id = f"u{user}"
        length = int(lengths[user])
        for item, timestamp in zip(seq[user, :length].tolist(), times[user, :length].tolist()):
            events.append(Event(user_id, item_ids[item], timestamp, None, len(events)))
    return RawDataset(
        source=f"synthetic(num_users={num_users}, num_items={num_items}, seed={seed}, follow_prob={follow_prob})",
        titles=dict(zip(item_ids, world.titles)),
        events=EventColumns.from_events(events),
    )
