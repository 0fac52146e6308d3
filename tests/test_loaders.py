"""Dataset loaders: exact parsing of each format, located errors for bad input, the real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_data
from delrec.data.loaders import FORMATS, load_raw
from delrec.data.movielens import move_trailing_article
from delrec.data.raw import Event, RowInstance
from delrec.errors import DelrecError



def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def refused(fmt: str, path: Path, *parts: str, **options) -> str:
    """Load, expect a DelrecError, and check that its one-line message holds every part."""
    with pytest.raises(DelrecError) as info:
        load_raw(fmt, path, **options)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# --- RecBole ---------------------------------------------------------------------------------


def test_recbole_interactions_become_events(tmp_path):
    write(tmp_path, "d.item", "item_id:token\tyear:token\tmovie_title:token_seq\nA\t1999\tMatrix\nB\t2001\tAmelie\n")
    write(
        tmp_path,
        "d.inter",
        "timestamp:float\tuser_id:token\titem_id:token\trating:float\n"
        "20\tu1\tB\t4\n10\tu1\tA\t5\n10.5\tu2\tA\t3.5\n",
    )
    raw = load_raw("recbole", tmp_path / "d.inter")  # a file of the folder is accepted too
    assert raw.titles == {"A": "Matrix", "B": "Amelie"}
    assert raw.events.to_events() == [
        Event("u1", "B", 20.0, 4.0, 0),
        Event("u1", "A", 10.0, 5.0, 1),
        Event("u2", "A", 10.5, 3.5, 2),
    ]
    assert raw.protocol == "leave-one-out"
    assert raw.title_origin == str(tmp_path / "d.item")


def test_recbole_sequences_use_the_test_file(tmp_path):
    write(tmp_path, "g.item", "item_id:token\ttitle:token_seq\n1\tZelda\n2\tMario Kart\n3\tTetris\n")
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    write(tmp_path, "g.valid.inter", header + "7\t1\t2\n8\t\t3\n")
    write(tmp_path, "g.test.inter", header + "7\t1 2\t3\n8\t3\t1\n")
    raw = load_raw("recbole", tmp_path)
    assert raw.events.to_events() == [
        Event("7", "1", 0.0, None, 0),
        Event("7", "2", 1.0, None, 1),
        Event("7", "3", 2.0, None, 2),
        Event("8", "3", 0.0, None, 3),
        Event("8", "1", 1.0, None, 4),
    ]


def test_recbole_refuses_ambiguous_inter_files(tmp_path):
    write(tmp_path, "g.item", "item_id:token\ttitle:token_seq\n1\tZelda\n")
    write(tmp_path, "a.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t0\n")
    write(tmp_path, "b.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t0\n")
    refused("recbole", tmp_path, str(tmp_path), "a.inter, b.inter", "expected one .inter file")


def test_recbole_refuses_a_user_with_two_sequences(tmp_path):
    write(tmp_path, "g.item", "item_id:token\ttitle:token_seq\n1\tZelda\n")
    write(tmp_path, "g.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n5\t1\t1\n5\t1\t1\n")
    refused("recbole", tmp_path, "g.inter:3", "user '5'", "line 2")


def test_recbole_missing_column(tmp_path):
    write(tmp_path, "g.item", "item_id:token\ttitle:token_seq\n1\tZelda\n")
    write(tmp_path, "g.inter", "user_id:token\titem_id:token\n1\t1\n")
    refused("recbole", tmp_path, "g.inter:1", "missing column 'timestamp'")


# --- rows (LLaRA / DLLM2Rec) -----------------------------------------------------------------


TITLES = "0::Zero\n1::One\n2::Two\n3::Three\n"


def _rows_folder(folder: Path, train: list[dict], titles: str = TITLES, titles_name: str = "id2name.txt") -> Path:
    write(folder, titles_name, titles)
    write(folder, "train.jsonl", jsonl(train))
    write(folder, "valid.jsonl", jsonl([{"seq": [0, 1, 9], "len_seq": 2, "next": 2}]))
    write(folder, "test.jsonl", jsonl([{"seq": [0, 1, 2], "len_seq": 3, "next": 3}]))
    return folder


def test_rows_jsonl_detects_the_pad_and_keeps_empty_histories(tmp_path):
    train = [
        {"seq": [9, 9, 9], "len_seq": 1, "next": 0},  # LLaRA's first row of a user: all pad, len_seq 1
        {"seq": [0, 9, 9], "len_seq": 1, "next": 1},
        {"seq": [0, 1, 9], "len_seq": 2, "next": 2},
    ]
    raw = load_raw("rows", _rows_folder(tmp_path, train))
    train_file = tmp_path / "train.jsonl"
    assert raw.splits["train"] == [
        RowInstance([], "0", f"{train_file}:1"),
        RowInstance(["0"], "1", f"{train_file}:2"),
        RowInstance(["0", "1"], "2", f"{train_file}:3"),
    ]
    assert raw.splits["valid"] == [RowInstance(["0", "1"], "2", f"{tmp_path / 'valid.jsonl'}:1")]
    assert raw.splits["test"] == [RowInstance(["0", "1", "2"], "3", f"{tmp_path / 'test.jsonl'}:1")]
    assert raw.notes == {"len_seq_mismatch": 1}
    assert raw.titles == {"0": "Zero", "1": "One", "2": "Two", "3": "Three"}
    assert raw.protocol == "given"


def test_rows_jsonl_with_a_byte_order_mark(tmp_path):
    """Editors on Windows save UTF-8 with a BOM; the JSONL reader accepts it as every other format does."""
    folder = _rows_folder(tmp_path, [{"seq": [0, 1, 9], "len_seq": 2, "next": 2}])
    (folder / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + (folder / "train.jsonl").read_bytes())
    assert load_raw("rows", folder).splits["train"] == [RowInstance(["0", "1"], "2", f"{folder / 'train.jsonl'}:1")]


def test_rows_explicit_pad_id(tmp_path):
    train = [{"seq": [9, 0, 1], "len_seq": 2, "next": 2}]  # left padding cannot be detected
    refused("rows", _rows_folder(tmp_path, train), "valid.jsonl:1 field 'seq'", "train.jsonl:1 pads with 1", "pad_id")
    raw = load_raw("rows", tmp_path, pad_id=9)
    assert raw.splits["train"][0].history == ["0", "1"]


def test_rows_csv_written_by_pandas(tmp_path):
    write(tmp_path, "id2name.txt", "1::One\n2::Two\n16713::Big: the :: sequel\n")
    write(
        tmp_path,
        "train.csv",
        ',seq,len_seq,next\n0,"[1, 2, 0]",2.0,16713.0\n1,"[16713 0 0]",1,2\n',
    )
    write(tmp_path, "val.csv", 'seq,len_seq,next\n"[1, 0, 0]",1,2\n')
    write(tmp_path, "test.csv", 'next,seq,len_seq,extra\n1,"[2, 16713, 0]",2,x\n')
    raw = load_raw("rows", tmp_path)
    assert raw.splits["train"] == [
        RowInstance(["1", "2"], "16713", f"{tmp_path / 'train.csv'}:2"),
        RowInstance(["16713"], "2", f"{tmp_path / 'train.csv'}:3"),
    ]
    assert raw.splits["valid"] == [RowInstance(["1"], "2", f"{tmp_path / 'val.csv'}:2")]
    assert raw.splits["test"] == [RowInstance(["2", "16713"], "1", f"{tmp_path / 'test.csv'}:2")]
    assert raw.titles["16713"] == "Big: the :: sequel"
    assert raw.notes == {"len_seq_mismatch": 0}


def test_rows_without_padding_need_no_pad(tmp_path):
    _rows_folder(tmp_path, [{"seq": [0, 1], "len_seq": 2, "next": 2}], "0::Z\n1::O\n2::T\n3::H\n9::N\n")
    refused("rows", tmp_path, "valid.jsonl:1 field 'seq'", "pad id 9 is an item", "pass pad_id")
    write(tmp_path, "valid.jsonl", jsonl([{"seq": [0, 1, 9], "len_seq": 3, "next": 2}]))
    raw = load_raw("rows", tmp_path)
    assert raw.splits["valid"][0].history == ["0", "1", "9"]  # nothing after len_seq: no pad, 9 is an item


@pytest.mark.parametrize(
    "titles",
    [
        "id\ttitle\n0\tZero\n1\tOne\n2\tTwo\n3\tThree\n",
        "name\tid\nZero\t0\nOne\t1\nTwo\t2\nThree\t3\n",
        "Zero\t0\nOne\t1\nTwo\t2\nThree\t3\n",
    ],
)
def test_rows_title_columns_are_detected(tmp_path, titles):
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}], titles, titles_name="items.tsv")
    raw = load_raw("rows", tmp_path)
    assert raw.titles == {"0": "Zero", "1": "One", "2": "Two", "3": "Three"}
    assert raw.title_origin == str(tmp_path / "items.tsv")


def test_rows_all_integer_title_columns_are_ambiguous(tmp_path):
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}], "0\t1984\n1\t2001\n2\t1999\n3\t311\n")
    refused("rows", tmp_path, "id2name.txt", "ambiguous", "title_columns")
    assert load_raw("rows", tmp_path, title_columns="id,title").titles["3"] == "311"


def test_rows_titles_file_must_be_unique(tmp_path):
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}], titles_name="a.txt")
    write(tmp_path, "b.tsv", "0\tZero\n")
    refused("rows", tmp_path, "a.txt, b.tsv", "expected one titles file")
    (tmp_path / "a.txt").unlink()
    (tmp_path / "b.tsv").unlink()
    refused("rows", tmp_path, "found none")


def test_rows_missing_split_file(tmp_path):
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}])
    (tmp_path / "valid.jsonl").unlink()
    refused("rows", tmp_path, "no valid file")


def test_rows_non_integer_id(tmp_path):
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}, {"seq": [0, "x"], "len_seq": 2, "next": 1}])
    refused("rows", tmp_path, "train.jsonl:2 field 'seq'", "expected an integer", "'x'")


def test_rows_csv_non_integer_next(tmp_path):
    _rows_folder(tmp_path, [])
    (tmp_path / "train.jsonl").unlink()
    write(tmp_path, "train.csv", 'seq,len_seq,next\n"[0, 1]",2,2.5\n')
    refused("rows", tmp_path, "train.csv:2 field 'next'", "2.5")


def test_rows_item_without_title(tmp_path):
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}, {"seq": [0, 1], "len_seq": 2, "next": 7}])
    refused("rows", tmp_path, "train.jsonl:2 field 'next'", "item '7'", "id2name.txt")


# --- MovieLens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "moved"),
    [
        ("Shawshank Redemption, The (1994)", "The Shawshank Redemption (1994)"),
        ("Bug's Life, A (1998)", "A Bug's Life (1998)"),
        ("American President, An", "An American President"),
        ("City of Lost Children, The (Cité des enfants perdus, La) (1995)",
         "The City of Lost Children (Cité des enfants perdus, La) (1995)"),
        ("Sense and Sensibility (1995)", "Sense and Sensibility (1995)"),
        ("Them, Theodore (2001)", "Them, Theodore (2001)"),
    ],
)
def test_move_trailing_article(title, moved):
    assert move_trailing_article(title) == moved


def test_movielens_100k_latin1(tmp_path):
    items = "1|Toy Story (1995)|01-Jan-1995||http://x|0|1\n2|Cité des enfants perdus, La (1995)|||x|0\n"
    items += "3|Shawshank Redemption, The (1994)|||x|1\n"
    write(tmp_path, "u.item", items.encode("latin-1"))
    write(tmp_path, "u.data", "196\t3\t3\t881250949\n186\t1\t4.5\t891717742\n196\t2\t1\t881250950\n")
    raw = load_raw("movielens", tmp_path / "u.data")
    assert raw.titles == {
        "1": "Toy Story (1995)",
        "2": "Cité des enfants perdus, La (1995)",
        "3": "The Shawshank Redemption (1994)",
    }
    assert raw.events.to_events() == [
        Event("196", "3", 881250949.0, 3.0, 0),
        Event("186", "1", 891717742.0, 4.5, 1),
        Event("196", "2", 881250950.0, 1.0, 2),
    ]
    assert load_raw("movielens", tmp_path, move_article=False).titles["3"] == "Shawshank Redemption, The (1994)"


def test_movielens_1m(tmp_path):
    write(tmp_path, "movies.dat", "1::Toy Story (1995)::Animation|Comedy\n2::Bug's Life, A (1998)::Comedy\n")
    write(tmp_path, "ratings.dat", "1::2::5::978300760\n1::1::3::978302109\n")
    raw = load_raw("movielens", tmp_path)
    assert raw.titles == {"1": "Toy Story (1995)", "2": "A Bug's Life (1998)"}
    assert raw.events.to_events() == [Event("1", "2", 978300760.0, 5.0, 0), Event("1", "1", 978302109.0, 3.0, 1)]


def test_movielens_1m_resaved_as_utf8(tmp_path):
    """A release re-saved as UTF-8 reads as UTF-8 (assuming Latin-1 would turn 'é' into 'Ã©')."""
    write(tmp_path, "movies.dat", "1::Cité des enfants perdus, La (1995)::Drama\n".encode("utf-8"))
    write(tmp_path, "ratings.dat", "1::1::5::978300760\n")
    assert load_raw("movielens", tmp_path).titles == {"1": "Cité des enfants perdus, La (1995)"}
    write(tmp_path, "movies.dat", "1::Cité des enfants perdus, La (1995)::Drama\n".encode("latin-1"))
    assert load_raw("movielens", tmp_path).titles == {"1": "Cité des enfants perdus, La (1995)"}


def test_movielens_refuses_mixed_releases(tmp_path):
    write(tmp_path, "u.data", "1\t1\t1\t1\n")
    write(tmp_path, "movies.dat", "1::A::B\n")
    refused("movielens", tmp_path, "both", "ml-100k", "ml-1m")


def test_movielens_bad_rating(tmp_path):
    write(tmp_path, "movies.dat", "1::Toy Story (1995)::Animation\n")
    write(tmp_path, "ratings.dat", "1::1::5::978300760\n1::1::five::978302109\n")
    refused("movielens", tmp_path, "ratings.dat:2 field 'rating'", "expected a number", "five")


# --- generic CSV -----------------------------------------------------------------------------


def test_csv_pair(tmp_path):
    write(tmp_path, "items.csv", 'title,item,genre\n"Crouching Tiger, Hidden Dragon",10.0,x\nAmelie,11,y\n')
    write(tmp_path, "interactions.csv", "Item,note,timestamp,user\n11,ok,5,a\n10,,3.5,a\n11,,1,b\n")
    raw = load_raw("csv", tmp_path / "items.csv")
    assert raw.titles == {"10": "Crouching Tiger, Hidden Dragon", "11": "Amelie"}
    assert raw.events.to_events() == [
        Event("a", "11", 5.0, None, 0),
        Event("a", "10", 3.5, None, 1),
        Event("b", "11", 1.0, None, 2),
    ]


def test_csv_ratings(tmp_path):
    write(tmp_path, "items.csv", "item,title\n1,One\n")
    write(tmp_path, "interactions.csv", "user,item,timestamp,rating\nu,1,2,4.5\n")
    assert load_raw("csv", tmp_path).events.to_events() == [Event("u", "1", 2.0, 4.5, 0)]


# --- bad input, every format ------------------------------------------------------------------


def _csv_folder(
    folder: Path, items: str = "item,title\n1,One\n2,Two\n", inter: str = "user,item,timestamp\nu,1,1\nu,2,2\n"
) -> Path:
    write(folder, "items.csv", items)
    write(folder, "interactions.csv", inter)
    return folder


def test_unknown_format_and_misplaced_options(tmp_path):
    refused("parquet", tmp_path, "unknown data format 'parquet'", ", ".join(FORMATS))
    refused("csv", tmp_path, "rows format only", pad_id=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_folder(tmp_path, fmt):
    refused(fmt, tmp_path / "nope", str(tmp_path / "nope"), "not found")


def test_missing_file(tmp_path):
    write(tmp_path, "interactions.csv", "user,item,timestamp\n")
    refused("csv", tmp_path, "items.csv", "file not found")


def test_empty_file(tmp_path):
    _csv_folder(tmp_path, items="")
    refused("csv", tmp_path, "items.csv", "file is empty")
    _rows_folder(tmp_path, [])
    refused("rows", tmp_path, "train.jsonl", "file is empty")


def test_wrong_column_count(tmp_path):
    _csv_folder(tmp_path, inter="user,item,timestamp\nu,1,1\nu,2\n")
    refused("csv", tmp_path, "interactions.csv:3", "expected 3 comma-separated fields", "found 2")
    write(tmp_path, "g.item", "item_id:token\ttitle:token_seq\n1\tZelda\n2\n")
    write(tmp_path, "g.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t0\n")
    refused("recbole", tmp_path, "g.item:3", "expected 2 tab-separated fields", "found 1")


def test_item_without_title(tmp_path):
    _csv_folder(tmp_path, inter="user,item,timestamp\nu,1,1\nu,3,2\n")
    refused("csv", tmp_path, "interactions.csv:3 field 'item'", "item '3'", "no title", "items.csv")
    write(tmp_path, "g.item", "item_id:token\ttitle:token_seq\n1\tZelda\n")
    write(tmp_path, "g.test.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n1\t1 B7\t1\n")
    refused("recbole", tmp_path, "g.test.inter:2 field 'item_id_list'", "item 'B7'")


def test_duplicate_item_titles(tmp_path):
    _csv_folder(tmp_path, items="item,title\n1,One\n2,Two\n1,One\n")
    assert load_raw("csv", tmp_path).titles == {"1": "One", "2": "Two"}  # the same title twice is fine
    _csv_folder(tmp_path, items="item,title\n1,One\n2,Two\n1,Uno\n")
    refused("csv", tmp_path, "items.csv:4", "item '1'", "'Uno'", "'One' at line 2")
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}], "0::Zero\n1::One\n0::Nil\n")
    refused("rows", tmp_path, "id2name.txt:3", "item '0'", "'Zero' at line 1")


def test_empty_title(tmp_path):
    _csv_folder(tmp_path, items='item,title\n1,One\n2," "\n')
    refused("csv", tmp_path, "items.csv:3 field 'title'", "empty title", "item '2'")
    write(tmp_path, "movies.dat", "1::Toy Story::Animation\n2::::Drama\n")
    write(tmp_path, "ratings.dat", "1::1::5::1\n")
    refused("movielens", tmp_path, "movies.dat:2 field 'title'", "empty title")


def test_non_utf8_bytes(tmp_path):
    write(tmp_path, "items.csv", "item,title\n1,One\n2,Caf\xe9\n".encode("latin-1"))
    write(tmp_path, "interactions.csv", "user,item,timestamp\nu,1,1\n")
    refused("csv", tmp_path, "items.csv:3", "not UTF-8")
    _rows_folder(tmp_path, [{"seq": [0], "len_seq": 1, "next": 1}])
    write(tmp_path, "id2name.txt", "0::Zero\n1::Caf\xe9\n".encode("latin-1"))
    refused("rows", tmp_path, "id2name.txt:2", "not UTF-8")
    write(tmp_path, "id2name.txt", TITLES)
    write(tmp_path, "test.jsonl", b'{"seq": [0], "len_seq": 1, "next": 1}\n{"next": "\xff"}\n')
    refused("rows", tmp_path, "test.jsonl:2", "not UTF-8")


# --- the real data ----------------------------------------------------------------------------


def test_real_lastfm():
    raw = load_raw("rows", shared_data("lastfm"))
    assert len(raw.titles) == 4606
    assert {split: len(rows) for split, rows in raw.splits.items()} == {"train": 50800, "valid": 122, "test": 122}
    assert raw.splits["train"][0].history == []  # the all-pad first row of a user is kept
    assert raw.notes["len_seq_mismatch"] == 976  # one such row per training user
    assert all("4606" not in row.history for rows in raw.splits.values() for row in rows)


def test_real_games():
    raw = load_raw("recbole", shared_data("games"))
    assert len(raw.titles) == 16859
    assert len({event.user for event in raw.events.to_events()}) == 50546
    first_user = [event.item for event in raw.events.to_events() if event.user == "0"]
    assert first_user == [str(i) for i in range(15)]  # history 0..13 then the last item 14
