"""Item titles: one table that every loader fills, and the id -> title text files of rows data.

`TitleTable` enforces the rules all formats share (no empty title, no control character but a tab,
one title per item, every used item has a title) and remembers where each title came from, so
errors name both lines. Titles are kept as written but for the blanks around them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from delrec.data._text import as_int, numbered_lines, printable, read_text, split_fields
from delrec.errors import DelrecError, where

TITLE_COLUMNS = ("id,title", "title,id")
_TITLE_FILE_SUFFIXES = (".txt", ".tsv")


class TitleTable:
    """Titles keyed by raw item id, read from the file `path`."""

    def __init__(self, path: Path):
        self.path = path
        self.titles: dict[str, str] = {}
        self._lines: dict[str, int] = {}

    def add(self, item: str, title: str, line: int) -> None:
        title = printable(title, self.path, line, "title", allow_tab=True).strip()
        if not title:
            raise DelrecError(f"{where(self.path, line, 'title')}: empty title for item '{item}'; expected a name")
        known = self.titles.get(item)
        if known is None:
            self.titles[item] = title
            self._lines[item] = line
        elif known != title:
            raise DelrecError(
                f"{where(self.path, line)}: item '{item}' is titled '{title}' here but '{known}' at line "
                f"{self._lines[item]}; expected one title per item"
            )

    def require(self, item: str, path: Path, line: int, field: str) -> None:
        """Refuse an item that the interactions use (at `path:line`) but the title file does not name."""
        if item not in self.titles:
            raise DelrecError(f"{where(path, line, field)}: item '{item}' has no title in {self.path}; add it there")


def find_titles_file(folder: Path, skip_stems: Iterable[str]) -> Path:
    """`id2name.txt` (a folder of that name is refused when read), else the one .txt/.tsv file whose stem is
    not in `skip_stems` (split files)."""
    preferred = folder / "id2name.txt"
    if preferred.exists():
        return preferred
    skip = {stem.lower() for stem in skip_stems}
    found = [
        p for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in _TITLE_FILE_SUFFIXES and p.stem.lower() not in skip
    ]
    if len(found) != 1:
        listed = f"found {', '.join(p.name for p in found)}" if found else "found none"
        raise DelrecError(
            f"{folder}: expected one titles file (id2name.txt, or a single .txt/.tsv of id and title), {listed}"
        )
    return found[0]


def read_titles_file(path: Path, title_columns: str | None = None) -> TitleTable:
    """Read `id::title` lines or two tab-separated columns in either order, with an optional header.

    The id column is the one holding only integers; when both do (e.g. titles that are years),
    `title_columns` ("id,title" or "title,id") must say which is which.
    """
    order = _title_order(title_columns)
    lines = list(numbered_lines(read_text(path, "lines of 'id::title' or 'id<TAB>title'")))
    first = lines[0][1]
    sep = "\t" if "\t" in first else "::" if "::" in first else None
    if sep is None:
        raise DelrecError(f"{where(path, lines[0][0])}: expected 'id::title' or two tab-separated columns")
    names = ("title", "id") if order == "title,id" else ("id", "title")
    rows = []
    for number, line in lines:
        first_value, second_value = split_fields(line, sep, names, path, number, rest=sep == "::")
        rows.append((number, first_value.strip(), second_value.strip()))
    if all(as_int(value) is None for value in rows[0][1:]):
        rows = rows[1:]  # a header such as "id<TAB>title"
    if not rows:
        raise DelrecError(f"{path}: only a header line; expected lines of id and title")
    if order is None:
        order = _detect_order(rows, path)
    id_column = 1 if order == "id,title" else 2
    table = TitleTable(path)
    for row in rows:
        item = as_int(row[id_column])
        if item is None:
            raise DelrecError(f"{where(path, row[0], 'id')}: expected an integer item id, found '{row[id_column]}'")
        table.add(str(item), row[3 - id_column], row[0])
    return table


def _title_order(title_columns: str | None) -> str | None:
    if title_columns is None:
        return None
    order = "".join(title_columns.split()).lower()
    if order not in TITLE_COLUMNS:
        raise DelrecError(f"title_columns must be 'id,title' or 'title,id', got '{title_columns}'")
    return order


def _detect_order(rows: list[tuple[int, str, str]], path: Path) -> str:
    not_int = [[row[0] for row in rows if as_int(row[col]) is None] for col in (1, 2)]
    if not not_int[0] and not not_int[1]:
        raise DelrecError(
            f"{path}: both columns hold only integers, so the id column is ambiguous; "
            f"pass title_columns 'id,title' or 'title,id'"
        )
    if not_int[0] and not_int[1]:
        # Point at the first non-integer of the column that is nearly all integers: the likely typo.
        col = 0 if len(not_int[0]) <= len(not_int[1]) else 1
        line = not_int[col][0]
        value = next(row[col + 1] for row in rows if row[0] == line)
        raise DelrecError(
            f"{where(path, line)}: expected an integer item id in one column, found '{value}'; "
            f"neither column holds only integer ids"
        )
    return "title,id" if not_int[0] else "id,title"
