"""The Arrow reader reads exactly what the line-by-line readers read, and hands every doubtful file over to them.

Each case loads one file twice: as shipped (the Arrow reader where it accepts the file) and with the Arrow reader
switched off (the line-by-line readers alone, which were the whole data layer before). The events must be equal, or
the one-line errors identical; `taken` says which reader produced the result, so a case cannot pass by both
readers silently doing the same slow thing.
"""

from __future__ import annotations

import numpy as np
import pytest

from delrec.data import arrow_reader, generic_csv, movielens, recbole
from delrec.data.loaders import load_raw
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.raw import Event, EventColumns
from delrec.errors import DelrecError

LOADERS = (generic_csv, recbole, movielens)


def load_both(monkeypatch, fmt: str, path) -> tuple[object, object, list[bool]]:
    """(as shipped, line by line only, whether the Arrow reader accepted the file each time it was asked)."""
    taken: list[bool] = []

    def spy(*args, **kwargs):
        result = arrow_reader.scan_events(*args, **kwargs)
        taken.append(result is not None)
        return result

    def outcome():
        try:
            return load_raw(fmt, path).events.to_events()
        except DelrecError as exc:
            return f"error: {exc}"

    for module in LOADERS:
        monkeypatch.setattr(module, "scan_events", spy)
    fast = outcome()
    for module in LOADERS:
        monkeypatch.setattr(module, "scan_events", lambda *args, **kwargs: None)
    slow = outcome()
    return fast, slow, taken


CSV_ITEMS = "item,title\n1,One\n2,Two\n7,Seven\n"


def csv_case(tmp_path, interactions: str | bytes, items: str = CSV_ITEMS):
    (tmp_path / "items.csv").write_text(items)
    path = tmp_path / "interactions.csv"
    path.write_bytes(interactions if isinstance(interactions, bytes) else interactions.encode())
    return "csv", tmp_path


def recbole_case(tmp_path, inter: str, name: str = "d.inter"):
    (tmp_path / "d.item").write_text("item_id:token\ttitle:token_seq\n1\tOne\n2\tTwo\n7\tSeven\n")
    (tmp_path / name).write_text(inter)
    return "recbole", tmp_path


def movielens_case(tmp_path, ratings: str, release: str = "1m"):
    if release == "1m":
        (tmp_path / "movies.dat").write_text("1::One (1999)::Drama\n2::Two (2000)::Drama\n7::Seven (1995)::Crime\n")
        (tmp_path / "ratings.dat").write_text(ratings)
    else:
        (tmp_path / "u.item").write_text("1|One (1999)|x||0\n2|Two (2000)|x||0\n7|Seven (1995)|x||0\n")
        (tmp_path / "u.data").write_text(ratings)
    return "movielens", tmp_path


# Files the Arrow reader reads itself: the same events as the line-by-line readers.
ACCEPTED = {
    "csv": lambda p: csv_case(p, "user,item,timestamp,rating\nu1,2,20,4\nu1,1,10,5\nu2,1,10.5,3.5\n"),
    "csv_reordered_extra_columns": lambda p: csv_case(p, "Rating,extra,TIMESTAMP,Item,User\n4,x,2e1,2,7.0\n5,y,1,7,7\n"),
    "csv_crlf_blank_lines": lambda p: csv_case(p, b"user,item,timestamp\r\nu1,2,20\r\n\r\nu1,1,10\r\n"),
    "csv_integral_float_ids": lambda p: csv_case(p, "user,item,timestamp\n16.0,7.00,3\n16,7,1.25\n-3,1,-2\n"),
    "csv_spaces_around_values": lambda p: csv_case(p, "user,item,timestamp\n u1 , 2 , 20 \n"),
    "recbole_interactions": lambda p: recbole_case(p, "user_id:token\titem_id:token\ttimestamp:float\na\t7\t3\nb\t1\t1\n"),
    "recbole_sequences": lambda p: recbole_case(
        p, "user_id:token\titem_id_list:token_seq\titem_id:token\n5\t1  2 7\t2\n3\t\t1\n9\t7\t7\n", "d.test.inter"),
    "movielens_1m": lambda p: movielens_case(p, "1::2::5::978300760\n1::1::3::978302109\n2::7::4::97830\n"),
    "movielens_100k": lambda p: movielens_case(p, "196\t2\t3\t881250949\n186\t1\t4\t891717742\n", "100k"),
}

