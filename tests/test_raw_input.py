"""Raw input that used to be taken silently, through `delrec data prepare`: exit 2, one line naming file:line and
the column or key, nothing written and the input untouched.

- A control character in an id, a title or a number (a NUL made `u\\x001` a second user, whose interactions the
  filters then dropped; in a title it went into every prompt). Only a tab inside a title is kept.
- A header naming a column twice, ignoring case (one of the two was ignored).
- A JSON object giving a key twice (the last one won).
- A folder where a file is expected (reported as "file not found", or as no test file at all).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_checks import one_line_error, run_cli, snapshot
from conftest import reseal_dataset
from delrec.data.dataset import META_FILE

ITEMS = ("Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta")
SEQUENCES = {1: (1, 2, 3, 4), 2: (2, 3, 4, 5), 3: (1, 3, 5, 2), 4: (6, 7, 8, 1)}  # user -> items, oldest first


def csv_files() -> dict[str, str]:
    rows = [f"u{user},i{item},{step},5" for user, items in SEQUENCES.items() for step, item in enumerate(items)]
    return {"items.csv": "item,title\n" + "".join(f"i{i},{t}\n" for i, t in enumerate(ITEMS, 1)),
            "interactions.csv": "user,item,timestamp,rating\n" + "\n".join(rows) + "\n"}


def rows_jsonl_files() -> dict[str, str]:
    row = json.dumps({"seq": [1, 2, 0], "len_seq": 2, "next": 3})
    return {"id2name.txt": "".join(f"{i}::{t}\n" for i, t in enumerate(ITEMS, 1)),
            **{f"{split}.jsonl": f"{row}\n{row}\n" for split in ("train", "valid", "test")}}


def rows_csv_files() -> dict[str, str]:
    return {"id2name.txt": "".join(f"{i}::{t}\n" for i, t in enumerate(ITEMS, 1)),
            **{f"{split}.csv": 'seq,len_seq,next\n"[1, 2, 0]",2,3\n' for split in ("train", "valid", "test")}}


def movielens_files() -> dict[str, str]:
    ratings = [f"{user}::{item}::5::{100 + step}"
               for user, items in SEQUENCES.items() for step, item in enumerate(items)]
    return {"movies.dat": "".join(f"{i}::{t} (1999)::Drama\n" for i, t in enumerate(ITEMS, 1)),
            "ratings.dat": "\n".join(ratings) + "\n"}


def recbole_files() -> dict[str, str]:
    rows = [f"{user}\t{item}\t{step}" for user, items in SEQUENCES.items() for step, item in enumerate(items)]
    return {"d.item": "item_id:token\ttitle:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(ITEMS, 1)),
            "d.inter": "user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n"}


def recbole_sequence_files() -> dict[str, str]:
    rows = [f"{user}\t{' '.join(map(str, items[:-1]))}\t{items[-1]}" for user, items in SEQUENCES.items()]
    return {"g.item": recbole_files()["d.item"],
            "g.inter": "user_id:token\titem_id_list:token_seq\titem_id:token\n" + "\n".join(rows) + "\n"}


FORMATS = {"csv": csv_files, "rows": rows_jsonl_files, "rows-csv": rows_csv_files, "movielens": movielens_files,
           "recbole": recbole_files, "recbole-sequences": recbole_sequence_files}


def raw_folder(tmp_path: Path, fmt: str, file: str | None = None, old: str = "", new: str | None = None) -> Path:
    """The format's clean files, `old` replaced once by `new` in `file` (`new` None: `file` is a folder instead)."""
    folder = tmp_path / "raw"
    folder.mkdir()
    for name, text in FORMATS[fmt]().items():
        if name == file and new is None:
            (folder / name).mkdir()
            (folder / name / "part-0").write_text(text, encoding="utf-8")
            continue
        if name == file:
            assert text.count(old) >= 1, (name, old)
            text = text.replace(old, new, 1)
        (folder / name).write_bytes(text.encode("utf-8"))
    return folder


def prepare(tmp_path: Path, fmt: str, folder: Path) -> int:
    return run_cli(["data", "prepare", "--format", fmt.split("-")[0], "--input", folder, "--out", tmp_path / "out",
                    "--num_candidates", "3"])


