"""Preprocessing, the prepared-folder contract and its validation."""

import json

import pytest

from conftest import reseal_dataset
from delrec.data.dataset import PreparedDataset
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig, preprocess
from delrec.data.raw import Event, EventColumns, RawDataset, RowInstance
from delrec.errors import DelrecError


def events_dataset(sequences, titles=None, ratings=None):
    """Build per-user events; each sequence is a list of (item, timestamp)."""
    events = []
    for user, seq in sequences.items():
        for item, ts in seq:
            rating = None if ratings is None else ratings.get((user, item))
            events.append(Event(user, item, ts, rating, len(events)))
    items = {item for seq in sequences.values() for item, _ in seq}
    titles = titles or {item: f"Title {item}" for item in items}
    return RawDataset(source="test", titles=titles, events=EventColumns.from_events(events))


def catalogue(n):
    return {str(i): f"Item {i}" for i in range(n)}


def test_leave_one_out_split_chronological_with_stable_ties():
    raw = events_dataset(
        {
            "u2": [("5", 3), ("3", 1), ("4", 1), ("6", 9)],  # 3 and 4 tie at t=1: file order wins
            "u1": [("1", 1), ("2", 2), ("3", 3)],
            "u3": [("1", 1), ("2", 2)],  # too short: dropped and counted
        },
    )
    out = preprocess(raw, PreprocessConfig(num_candidates=3))
    assert out.raw_ids == ["1", "2", "3", "4", "5", "6"]  # numeric id order kept
    u1, u2 = list(out.instances("train"))
    assert (u1.user, u1.history, u1.target) == ("u1", (), 0)
    assert (u2.user, u2.history, u2.target) == ("u2", (2,), 3)
    assert [(i.history, i.target) for i in list(out.instances("valid"))] == [((0,), 1), ((2, 3), 4)]
    assert [(i.history, i.target) for i in list(out.instances("test"))] == [((0, 1), 2), ((2, 3, 4), 5)]
    assert out.counts["dropped"]["users_with_fewer_than_3_interactions"] == 1
    assert out.counts["users"] == 2 and out.counts["items"] == 6 and out.counts["interactions"] == 7


def test_max_history_keeps_most_recent_items_but_candidates_avoid_the_full_history():
    seq = [(str(i), i) for i in range(12)]
    other = [(str(i), i) for i in range(12, 40)]
    raw = events_dataset({"u": seq, "v": other}, titles=catalogue(40))
    out = preprocess(raw, PreprocessConfig(max_history=4, num_candidates=10))
    test = list(out.instances("test"))[0]
    assert test.history == (7, 8, 9, 10) and test.target == 11
    candidates = list(out.candidates("test"))[0]
    assert len(list(out.instances("test"))[1].history) == 4
    assert len(candidates) == 10 and len(set(candidates)) == 10 and 11 in candidates
    assert not set(candidates) & set(range(11))


def test_candidates_fixed_by_seed_and_never_from_history():
    sequences = {f"u{u}": [(str((u + k) % 50), k) for k in range(6)] for u in range(30)}
    raw = events_dataset(sequences, titles=catalogue(50))
    a = preprocess(raw, PreprocessConfig(num_candidates=10, seed=1))
    b = preprocess(raw, PreprocessConfig(num_candidates=10, seed=1))
    c = preprocess(raw, PreprocessConfig(num_candidates=10, seed=2))
    def every(processed):
        return {split: list(processed.candidates(split)) for split in ("valid", "test")}

    assert every(a) == every(b)
    assert every(a) != every(c)
    for split in ("valid", "test"):
        for inst, cands in zip(a.instances(split), a.candidates(split)):
            assert cands.count(inst.target) == 1 and len(set(cands)) == 10
            assert not set(cands) & set(inst.history)
    positions = {cands.index(inst.target) for inst, cands in zip(a.instances("test"), a.candidates("test"))}
    assert len(positions) > 3  # the target is not always in the same slot


def test_kcore_and_rating_threshold():
    seqs = {f"u{u}": [("a", 1), ("b", 2), ("c", 3)] for u in range(3)}
    seqs.update({f"w{u}": [("d", 1), ("e", 2), ("f", 3)] for u in range(3)})
    seqs["u9"] = [("a", 1), ("b", 2), ("rare", 3), ("c", 4)]
    raw = events_dataset(seqs)
    out = preprocess(raw, PreprocessConfig(num_candidates=2, kcore=3))
    assert out.raw_ids == ["a", "b", "c", "d", "e", "f"]
    assert out.counts["dropped"]["items_removed_by_kcore"] == 1
    ratings = {(u, i): 5.0 for u in seqs for i in "abcdef"}
    ratings[("u9", "rare")] = 1.0
    raw = events_dataset(seqs, ratings=ratings)
    out = preprocess(raw, PreprocessConfig(num_candidates=2, min_rating=4))
    assert "rare" not in out.raw_ids and out.counts["dropped"]["interactions_below_min_rating"] == 1


def test_num_candidates_larger_than_catalogue_is_refused():
    raw = events_dataset({"u": [("1", 1), ("2", 2), ("3", 3)]})
    with pytest.raises(DelrecError, match="larger than the catalogue"):
        preprocess(raw, PreprocessConfig(num_candidates=20))


def test_missing_title_is_named():
    raw = events_dataset({"u": [("1", 1), ("2", 2), ("3", 3)]}, titles={"1": "x", "2": "y"})
    with pytest.raises(DelrecError, match="item '3'.*no title"):
        preprocess(raw, PreprocessConfig(num_candidates=2))


