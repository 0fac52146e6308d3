"""A generic CSV pair for data of any origin: `interactions.csv` and `items.csv`.

`interactions.csv` has a header naming user, item, timestamp and optionally rating (any order,
extra columns ignored); `items.csv` names item and title. Read with the csv module, so quoted
titles may hold commas. `read_events` also serves the other table-shaped formats.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Iterable

from delrec.data._text import check_header, csv_records, dataset_folder, parse_float, parse_id
from delrec.data.arrow_reader import scan_events
from delrec.data.raw import Event, EventColumns, RawDataset
from delrec.data.titles import TitleTable
from delrec.errors import DelrecError

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.csv"
COLUMNS = ("user", "item", "timestamp", "rating")


def load_csv(path: str | PathLike) -> RawDataset:
    folder = dataset_folder(path, f"a folder with {INTERACTIONS_FILE} and {ITEMS_FILE}")
    items_path = folder / ITEMS_FILE
    titles = TitleTable(items_path)
    for number, row in csv_records(items_path, ("item", "title")):
        titles.add(parse_id(row["item"], items_path, number, "item"), row["title"], number)
    inter_path = folder / INTERACTIONS_FILE
    events = _scan(inter_path, titles)
    if events is None:
        events = EventColumns.from_events(read_events(inter_path, csv_records(inter_path, COLUMNS[:3], COLUMNS[3:]),
                                                      titles))
    return RawDataset(source=str(folder), titles=titles.titles, events=events, title_origin=str(items_path))


def _scan(path: Path, titles: TitleTable) -> EventColumns | None:
    """The Arrow reader's columns (`delrec.data.arrow_reader`) when the header line is clean, else None."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        written = [name.strip() for name in handle.readline().rstrip("\r\n").split(",")]
    header = [name.lower() for name in written]
    try:
        check_header(written, path, 1)
    except DelrecError:
        return None
    if not set(COLUMNS[:3]) <= set(header):
        return None
    columns = [header.index(name) for name in COLUMNS if name in header]
    return scan_events(path, delimiter=",", width=len(header), columns=columns, names=COLUMNS, titles=titles.titles,
                       skip_rows=1)


def read_events(
    path: Path, records: Iterable[tuple[int, dict[str, str]]], titles: TitleTable, columns: tuple[str, ...] = COLUMNS
) -> list[Event]:
    """Events from (line, row) records; `columns` names user, item, timestamp and rating (optional
    per row: absent means no rating). Every item must have a title."""
    user_column, item_column, time_column, rating_column = columns
    events: list[Event] = []
    for number, row in records:
        item = parse_id(row[item_column], path, number, item_column)
        titles.require(item, path, number, item_column)
        rating = row.get(rating_column)
        events.append(
            Event(
                parse_id(row[user_column], path, number, user_column),
                item,
                parse_float(row[time_column], path, number, time_column),
                None if rating is None else parse_float(rating, path, number, rating_column),
                len(events),
            )
        )
    return events
