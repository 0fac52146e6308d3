"""The Arrow reader of interaction files: straight into `EventColumns`, without a Python object per row.

`scan_events` reads a delimited interaction file with pyarrow's streaming CSV reader, block by block:
each block's user and item strings are dictionary-encoded and only the distinct values go through
Python, where `parse_id` - the very rule of the line-by-line readers - normalises and checks them, so
both readers give one id the same meaning. It returns None as soon as a file is not provably clean
(a field Arrow cannot parse, a wrong field count, an id `parse_id` refuses, a number that is not
finite, an item without a title, quotes in a CSV): the caller then reads the file line by line, which
names the first bad line exactly as before. The fast reader never reports an error itself, so every
one-line error keeps its one implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from delrec.data._text import parse_id
from delrec.data.raw import EventColumns
from delrec.errors import DelrecError

BLOCK_BYTES = 16 << 20  # Arrow reads and converts this much text at a time


class _Codes:
    """Raw id -> int32 code, growing block by block; ids are checked and normalised once per distinct value."""

    def __init__(self, path: Path, field: str, known: Mapping[str, str] | None = None):
        self.path, self.field, self.known = path, field, known
        self.codes: dict[str, int] = {}
        self.ids: list[str] = []
        self._seen: dict[str, int] = {}  # as written -> code (written forms differ: "7" and "7.0")

    def encode(self, column) -> np.ndarray | None:
        """Codes of an Arrow string column; None if a value is not an id the line-by-line reader accepts."""
        import pyarrow.compute as pc

        encoded = pc.dictionary_encode(column)
        mapping = np.empty(len(encoded.dictionary), dtype=np.int32)
        for position, written in enumerate(encoded.dictionary.to_pylist()):
            code = self._seen.get(written)
            if code is None:
                code = self._code(written)
                if code is None:
                    return None
                self._seen[written] = code
            mapping[position] = code
        return mapping[encoded.indices.to_numpy(zero_copy_only=False)]

    def _code(self, written: str) -> int | None:
        try:
            raw = parse_id(written, self.path, 0, self.field)
        except DelrecError:
            return None
        if self.known is not None and raw not in self.known:
            return None
        code = self.codes.get(raw)
        if code is None:
            code = self.codes[raw] = len(self.ids)
            self.ids.append(raw)
        return code


def _finite(column) -> np.ndarray | None:
    values = column.to_numpy(zero_copy_only=False) if column.null_count == 0 else None
    if values is None or not np.isfinite(values).all():
        return None
    return np.ascontiguousarray(values, dtype=np.float64)


def scan_events(
    path: Path,
    *,
    delimiter: str,
    width: int,
    columns: Sequence[int],
    names: Sequence[str],
    titles: Mapping[str, str],
    skip_rows: int = 0,
    sequence: bool = False,
    empty: Iterable[int] = (),
) -> EventColumns | None:
    """Read an interaction file in Arrow blocks; None when it must go to the line-by-line reader.

    Every row has `width` fields; `columns` are the positions of user, item, timestamp and (optionally) rating among
    them, `names` their field names (for the id rules). With `sequence`, the columns are user, item list (space-separated,
    oldest first) and the last item, one row per user, and timestamps are positions (RecBole's split files).
    `skip_rows` skips a header the caller has already checked; fields at the positions `empty` must be empty (a
    two-character separator read as one character).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pv

    if not _plain_text(path, quotes=delimiter == ","):
        return None
    try:
        reader = pv.open_csv(
            path,
            read_options=pv.ReadOptions(skip_rows=skip_rows, block_size=BLOCK_BYTES,
                                        column_names=[f"f{i}" for i in range(width)]),
            parse_options=pv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pv.ConvertOptions(
                column_types={f"f{c}": pa.string() if sequence or k < 2 else pa.float64() for k, c in enumerate(columns)}
                | {f"f{c}": pa.string() for c in empty},
                null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False,
                include_columns=[f"f{c}" for c in (*columns, *empty)],
            ),
        )
    except (pa.ArrowException, OSError):
        return None
    users = _Codes(path, names[0])
    items = _Codes(path, names[1], titles)
    parts: list[tuple] = []
    rated = len(columns) > 3
    empty = [f"f{c}" for c in empty]
    try:
        for batch in reader:
            fields = [batch.column(f"f{c}") for c in columns]
            if any(pc.max(pc.binary_length(batch.column(name))).as_py() for name in empty):
                return None
            if sequence:
                part = _sequence_block(fields, users, items)
            else:
                part = (users.encode(fields[0]), items.encode(fields[1]), _finite(fields[2]),
                        _finite(fields[3]) if rated else np.empty(0))
            if part is None or any(p is None for p in part):
                return None
            parts.append(part)
    except (pa.ArrowException, OSError):
        return None
    if not sum(len(p[0]) for p in parts):
        return None
    if sequence and len(np.unique(np.concatenate([p[4] for p in parts]))) != sum(len(p[4]) for p in parts):
        return None  # a user with two rows: the line-by-line reader names both lines
    return EventColumns(
        *(np.concatenate([p[k] for p in parts]) for k in range(3)),
        np.concatenate([p[3] for p in parts]) if rated else None,
        users.ids, items.ids,
    )


def _sequence_block(fields, users: _Codes, items: _Codes):
    """One block of whole-sequence rows -> (user, item, position, [], row users) in the reader's event order."""
    import pyarrow.compute as pc

    rows = len(fields[0])
    row_users = users.encode(fields[0])
    tokens = pc.split_pattern(fields[1], " ")
    flat = pc.list_flatten(tokens)
    kept = pc.not_equal(flat, "")  # "a  b" has an empty token, which the line-by-line reader skips
    history_codes = items.encode(pc.filter(flat, kept))
    last = items.encode(fields[2])
    if row_users is None or history_codes is None or last is None:
        return None
    row_of_token = np.repeat(np.arange(rows), pc.list_value_length(tokens).to_numpy(zero_copy_only=False))
    row_of_token = row_of_token[kept.to_numpy(zero_copy_only=False)]
    lengths = np.bincount(row_of_token, minlength=rows) + 1
    ends = np.cumsum(lengths)
    starts = ends - lengths
    item = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    last_slots = ends - 1
    history_slots = np.ones(len(item), dtype=bool)
    history_slots[last_slots] = False
    item[history_slots] = history_codes
    item[last_slots] = last
    position = (np.arange(len(item)) - np.repeat(starts, lengths)).astype(np.float64)
    return np.repeat(row_users, lengths), item, position, np.empty(0), row_users


def _plain_text(path: Path, quotes: bool) -> bool:
    """No byte-order mark, no carriage return but in a line end, and (for CSV) no quote: the line-by-line readers
    strip a BOM and split lines on line feeds only, and quoting rules differ in corner cases between Arrow and the
    csv module, so such files take the line-by-line reader."""
    with open(path, "rb") as handle:
        if handle.read(3) == b"\xef\xbb\xbf":
            return False
        handle.seek(0)
        while chunk := handle.read(BLOCK_BYTES):
            if (quotes and b'"' in chunk) or chunk.count(b"\r") != chunk.count(b"\r\n"):
                return False
    return True
