"""Raw MovieLens releases: Latin-1 text as distributed, or UTF-8 where a file was re-saved (detected).

ml-100k: `u.data` (user TAB item TAB rating TAB timestamp) and `u.item` (id|title|...).
ml-1m: `ratings.dat` (user::item::rating::timestamp) and `movies.dat` (id::title::genres).
Titles like "Shawshank Redemption, The (1994)" read better for a language model with the
article in front, so by default they become "The Shawshank Redemption (1994)".
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path
from typing import NamedTuple

from delrec.data._text import dataset_folder, numbered_lines, parse_id, printable, read_text, split_fields
from delrec.data.arrow_reader import scan_events
from delrec.data.generic_csv import read_events
from delrec.data.raw import EventColumns, RawDataset
from delrec.data.titles import TitleTable
from delrec.errors import DelrecError

RATING_FIELDS = ("user", "item", "rating", "timestamp")
ENCODING = "detect"  # Latin-1 as distributed; UTF-8 when re-saved so (mojibake otherwise)
# "Name, The (alternate title) (1994)": the article may be followed by parenthesised parts only.
_TRAILING_ARTICLE = re.compile(r"(?P<name>.+?), (?P<article>The|A|An)(?P<rest>(?: \(.*\))?)")


class _Release(NamedTuple):
    ratings: str
    ratings_sep: str
    items: str
    items_sep: str
    item_fields: tuple[str, ...]


RELEASES = (
    _Release("u.data", "\t", "u.item", "|", ("movie id", "title", "release date|url|genres")),  # ml-100k
    _Release("ratings.dat", "::", "movies.dat", "::", ("movie id", "title", "genres")),  # ml-1m
)


def load_movielens(path: str | PathLike, move_article: bool = True) -> RawDataset:
    expected = "a MovieLens folder with u.data and u.item (ml-100k) or ratings.dat and movies.dat (ml-1m)"
    folder = dataset_folder(path, expected)
    present = [r for r in RELEASES if (folder / r.ratings).exists() or (folder / r.items).exists()]
    if len(present) != 1:
        found = "files of both" if present else "neither set of files"
        raise DelrecError(f"{folder}: found {found}; expected {expected}")
    release = present[0]
    titles = _read_titles(folder / release.items, release, move_article)
    events = _read_ratings(folder / release.ratings, release.ratings_sep, titles)
    return RawDataset(source=str(folder), titles=titles.titles, events=events, title_origin=str(titles.path))


def move_trailing_article(title: str) -> str:
    """"Shawshank Redemption, The (1994)" -> "The Shawshank Redemption (1994)" (also A, An)."""
    match = _TRAILING_ARTICLE.fullmatch(title)
    if match is None:
        return title
    return f"{match['article']} {match['name']}{match['rest']}"


def _read_titles(path: Path, release: _Release, move_article: bool) -> TitleTable:
    table = TitleTable(path)
    text = read_text(path, f"lines of {release.items_sep.join(release.item_fields)}", ENCODING)
    for number, line in numbered_lines(text):
        item, title, _ = split_fields(line, release.items_sep, release.item_fields, path, number, rest=True)
        title = printable(title, path, number, "title", allow_tab=True).strip()  # checked before it is moved
        if move_article:
            title = move_trailing_article(title)
        table.add(parse_id(item, path, number, "movie id"), title, number)
    return table


def _read_ratings(path: Path, sep: str, titles: TitleTable) -> EventColumns:
    if path.is_file():  # "::" is read as ':' with every second field empty: Arrow splits on one character
        step = len(sep)
        scanned = scan_events(path, delimiter=sep[0], width=3 * step + 1, columns=[0, step, 3 * step, 2 * step],
                              names=RATING_FIELDS, titles=titles.titles, empty=range(1, 3 * step, 2) if step > 1 else ())
        if scanned is not None:
            return scanned
    text = read_text(path, f"lines of {sep.join(RATING_FIELDS)}", ENCODING)
    records = (
        (number, dict(zip(RATING_FIELDS, split_fields(line, sep, RATING_FIELDS, path, number))))
        for number, line in numbered_lines(text)
    )
    return EventColumns.from_events(read_events(path, records, titles))