# Files the Arrow reader hands over: the line-by-line reader's result (events or its one-line error) stands.
HANDED_OVER = {
    "csv_quotes": lambda p: csv_case(p, 'user,item,timestamp,note\nu1,2,20,"a, b"\nu1,1,10,c\n'),
    "csv_byte_order_mark": lambda p: csv_case(p, "\ufeffuser,item,timestamp\nu1,2,20\n"),
    "csv_lone_carriage_return": lambda p: csv_case(p, b"user,item,timestamp\nu1,2,20\ru2,1,3\n"),
    "csv_bad_timestamp": lambda p: csv_case(p, "user,item,timestamp\nu1,2,20\nu1,1,soon\n"),
    "csv_infinite_timestamp": lambda p: csv_case(p, "user,item,timestamp\nu1,2,inf\n"),
    "csv_nan_rating": lambda p: csv_case(p, "user,item,timestamp,rating\nu1,2,1,nan\n"),
    "csv_empty_rating": lambda p: csv_case(p, "user,item,timestamp,rating\nu1,2,1,\n"),
    "csv_item_without_title": lambda p: csv_case(p, "user,item,timestamp\nu1,2,20\nu1,3,21\n"),
    "csv_empty_id": lambda p: csv_case(p, "user,item,timestamp\n,2,20\n"),
    "csv_control_character_in_id": lambda p: csv_case(p, "user,item,timestamp\nu\x011,2,20\n"),
    "csv_all_blank_row": lambda p: csv_case(p, "user,item,timestamp\nu1,2,20\n,,\n"),
    "csv_wrong_field_count": lambda p: csv_case(p, "user,item,timestamp\nu1,2,20,9\n"),
    "csv_not_utf8": lambda p: csv_case(p, b"user,item,timestamp\nu\xe91,2,20\n"),
    "csv_duplicate_header": lambda p: csv_case(p, "user,item,timestamp,User\nu1,2,20,x\n"),
    "csv_header_only": lambda p: csv_case(p, "user,item,timestamp\n"),
    "recbole_two_sequences_for_a_user": lambda p: recbole_case(
        p, "user_id:token\titem_id_list:token_seq\titem_id:token\n5\t1 2\t7\n5\t2\t1\n", "d.test.inter"),
    "recbole_blank_first_line": lambda p: recbole_case(p, "\nuser_id:token\titem_id:token\ttimestamp:float\na\t7\t3\n"),
    "movielens_colon_in_a_field": lambda p: movielens_case(p, "1:x:2::5::978300760\n"),
    "movielens_three_fields": lambda p: movielens_case(p, "1::2::978300760\n"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_arrow_reader_reads_what_the_line_reader_reads(case, tmp_path, monkeypatch):
    fast, slow, taken = load_both(monkeypatch, *ACCEPTED[case](tmp_path))
    assert taken == [True]
    assert isinstance(slow, list) and fast == slow


@pytest.mark.parametrize("case", sorted(HANDED_OVER))
def test_doubtful_files_go_to_the_line_reader(case, tmp_path, monkeypatch):
    fast, slow, taken = load_both(monkeypatch, *HANDED_OVER[case](tmp_path))
    assert taken in ([False], [])  # [] : a header the Arrow reader is never asked about
    assert fast == slow


def test_the_first_bad_line_is_named_by_the_line_reader(tmp_path, monkeypatch):
    fast, _, _ = load_both(monkeypatch, *HANDED_OVER["csv_bad_timestamp"](tmp_path))
    assert fast.startswith("error: ") and "interactions.csv:3" in fast and "timestamp" in fast


def test_blocks_share_one_code_per_id(tmp_path, monkeypatch):
    """Ids met again in later blocks keep their first code; written forms of one id ("7" and "7.0") share it."""
    monkeypatch.setattr(arrow_reader, "BLOCK_BYTES", 64)
    rows = "".join(f"u{k % 5},{'7.0' if k % 3 else 7},{k}\n" for k in range(200))
    fmt, path = csv_case(tmp_path, "user,item,timestamp\n" + rows)
    fast, slow, taken = load_both(monkeypatch, fmt, path)
    assert taken == [True] and fast == slow
    columns = load_raw(fmt, path).events
    assert columns.user_ids == [f"u{k}" for k in range(5)] and columns.item_ids == ["7"]
    assert columns.user.dtype == np.int32 and columns.timestamp.dtype == np.float64


def test_columns_round_trip_events():
    events = [Event("u", "a", 2.0, None, 0), Event("v", "a", 1.0, 4.5, 1), Event("u", "b", 3.0, None, 2)]
    columns = EventColumns.from_events(events)
    assert columns.to_events() == events
    assert columns.user.tolist() == [0, 1, 0] and columns.item_ids == ["a", "b"]
    assert EventColumns.from_events(events[:1]).rating is None  # no rating anywhere: no rating column
    assert columns.nbytes() == 3 * (4 + 4 + 8 + 8)


def test_prepared_folders_do_not_depend_on_the_reader(tmp_path, monkeypatch):
    """Byte-identical prepared folders (fingerprint and meta.json) from either reader, with every filter on."""
    rng = np.random.default_rng(0)
    lines = [f"user{u},{i},{t},{r}" for u, i, t, r in zip(rng.integers(0, 40, 3000), rng.integers(0, 60, 3000),
                                                          rng.integers(0, 50, 3000), rng.integers(1, 6, 3000))]
    items = "item,title\n" + "".join(f"{i},Title {i}\n" for i in range(60))
    (tmp_path / "raw").mkdir()
    fmt, path = csv_case(tmp_path / "raw", "user,item,timestamp,rating\n" + "\n".join(lines) + "\n", items)
    config = PreprocessConfig(kcore=3, min_rating=2, max_history=5, num_candidates=10)
    fast = prepare_dataset(load_raw(fmt, path), config, tmp_path / "fast")
    for module in LOADERS:
        monkeypatch.setattr(module, "scan_events", lambda *args, **kwargs: None)
    slow = prepare_dataset(load_raw(fmt, path), config, tmp_path / "slow")
    assert fast.fingerprint == slow.fingerprint
    assert (tmp_path / "fast" / "meta.json").read_text() == (tmp_path / "slow" / "meta.json").read_text()
    assert fast.meta["counts"]["dropped"]["users_removed_by_kcore"] >= 0