def test_rows_data_keeps_given_split_and_catalogue():
    titles = catalogue(30)
    splits = {
        "train": [RowInstance([], "0", "t:1"), RowInstance(["0"], "1", "t:2"), RowInstance(["0", "1"], "2", "t:3")],
        "valid": [RowInstance(["4", "5"], "6", "v:1")],
        "test": [RowInstance(["7"], "8", "x:1")],
    }
    out = preprocess(RawDataset("rows", titles, splits=splits), PreprocessConfig(num_candidates=5))
    assert out.counts["items"] == 30
    assert out.counts["instances"] == {"train": 3, "valid": 1, "test": 1}
    assert out.counts["users"] == 3  # train has one maximal sequence
    assert list(out.instances("train"))[0].history == ()


def test_prepared_folder_roundtrip_and_overwrite_rules(tmp_path):
    sequences = {f"u{u}": [(str((u * 3 + k) % 40), k) for k in range(5)] for u in range(20)}
    raw = events_dataset(sequences, titles=catalogue(40))
    out = tmp_path / "data"
    ds = prepare_dataset(raw, PreprocessConfig(num_candidates=8), out)
    again = PreparedDataset.load(out)
    assert again.fingerprint == ds.fingerprint and again.num_items == 40
    assert [i.target for i in again.instances("test")] == [i.target for i in ds.instances("test")]
    assert len(again.candidates("valid")) == 20 and again.num_candidates == 8
    assert json.loads((out / "meta.json").read_text())["protocol"] == "leave-one-out"

    prepare_dataset(raw, PreprocessConfig(num_candidates=8), out)  # identical: accepted
    with pytest.raises(DelrecError, match="different prepared dataset.*--overwrite"):
        prepare_dataset(raw, PreprocessConfig(num_candidates=8, seed=5), out)
    assert PreparedDataset.load(out).fingerprint == ds.fingerprint  # nothing lost
    replaced = prepare_dataset(raw, PreprocessConfig(num_candidates=8, seed=5), out, overwrite=True)
    assert replaced.fingerprint != ds.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp folders left


def test_output_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    raw = events_dataset({"u": [("1", 1), ("2", 2), ("3", 3)]})
    with pytest.raises(DelrecError, match="not a prepared dataset"):
        prepare_dataset(raw, PreprocessConfig(num_candidates=2), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_preparation_writes_nothing(tmp_path):
    raw = events_dataset({"u": [("1", 1), ("2", 2), ("3", 3)]})
    with pytest.raises(DelrecError):
        prepare_dataset(raw, PreprocessConfig(num_candidates=50), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_loading_validates_the_folder(tmp_path):
    with pytest.raises(DelrecError, match="not a prepared dataset"):
        PreparedDataset.load(tmp_path)
    sequences = {f"u{u}": [(str((u + k) % 9), k) for k in range(4)] for u in range(5)}
    ds = prepare_dataset(events_dataset(sequences, titles=catalogue(9)), PreprocessConfig(num_candidates=3), tmp_path / "d")
    lines = (ds.path / "test.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"id": 2, "user": "x", "history": [1, 99], "target": 3})
    (ds.path / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DelrecError, match=r"the dataset files changed since `delrec data prepare` wrote them"):
        PreparedDataset.load(ds.path)
    reseal_dataset(ds.path)  # an edit that also re-fingerprinted the folder
    with pytest.raises(DelrecError, match=r"test.jsonl:3 field 'history'.*99.*not in the catalogue"):
        PreparedDataset.load(ds.path).instances("test")


def test_fingerprint_and_rows_do_not_depend_on_the_read_block(tmp_path, monkeypatch):
    """Files are hashed and their rows counted in blocks; a row cut by a block boundary, blank and whitespace-only
    lines and a last line without its line feed count as one whole read would count them."""
    from delrec.data import dataset

    (tmp_path / "a.jsonl").write_bytes(b'{"id": 0}\n\n   \n{"id": 1}\r\n\t\n{"id": 2}')
    (tmp_path / "b.jsonl").write_bytes(b"")
    whole = dataset._fingerprint_and_rows(tmp_path, ["a.jsonl", "b.jsonl"])
    assert whole[1] == {"a.jsonl": 3, "b.jsonl": 0}
    for block in (1, 2, 3, 7):
        monkeypatch.setattr(dataset, "FINGERPRINT_BLOCK", block)
        assert dataset._fingerprint_and_rows(tmp_path, ["a.jsonl", "b.jsonl"]) == whole


@pytest.mark.parametrize("user", ["u1", None, 'quote " and \\ backslash', "naïve 東京", "tab\there"])
@pytest.mark.parametrize("history", [(), (0,), (3, 14, 15)])
def test_instance_rows_are_the_json_of_write_jsonl(user, history):
    """Split rows are formatted directly, for speed; they must be the bytes `write_jsonl` wrote before."""
    from delrec.data.dataset import Instance
    from delrec.data.prepare import instance_line
    from delrec.io import json_text

    inst = Instance(7, history, 9, user)
    row = {"id": inst.id, "user": inst.user, "history": list(inst.history), "target": inst.target}
    assert instance_line(inst) == json_text(row, "x.jsonl") + "\n"


@pytest.mark.parametrize("key", [(0, 0, 0), (0, 1, 12345), (2**32 - 1, 1, 7), (3, 0, 2**32), (2**40, 1, 5)])
def test_keyed_rng_is_default_rng_of_the_key(key):
    import numpy as np

    from delrec.data.preprocess import keyed_rng

    assert keyed_rng(*key).integers(0, 2**62, size=8).tolist() == np.random.default_rng(list(key)).integers(
        0, 2**62, size=8).tolist()
