"""Reading helpers shared by the loaders, so every format reports bad input the same way.

Files are decoded explicitly (a bad byte is reported with its line), lines are split into a
checked number of fields, and values are converted with errors that name file, line and field.

Ids, titles and numbers must be printable text: a control character (U+0000-U+001F, U+007F) in one is
refused, never kept or dropped. A NUL inside an id would make a second, invisible user or item (and
lose its interactions to the filters); in a title it would go into every prompt. Only the blanks
around a value (spaces, tabs, line ends) are trimmed, and a title may hold a tab, which reads as a
space; a line break is refused even there, since each title is one line of a prompt's list.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Sequence

from delrec.config import excerpt
from delrec.errors import DelrecError, where
from delrec.io import loads_json

# An integer, optionally written as an integral float ("16713.0"), as pandas often does.
_INTEGRAL = re.compile(r"-?[0-9]+(?:\.0*)?")
_SEPARATOR_NAMES = {"\t": "tab", ",": "comma"}
BLANKS = " \t\r\n"  # what may surround a value (str.strip() would also drop control characters U+001C-U+001F)
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_CONTROL_BUT_TAB = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_NAMES = {0x00: "NUL", 0x09: "tab", 0x0A: "line feed", 0x0D: "carriage return", 0x1B: "escape", 0x7F: "delete"}


def dataset_folder(path: str | PathLike, expected: str) -> Path:
    """The dataset's folder: `path` itself, or the folder holding the file `path` names."""
    path = Path(path)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    raise DelrecError(f"{path}: not found; expected {expected}")


def require_file(path: Path, expected: str) -> None:
    """Refuse a path that is not a regular file, saying what is there instead (a folder, a pipe, nothing)."""
    if path.is_file():
        return
    if path.is_dir():
        raise DelrecError(f"{path}: is a folder, expected a file holding {expected}")
    if path.exists():
        raise DelrecError(f"{path}: is not a regular file (a pipe, socket or device); expected a file holding "
                          f"{expected}")
    raise DelrecError(f"{path}: file not found; expected {expected}")


