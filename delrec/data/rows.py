"""Rows data (LLaRA, DLLM2Rec): train/valid/test files whose rows are already history + next item.

Each row has `seq` (item ids, padded to a fixed length), `len_seq` and `next`, as JSON lines or
as a CSV written by pandas (`seq` as the text "[1, 2, 3]", ids possibly as floats "16713.0").
The pad id is the one value found after `len_seq` in every row, unless given. History is the
non-pad part of `seq`: LLaRA's first row per user has len_seq 1 but an all-pad seq, so its
history is empty; such rows are kept and counted in `notes["len_seq_mismatch"]`.
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from delrec.data._text import as_int, csv_records, dataset_folder, jsonl_records, require_file
from delrec.data.raw import RawDataset, RowInstance
from delrec.data.titles import TitleTable, find_titles_file, read_titles_file
from delrec.errors import DelrecError, where

SPLIT_STEMS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".csv")
FIELDS = ("seq", "len_seq", "next")
_LIST_SEPARATORS = re.compile(r"[, \t\r\n]+")  # not \s: it takes U+001C-U+001F for spaces


class _Row(NamedTuple):
    path: Path
    line: int
    seq: list[int]
    len_seq: int
    next: int


def load_rows(path: str | PathLike, pad_id: int | None = None, title_columns: str | None = None) -> RawDataset:
    folder = dataset_folder(path, "a folder with train, valid and test files (.jsonl or .csv) and id2name.txt")
    files = _split_files(folder)
    titles = read_titles_file(find_titles_file(folder, SPLIT_STEMS), title_columns)
    rows = {split: list(_read_rows(file)) for split, file in files.items()}
    if pad_id is None:
        pad_id = _detect_pad(rows, titles)
    splits = {}
    mismatches = 0
    for split, split_rows in rows.items():
        splits[split] = []
        for row in split_rows:
            instance = _instance(row, pad_id, titles)
            mismatches += len(instance.history) != row.len_seq
            splits[split].append(instance)
    return RawDataset(
        source=str(folder),
        titles=titles.titles,
        splits=splits,
        title_origin=str(titles.path),
        notes={"len_seq_mismatch": mismatches},
    )


def _split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        split = SPLIT_STEMS.get(path.stem.lower())
        if split is None or path.suffix.lower() not in SUFFIXES:
            continue
        require_file(path, f"the {split} rows")
        if split in found:
            raise DelrecError(f"{folder}: both {found[split].name} and {path.name} hold the {split} split; keep one")
        found[split] = path
    for split in SPLITS:
        if split not in found:
            raise DelrecError(
                f"{folder}: no {split} file; expected train, valid (or val) and test as .jsonl or .csv files"
            )
    return {split: found[split] for split in SPLITS}


def _read_rows(path: Path) -> Iterator[_Row]:
    """Parse one split file (an empty one is refused where it is read); all ids must be integers."""
    if path.suffix.lower() == ".jsonl":
        records = jsonl_records(path, f"rows with fields {', '.join(FIELDS)}")
    else:
        records = csv_records(path, FIELDS)
    for line, record in records:
        for name in FIELDS:
            if name not in record:
                raise DelrecError(f"{where(path, line)}: missing field '{name}'; expected fields {', '.join(FIELDS)}")
        seq = [_integer(value, path, line, "seq") for value in _seq_values(record["seq"], path, line)]
        len_seq = _integer(record["len_seq"], path, line, "len_seq")
        if len_seq < 0:
            raise DelrecError(f"{where(path, line, 'len_seq')}: expected a length of 0 or more, found {len_seq}")
        yield _Row(path, line, seq, len_seq, _integer(record["next"], path, line, "next"))


def _seq_values(value: Any, path: Path, line: int) -> list[Any]:
    """A JSON list, or the text of a list as pandas writes it ("[1, 2, 3]" or "[1 2 3]")."""
    if isinstance(value, list):
        return value
    text = value.strip() if isinstance(value, str) else ""
    if not (text.startswith("[") and text.endswith("]")):
        raise DelrecError(f"{where(path, line, 'seq')}: expected a list of item ids like [1, 2, 3], found {value!r}")
    return [token for token in _LIST_SEPARATORS.split(text[1:-1]) if token]


def _integer(value: Any, path: Path, line: int, field: str) -> int:
    number = as_int(value)
    if number is None:
        raise DelrecError(f"{where(path, line, field)}: expected an integer, found {value!r}")
    return number


def _detect_pad(rows: dict[str, list[_Row]], titles: TitleTable) -> int | None:
    """The single value filling positions at and after len_seq; None when no row is padded."""
    pad: int | None = None
    first: _Row | None = None
    for split_rows in rows.values():
        for row in split_rows:
            for value in row.seq[row.len_seq:]:
                if pad is None:
                    pad, first = value, row
                elif value != pad:
                    raise DelrecError(
                        f"{where(row.path, row.line, 'seq')}: found {value} after len_seq, but "
                        f"{where(first.path, first.line)} pads with {pad}; expected one pad id (or pass pad_id)"
                    )
    if pad is not None and str(pad) in titles.titles:
        raise DelrecError(
            f"{where(first.path, first.line, 'seq')}: the detected pad id {pad} is an item titled in "
            f"{titles.path}; pass pad_id if it really is padding"
        )
    return pad


def _instance(row: _Row, pad_id: int | None, titles: TitleTable) -> RowInstance:
    if row.next == pad_id:
        raise DelrecError(f"{where(row.path, row.line, 'next')}: the next item is the pad id {pad_id}")
    history = [str(item) for item in row.seq if item != pad_id]
    target = str(row.next)
    for item in history:
        titles.require(item, row.path, row.line, "seq")
    titles.require(target, row.path, row.line, "next")
    return RowInstance(history, target, where(row.path, row.line))
