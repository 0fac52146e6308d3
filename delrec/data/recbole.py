"""RecBole atomic files: `NAME.item` (titles) and a `.inter` file of interactions.

Headers carry typed names (`user_id:token`); columns are matched by the part before ':'. An
`.inter` file holds either one interaction per row (user_id, item_id, timestamp[, rating]) or one
whole sequence per user (user_id, item_id_list, item_id), as LLMRank ships its data; the latter
become events whose timestamp is the position in the sequence.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Iterator

from delrec.data._text import (
    check_header,
    column_index,
    dataset_folder,
    numbered_lines,
    parse_id,
    read_text,
    split_fields,
)
from delrec.data.arrow_reader import scan_events
from delrec.data.generic_csv import read_events
from delrec.data.raw import Event, EventColumns, RawDataset
from delrec.data.titles import TitleTable
from delrec.errors import DelrecError, where

TITLE_FIELDS = ("title", "movie_title", "name")
SEQUENCE_FIELD = "item_id_list"
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp", "rating")
_EXPECTED = "a folder of RecBole atomic files (NAME.inter and NAME.item)"


def load_recbole(path: str | PathLike) -> RawDataset:
    folder = dataset_folder(path, _EXPECTED)
    titles = _read_items(_item_file(folder))
    events = _read_interactions(_inter_file(folder), titles)
    return RawDataset(source=str(folder), titles=titles.titles, events=events, title_origin=str(titles.path))


def _header(line: str, path: Path, number: int) -> list[str]:
    """The column names without their types; `item_id:token` and `item_id:float` name one column twice."""
    names = [name.split(":", 1)[0].strip() for name in line.split("\t")]
    check_header(names, path, number)
    return names


def _item_file(folder: Path) -> Path:
    found = sorted(folder.glob("*.item"))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise DelrecError(f"{folder}: expected one .item file with item titles, found {listed}")
    return found[0]


def _inter_file(folder: Path) -> Path:
    """The one .inter file; beside `.valid`/`.train` files, the `.test` one holding whole sequences."""
    found = sorted(folder.glob("*.inter"))
    if len(found) == 1:
        return found[0]
    tests = [p for p in found if p.name.endswith(".test.inter")]
    others_are_splits = all(p.name.endswith((".valid.inter", ".train.inter")) for p in found if p not in tests)
    if len(tests) == 1 and others_are_splits:  # its header is checked when read: a typo is named there
        return tests[0]
    listed = ", ".join(p.name for p in found) or "none"
    raise DelrecError(
        f"{folder}: expected one .inter file, or one *.test.inter with whole sequences ({SEQUENCE_FIELD}) "
        f"beside its .valid/.train files; found {listed}"
    )


def _read_items(path: Path) -> TitleTable:
    lines = numbered_lines(read_text(path, "a header line item_id:token<TAB>title:token_seq"))
    number, first = next(lines)
    header = _header(first, path, number)
    title_field = next((name for name in TITLE_FIELDS if name in header), TITLE_FIELDS[0])
    column_index(header, path, number, ("item_id", title_field))
    table = TitleTable(path)
    for number, row in _rows(path, header, lines):
        table.add(parse_id(row["item_id"], path, number, "item_id"), row[title_field], number)
    return table


def _read_interactions(path: Path, titles: TitleTable) -> EventColumns:
    scanned = _scan(path, titles)
    if scanned is not None:
        return scanned
    lines = numbered_lines(read_text(path, "a header line user_id:token<TAB>item_id:token<TAB>..."))
    number, first = next(lines)
    header = _header(first, path, number)
    if SEQUENCE_FIELD in header or path.name.endswith(".test.inter"):  # split files hold whole sequences
        column_index(header, path, number, ("user_id", SEQUENCE_FIELD, "item_id"))
        return EventColumns.from_events(_sequence_events(path, _rows(path, header, lines), titles))
    column_index(header, path, number, ("user_id", "item_id", "timestamp"))
    return EventColumns.from_events(read_events(path, _rows(path, header, lines), titles, INTERACTION_FIELDS))


def _scan(path: Path, titles: TitleTable) -> EventColumns | None:
    """The Arrow reader's columns (`delrec.data.arrow_reader`) when the first line is a clean header, else None."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline().rstrip("\r\n")
    try:
        header = _header(first, path, 1)
    except DelrecError:
        return None
    sequence = SEQUENCE_FIELD in header or path.name.endswith(".test.inter")
    fields = ("user_id", SEQUENCE_FIELD, "item_id") if sequence else INTERACTION_FIELDS
    if not set(fields[:3]) <= set(header):
        return None
    columns = [header.index(name) for name in fields if name in header]
    return scan_events(path, delimiter="\t", width=len(header), columns=columns, names=fields,
                       titles=titles.titles, skip_rows=1, sequence=sequence)


def _rows(path: Path, header: list[str], lines) -> Iterator[tuple[int, dict[str, str]]]:
    count = 0
    for number, line in lines:
        count += 1
        yield number, dict(zip(header, split_fields(line, "\t", header, path, number)))
    if not count:
        raise DelrecError(f"{path}: no rows after the header; expected tab-separated {', '.join(header)}")


def _sequence_events(path: Path, rows, titles: TitleTable) -> list[Event]:
    """One row per user: item_id_list (oldest first) then item_id; timestamps are positions."""
    events: list[Event] = []
    first_row_of: dict[str, int] = {}
    for number, row in rows:
        user = parse_id(row["user_id"], path, number, "user_id")
        if user in first_row_of:
            raise DelrecError(
                f"{where(path, number)}: user '{user}' already has a sequence at line {first_row_of[user]}; "
                f"expected one row per user"
            )
        first_row_of[user] = number
        items = [parse_id(token, path, number, SEQUENCE_FIELD) for token in row[SEQUENCE_FIELD].split(" ") if token]
        items.append(parse_id(row["item_id"], path, number, "item_id"))
        for position, item in enumerate(items):
            field = SEQUENCE_FIELD if position < len(items) - 1 else "item_id"
            titles.require(item, path, number, field)
            events.append(Event(user, item, float(position), None, len(events)))
    return events
