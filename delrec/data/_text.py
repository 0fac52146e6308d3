"""Reading helpers shared by the loaders, so every format reports bad input the same way.

Files are decoded explicitly (a bad byte is reported with its line), lines are split into a
checked number of fields, and values are converted with errors that name file, line and field.
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

from delrec.errors import DelrecError, where

# An integer, optionally written as an integral float ("16713.0"), as pandas often does.
_INTEGRAL = re.compile(r"-?[0-9]+(?:\.0*)?")
_SEPARATOR_NAMES = {"\t": "tab", ",": "comma"}


def dataset_folder(path: str | PathLike, expected: str) -> Path:
    """The dataset's folder: `path` itself, or the folder holding the file `path` names."""
    path = Path(path)
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    raise DelrecError(f"{path}: not found; expected {expected}")


def read_text(path: Path, expected: str, encoding: str = "utf-8") -> str:
    """The whole file as text; missing, empty or non-UTF-8 files are errors naming file and line.

    `encoding="detect"` (for releases distributed in Latin-1 but often re-saved as UTF-8): UTF-8 when the
    bytes are valid UTF-8, else Latin-1. Latin-1 text with accents is practically never valid UTF-8.
    """
    if not path.is_file():
        raise DelrecError(f"{path}: file not found; expected {expected}")
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
        header = [name.strip().lower() for name in next(reader)]
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


def normalize_id(text: str) -> str:
    """A raw id as written, except that integral floats lose their fraction ("16713.0" -> "16713")."""
    text = text.strip()
    if "." in text and _INTEGRAL.fullmatch(text):
        return text.split(".")[0]
    return text


def parse_id(text: str, path: Path, number: int, field: str) -> str:
    """A normalised, non-empty raw id."""
    value = normalize_id(text)
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
    if isinstance(value, str) and _INTEGRAL.fullmatch(value.strip()):
        return int(value.strip().split(".")[0])
    return None


def parse_float(text: str, path: Path, number: int, field: str) -> float:
    """A finite number (timestamps and ratings must sort and compare)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DelrecError(f"{where(path, number, field)}: expected a number, found '{text.strip()}'")
    return value