# (format, file, text, replaced by, facts of the one error line)
CONTROL = {
    "nul-in-a-user-id": ("csv", "interactions.csv", "u1,i3,2", "u\x001,i3,2",
                         "interactions.csv:4 field 'user'", "U+0000 (NUL)", "'u\\x001'"),
    "nul-in-a-title": ("csv", "items.csv", "Gamma", "Gam\x00ma", "items.csv:4 field 'title'", "U+0000 (NUL)"),
    "line-break-in-a-quoted-title": ("csv", "items.csv", "i3,Gamma", 'i3,"Gam\nma"',
                                     "items.csv:4 field 'title'", "U+000A (line feed)"),
    # U+001F is whitespace to str.strip(), which would have dropped it without a word
    "unit-separator-after-an-item-id": ("csv", "interactions.csv", "u1,i3,2", "u1,i3\x1f,2",
                                        "interactions.csv:4 field 'item'", "U+001F"),
    "escape-in-a-timestamp": ("csv", "interactions.csv", "u1,i3,2", "u1,i3,2\x1b",
                              "interactions.csv:4 field 'timestamp'", "U+001B (escape)"),
    "control-in-a-header-name": ("csv", "interactions.csv", "rating", "rat\x00ing",
                                 "interactions.csv:1 field 'column 4'", "U+0000"),
    "bell-in-a-rows-title": ("rows", "id2name.txt", "Beta", "Be\x07ta", "id2name.txt:2 field 'title'", "U+0007"),
    "nul-in-a-rows-next-id": ("rows", "train.jsonl", '"next": 3', '"next": "3\\u0000"',
                              "train.jsonl:1 field 'next'", "expected an integer, found '3\\x00'"),
    "unit-separator-in-a-rows-seq": ("rows-csv", "valid.csv", "[1, 2, 0]", "[1,\x1f2, 0]",
                                     "valid.csv:2 field 'seq'", "expected an integer, found '\\x1f2'"),
    "nul-in-a-movielens-title": ("movielens", "movies.dat", "Beta", "Be\x00ta", "movies.dat:2 field 'title'", "U+0000"),
    "nul-in-a-movielens-user": ("movielens", "ratings.dat", "2::2::5", "2\x00::2::5",
                                "ratings.dat:5 field 'user'", "U+0000"),
    "vertical-tab-in-a-recbole-title": ("recbole", "d.item", "Delta", "Del\x0bta", "d.item:5 field 'title'", "U+000B"),
    "nul-in-a-recbole-user": ("recbole", "d.inter", "3\t1\t0", "3\x00\t1\t0", "d.inter:10 field 'user_id'", "U+0000"),
    "nul-in-a-recbole-sequence": ("recbole-sequences", "g.inter", "2 3 4", "2 3\x00 4",
                                  "g.inter:3 field 'item_id_list'", "U+0000"),
}
DUPLICATE_NAMES = {
    "a-column-twice-in-another-case": ("csv", "interactions.csv", "rating", "ITEM", "interactions.csv:1:",
                                       "column 4 'ITEM' repeats column 2 'item'"),
    "timestamp-twice": ("csv", "interactions.csv", "rating", "timestamp", "interactions.csv:1:",
                        "column 4 'timestamp' repeats column 3 'timestamp'"),
    "a-rows-csv-column-twice": ("rows-csv", "train.csv", "next\n", "NEXT,next\n", "train.csv:1:",
                                "column 4 'next' repeats column 3 'NEXT'"),
    "a-recbole-column-with-two-types": ("recbole", "d.inter", "timestamp:float", "item_id:float", "d.inter:1:",
                                        "column 3 'item_id' repeats column 2 'item_id'"),
    "a-json-key-twice": ("rows", "valid.jsonl", '{"seq"', '{"next": 5, "seq"', "valid.jsonl:1:",
                         "key 'next' appears twice in one object"),
}
FOLDERS = {
    "csv-items": ("csv", "items.csv", "items.csv: is a folder, expected a file"),
    "csv-interactions": ("csv", "interactions.csv", "interactions.csv: is a folder, expected a file"),
    "rows-test-split": ("rows", "test.jsonl", "test.jsonl: is a folder, expected a file"),
    "rows-titles": ("rows", "id2name.txt", "id2name.txt: is a folder, expected a file"),
    "movielens-movies": ("movielens", "movies.dat", "movies.dat: is a folder, expected a file"),
    "recbole-items": ("recbole", "d.item", "d.item: is a folder, expected a file"),
}
CASES = {**{name: (fmt, file, old, new, facts) for name, (fmt, file, old, new, *facts) in CONTROL.items()},
         **{name: (fmt, file, old, new, facts) for name, (fmt, file, old, new, *facts) in DUPLICATE_NAMES.items()},
         **{f"folder-{name}": (fmt, file, "", None, [fact]) for name, (fmt, file, fact) in FOLDERS.items()}}


@pytest.mark.parametrize("case", CASES)
def test_bad_raw_input_is_refused_in_one_line_and_nothing_is_written(case, tmp_path, capsys):
    fmt, file, old, new, facts = CASES[case]
    folder = raw_folder(tmp_path, fmt, file, old, new)
    before = snapshot(folder)
    line = one_line_error(capsys, prepare(tmp_path, fmt, folder), str(folder / file), *facts)
    assert "\x00" not in line  # control characters are shown escaped, never printed
    assert not (tmp_path / "out").exists() and snapshot(folder) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_clean_files_prepare(fmt, tmp_path, capsys):
    """The cases above differ from input that prepares by their one change."""
    assert prepare(tmp_path, fmt, raw_folder(tmp_path, fmt)) == 0, capsys.readouterr().err


