"""The one internal representation every loader produces.

A loader reads some on-disk format and returns a `RawDataset`: item titles keyed by the raw
item id (a string, as written in the source) plus EITHER per-user interaction events as columns
(`EventColumns`; the preprocessing applies filters and a leave-one-out split) OR splits given by the source files
("rows" data, where each row is already history + next item). Raw ids stay strings here;
contiguous integer ids are assigned later by `delrec.data.preprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np


class Event(NamedTuple):
    """One interaction. `order` is the position in the source file: the stable tie-break."""

    user: str
    item: str
    timestamp: float
    rating: float | None
    order: int


class RowInstance(NamedTuple):
    """One given instance: history (oldest first) and the next item; `origin` locates it for errors."""

    history: list[str]
    target: str
    origin: str


@dataclass
class EventColumns:
    """Interactions in file order (the stable tie-break of equal timestamps): int32 codes into `user_ids` /
    `item_ids`, float64 timestamps and, when the source has them, float64 ratings (NaN: a row without) - 16 to 24
    bytes an interaction, against about 650 for `Event` objects, so 100M interactions fit in memory."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray | None
    user_ids: list[str]
    item_ids: list[str]

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> "EventColumns":
        """Columns of Python `Event`s (the line-by-line readers, the synthetic generator)."""
        users: dict[str, int] = {}
        items: dict[str, int] = {}
        user_codes, item_codes, times, ratings = [], [], [], []
        for event in events:
            user_codes.append(users.setdefault(event.user, len(users)))
            item_codes.append(items.setdefault(event.item, len(items)))
            times.append(event.timestamp)
            ratings.append(np.nan if event.rating is None else event.rating)
        rated = any(not np.isnan(r) for r in ratings)
        return cls(
            np.asarray(user_codes, dtype=np.int32), np.asarray(item_codes, dtype=np.int32),
            np.asarray(times, dtype=np.float64), np.asarray(ratings, dtype=np.float64) if rated else None,
            list(users), list(items),
        )

    def to_events(self) -> list[Event]:
        """The rows as `Event`s (`order` = file position): for tests and small data."""
        ratings = [None] * len(self) if self.rating is None else [None if np.isnan(r) else r for r in self.rating.tolist()]
        return [
            Event(self.user_ids[u], self.item_ids[i], t, r, order)
            for order, (u, i, t, r) in enumerate(zip(self.user.tolist(), self.item.tolist(), self.timestamp.tolist(),
                                                      ratings))
        ]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.user, self.item, self.timestamp, self.rating) if a is not None)


@dataclass
class RawDataset:
    source: str
    titles: dict[str, str]
    events: EventColumns | None = None
    splits: dict[str, list[RowInstance]] | None = None
    title_origin: str = ""
    notes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if (self.events is None) == (self.splits is None):
            raise ValueError("a RawDataset holds either events or given splits, not both or neither")

    @property
    def protocol(self) -> str:
        return "leave-one-out" if self.events is not None else "given"
