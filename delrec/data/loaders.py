"""The registry of dataset formats: one name per loader, each returning a `RawDataset`."""

from __future__ import annotations

from os import PathLike

from delrec.data.generic_csv import load_csv
from delrec.data.movielens import load_movielens
from delrec.data.raw import RawDataset
from delrec.data.recbole import load_recbole
from delrec.data.rows import load_rows
from delrec.errors import DelrecError

FORMATS = ("recbole", "rows", "movielens", "csv")


def load_raw(
    fmt: str,
    path: str | PathLike,
    *,
    pad_id: int | None = None,
    title_columns: str | None = None,
    move_article: bool = True,
) -> RawDataset:
    """Read the dataset at `path` (a folder, or for most formats one of its files) in format `fmt`.

    `pad_id` and `title_columns` only mean something for rows data; given with another format
    they are refused rather than silently ignored.
    """
    if fmt not in FORMATS:
        raise DelrecError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if fmt != "rows" and (pad_id is not None or title_columns is not None):
        raise DelrecError(f"pad_id and title_columns apply to the rows format only, not to '{fmt}'")
    if fmt == "rows":
        return load_rows(path, pad_id=pad_id, title_columns=title_columns)
    if fmt == "movielens":
        return load_movielens(path, move_article=move_article)
    if fmt == "recbole":
        return load_recbole(path)
    return load_csv(path)
