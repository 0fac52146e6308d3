"""The one internal representation every loader produces.

A loader reads some on-disk format and returns a `RawDataset`: item titles keyed by the raw
item id (a string, as written in the source) plus EITHER per-user interaction events (the
preprocessing applies filters and a leave-one-out split) OR splits given by the source files
("rows" data, where each row is already history + next item). Raw ids stay strings here;
contiguous integer ids are assigned later by `delrec.data.preprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


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
class RawDataset:
    source: str
    titles: dict[str, str]
    events: list[Event] | None = None
    splits: dict[str, list[RowInstance]] | None = None
    title_origin: str = ""
    notes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if (self.events is None) == (self.splits is None):
            raise ValueError("a RawDataset holds either events or given splits, not both or neither")

    @property
    def protocol(self) -> str:
        return "leave-one-out" if self.events is not None else "given"