def test_a_tab_in_a_title_blanks_around_values_and_unnamed_columns_are_still_read(tmp_path, capsys):
    files = csv_files()
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "items.csv").write_text(files["items.csv"].replace("Gamma", '"Gamma\tRay"'), encoding="utf-8")
    lines = [f"{line},," for line in files["interactions.csv"].splitlines()]  # two unnamed columns, as Excel adds
    lines[3] = " u1 ,i3\t,2 ,5 ,,"
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert prepare(tmp_path, "csv", folder) == 0, capsys.readouterr().err
    titles = [json.loads(line)["title"] for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert sorted(titles) == sorted(t if t != "Gamma" else "Gamma\tRay" for t in ITEMS)
    assert json.loads(capsys.readouterr().out)["users"] == 4  # " u1 " is u1, not a fifth user


def prepared(tmp_path: Path, capsys) -> Path:
    """A dataset prepared from the clean csv files: 8 items, 4 users, one instance per user and split."""
    assert prepare(tmp_path, "csv", raw_folder(tmp_path, "csv")) == 0, capsys.readouterr().err
    capsys.readouterr()
    return tmp_path / "out"


def edit_meta(section: str, edit):
    """meta.json with `edit(meta[section])` in its place, as a hand edit would (the data files, so the
    fingerprint, unchanged)."""
    def damage(folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        meta[section] = edit(meta[section])
        (folder / META_FILE).write_text(json.dumps(meta))
    return damage


def set_field(path: str, value):
    """meta.json with the field at the dotted `path` ("counts.instances.test") set to `value`."""
    section, *parents, last = path.split(".")
    def edit(node: dict) -> dict:
        top = node
        for key in parents:
            node = node[key]
        node[last] = value
        return top
    return edit_meta(section, edit)


META_EDITS = {  # meta.json's counts and options, printed by `data stats` with exit 0 or crashed on
    "a-list-for-the-counts": (edit_meta("counts", lambda counts: [1, 2]), "field 'counts'",
                              "expected an object of dataset counts, found [1, 2]"),
    "text-for-the-item-count": (set_field("counts.items", "8"), "field 'counts.items'",
                                "expected a non-negative integer, found '8'"),
    "a-negative-instance-count": (set_field("counts.instances.test", -5), "field 'counts.instances.test'", "found -5"),
    "a-truth-value-for-the-user-count": (set_field("counts.users", True), "field 'counts.users'", "found True"),
    "a-missing-split": (set_field("counts.instances", {"train": 4, "valid": 4}), "field 'counts.instances.test'",
                        "found None"),
    "more-items-than-items-jsonl-holds": (set_field("counts.items", 9), "field 'counts.items'",
                                          "says 9, but items.jsonl holds 8 rows"),
    "a-truth-value-for-the-number-of-candidates": (set_field("options.num_candidates", True),
                                                   "field 'options.num_candidates'",
                                                   "expected a positive integer, found True"),
    "fewer-instances-than-valid-jsonl-holds": (set_field("counts.instances.valid", 3), "field 'counts.instances.valid'",
                                               "says 3, but valid.jsonl holds 4 rows"),
}


@pytest.mark.parametrize("case", META_EDITS)
def test_counts_and_options_in_meta_json_are_checked_where_the_dataset_is_loaded(case, tmp_path, capsys):
    damage, *facts = META_EDITS[case]
    folder = prepared(tmp_path, capsys)
    damage(folder)
    before = snapshot(folder)
    one_line_error(capsys, run_cli(["data", "stats", "--data", folder]), f"{folder / META_FILE} ", *facts)
    assert snapshot(folder) == before


def test_the_prepared_counts_load(tmp_path, capsys):
    """The cases above differ from a dataset that loads by their one edit."""
    folder = prepared(tmp_path, capsys)
    assert run_cli(["data", "stats", folder]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["items"], counts["instances"]) == (8, {"train": 4, "valid": 4, "test": 4})


def test_a_truth_value_among_the_candidates_is_not_item_1(tmp_path, capsys):
    """JSON `true` equals 1 to Python: it was scored as item 1 (6.0 was refused)."""
    folder = prepared(tmp_path, capsys)
    file = folder / "candidates" / "test.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    target = json.loads((folder / "test.jsonl").read_text().splitlines()[0])["target"]
    rows[0]["candidates"] = [True if c != target else c for c in rows[0]["candidates"]]
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reseal_dataset(folder)
    out = tmp_path / "pop"
    code = run_cli(["sr", "train", "--data", folder, "--model", "pop", "--out", out, "--no_progress"])
    one_line_error(capsys, code, f"{file}:1 field 'candidates'", "item id True is not in the catalogue (0..7)")
    assert not (out / "model.safetensors").exists()


def test_a_file_for_the_dataset_folder_is_named_as_a_file(tmp_path, capsys):
    """It was reported as "dataset folder not found", which sends the user looking for a missing folder."""
    meta = prepared(tmp_path, capsys) / META_FILE
    one_line_error(capsys, run_cli(["data", "stats", "--data", meta]),
                   f"{meta} is a file, expected a dataset folder (the folder holding meta.json)")