def read_text(path: Path, expected: str, encoding: str = "utf-8") -> str:
    """The whole file as text; missing, empty or non-UTF-8 files are errors naming file and line.

    `encoding="detect"` (for releases distributed in Latin-1 but often re-saved as UTF-8): UTF-8 when the
    bytes are valid UTF-8, else Latin-1. Latin-1 text with accents is practically never valid UTF-8.
    """
    require_file(path, expected)
    data = path.read_bytes()
    if encoding == "detect":
        encoding = "utf-8" if _is_utf8(data) else "latin-1"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DelrecError(
            f"{where(path, line)}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DelrecError(f"{path}: file is empty; expected {expected}")
    return text


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line; Windows line endings are accepted."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def jsonl_records(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line of a JSON-lines file. A key given twice in one object is
    refused (plain JSON readers keep the last one without a word; delrec refuses duplicate YAML keys too);
    every problem gets the message of every JSON file delrec reads (`delrec.io.loads_json`)."""
    for number, line in numbered_lines(read_text(path, expected)):
        record = loads_json(line, path, number, unique_keys=True)
        if not isinstance(record, dict):
            raise DelrecError(f"{where(path, number)}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def split_fields(
    line: str, sep: str, names: Sequence[str], path: Path, number: int, rest: bool = False
) -> list[str]:
    """Split a line into exactly `len(names)` fields; with `rest`, the last field takes the remainder."""
    fields = line.split(sep, len(names) - 1 if rest else -1)
    if len(fields) != len(names):
        kind = _SEPARATOR_NAMES.get(sep, f"'{sep}'")
        raise DelrecError(
            f"{where(path, number)}: expected {len(names)} {kind}-separated fields ({', '.join(names)}), "
            f"found {len(fields)}"
        )
    return fields


def check_header(names: Sequence[str], path: Path, number: int) -> None:
    """Refuse a header naming a column twice, ignoring case: only one of the two would be read. Unnamed
    columns (a trailing comma, a pandas index) are never read, so any number of them may be there."""
    first: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        printable(name, path, number, f"column {position}")
        earlier = first.setdefault(name.lower(), position) if name else position
        if earlier != position:
            raise DelrecError(
                f"{where(path, number)}: column {position} {excerpt(name, 60)} repeats column {earlier} "
                f"{excerpt(names[earlier - 1], 60)} (names are matched ignoring case); expected each column once: "
                "rename or remove one"
            )


def column_index(
    header: Sequence[str], path: Path, number: int, required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, int]:
    """Map column names to positions; a missing required column is an error listing what was found."""
    for name in required:
        if name not in header:
            close = difflib.get_close_matches(name, [h for h in header if h not in required], n=1)
            hint = f"; is '{close[0]}' a typo of it?" if close else ""
            raise DelrecError(
                f"{where(path, number)}: missing column '{name}'; expected columns {', '.join(required)} "
                f"(found {', '.join(header)}){hint}"
            )
    return {name: header.index(name) for name in (*required, *optional) if name in header}


def csv_records(
    path: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) per data row of a CSV file with a header (names matched
    case-insensitively; extra columns ignored). Quoted values may hold commas and newlines."""
    text = read_text(path, f"a CSV header with columns {', '.join(required)}")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1  # the line the current row starts on: a quoted field may span lines
    try:
        written = [name.strip() for name in next(reader)]
        check_header(written, path, reader.line_num)
        header = [name.lower() for name in written]
        index = column_index(header, path, reader.line_num, required, optional)
        count = 0
        start = reader.line_num + 1
        for row in reader:
            end = reader.line_num
            if any(value.strip() for value in row):
                if len(row) != len(header):
                    spans = (f" (this row runs on to line {end}: a quote opened on line {start} may be unclosed)"
                             if end > start else "")
                    raise DelrecError(f"{where(path, start)}: expected {len(header)} comma-separated fields as in "
                                      f"the header, found {len(row)}{spans}")
                count += 1
                yield start, {name: row[i] for name, i in index.items()}
            start = end + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise DelrecError(f"{where(path, start)}: a quote (\") opened in the row on this line is never closed; "
                              "close it, or double a quote that is part of a value (\"\")") from None
        raise DelrecError(f"{where(path, start)}: malformed CSV ({exc})") from None
    if not count:
        raise DelrecError(f"{path}: no rows after the header; expected rows of {', '.join(required)}")


def printable(text: str, path: Path, number: int, field: str, allow_tab: bool = False) -> str:
    """`text` without the blanks around it; a control character in it is refused (see the module)."""
    value = text.strip(BLANKS)
    if value.isprintable():  # nearly always, and fast; else a space other than ' ' or a control character
        return value
    found = (_CONTROL_BUT_TAB if allow_tab else _CONTROL).search(value)
    if found is not None:
        code = ord(found.group())
        name = _CONTROL_NAMES.get(code)
        raise DelrecError(
            f"{where(path, number, field)}: control character U+{code:04X}{f' ({name})' if name else ''} at "
            f"character {found.start() + 1} of {excerpt(value, 60)}; expected printable text (remove it, or "
            "fix the export that wrote it)"
        )
    return value


def normalize_id(text: str) -> str:
    """A raw id as written, except that integral floats lose their fraction ("16713.0" -> "16713")."""
    text = text.strip()
    if "." in text and _INTEGRAL.fullmatch(text):
        return text.split(".")[0]
    return text


def parse_id(text: str, path: Path, number: int, field: str) -> str:
    """A normalised, non-empty raw id of printable characters."""
    value = normalize_id(printable(text, path, number, field))
    if not value:
        raise DelrecError(f"{where(path, number, field)}: empty id; expected a user or item id")
    return value


def as_int(value: Any) -> int | None:
    """An int from an int, an integral float or text like "12" / "12.0"; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INTEGRAL.fullmatch(value.strip(BLANKS)):
        try:
            return int(value.strip(BLANKS).split(".")[0])
        except ValueError:  # more digits than Python converts: no id is that long
            return None
    return None


def parse_float(text: str, path: Path, number: int, field: str) -> float:
    """A finite number (timestamps and ratings must sort and compare)."""
    text = printable(text, path, number, field)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DelrecError(f"{where(path, number, field)}: expected a number, found {excerpt(text)}")
    return value
