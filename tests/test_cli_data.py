"""`delrec data prepare|stats` end to end, bad input through the CLI, and the real datasets."""

import json

import pytest

from conftest import shared_data
from delrec.cli import main
from delrec.data.dataset import PreparedDataset


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prepare_synthetic_then_stats(tmp_path, capsys):
    out = tmp_path / "syn"
    code, stdout, _ = run(["data", "prepare", "--format", "synthetic", "--out", str(out), "--num-candidates", "10"], capsys)
    assert code == 0
    printed = json.loads(stdout)
    code, stdout, _ = run(["data", "stats", str(out)], capsys)
    stats = json.loads(stdout)
    assert code == 0 and stats["users"] == printed["users"] == 600 and stats["items"] == 200
    assert stats["instances"] == {"train": 600, "valid": 600, "test": 600}
    assert len(PreparedDataset.load(out).candidates("test")[0]) == 10


def test_prepare_from_yaml_config(tmp_path, capsys):
    config = tmp_path / "prep.yaml"
    config.write_text(f"format: synthetic\nout: {tmp_path / 'd'}\nsynthetic_users: 50\nseed: 3\n")
    code, stdout, _ = run(["data", "prepare", "--config", str(config)], capsys)
    assert code == 0 and json.loads(stdout)["users"] == 50
    assert PreparedDataset.load(tmp_path / "d").meta["seed"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "prepare", "--format", "rows", "--input", "{tmp}/nope", "--out", "{tmp}/o"], "nope"),
        (["data", "prepare", "--format", "synthetic", "--out", "{tmp}/o", "--num-candidates", "500"], "larger than the catalogue"),
        (["data", "prepare", "--format", "csv", "--out", "{tmp}/o"], "--input is required"),
        (["data", "stats", "{tmp}"], "not a prepared dataset"),
        (["data", "prepare", "--config", "{tmp}/bad.yaml"], "unknown key 'num_candidate'; did you mean 'num_candidates'"),
        (["data", "nonsense"], "expected one of: prepare, stats"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "bad.yaml").write_text("format: synthetic\nout: x\nnum_candidate: 5\n")
    code, _, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_refuses_to_replace_a_different_dataset(tmp_path, capsys):
    base = ["data", "prepare", "--format", "synthetic", "--out", str(tmp_path / "d"), "--synthetic-users", "40"]
    assert run(base, capsys)[0] == 0
    before = PreparedDataset.load(tmp_path / "d").fingerprint
    code, _, err = run(base + ["--seed", "9"], capsys)
    assert code == 2 and "--overwrite" in err
    assert PreparedDataset.load(tmp_path / "d").fingerprint == before
    assert run(base + ["--seed", "9", "--overwrite"], capsys)[0] == 0
    assert PreparedDataset.load(tmp_path / "d").fingerprint != before


def check_candidates(dataset):
    for split in ("valid", "test"):
        for inst, cands in zip(dataset.instances(split), dataset.candidates(split)):
            assert len(set(cands)) == dataset.num_candidates and inst.target in cands
            assert not set(cands) & set(inst.history)


def test_real_lastfm_prepares_with_the_documented_counts(tmp_path):
    from delrec.data.loaders import load_raw
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig

    ds = prepare_dataset(load_raw("rows", shared_data("lastfm")), PreprocessConfig(), tmp_path / "lastfm")
    stats = ds.stats()
    assert stats["items"] == 4606 and stats["instances"] == {"train": 50800, "valid": 122, "test": 122}
    # users are inferred as sequences no other row continues; one training user's whole sequence
    # is continued by another user's rows, so 975 of the 976 training users are counted
    assert stats["users"] == 975 + 122 + 122
    assert ds.titles[0] == "Morcheeba"
    check_candidates(ds)
    assert ds.fingerprint == "0627d1ca784b6c03"  # the bytes every delrec wrote before the Arrow data layer


@pytest.mark.slow  # prepares the 50,546-user games data (~8 s)
def test_real_games_prepares_with_the_documented_counts(tmp_path):
    from delrec.data.loaders import load_raw
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig

    ds = prepare_dataset(load_raw("recbole", shared_data("games")), PreprocessConfig(), tmp_path / "games")
    stats = ds.stats()
    assert stats["users"] == 50546 and stats["items"] == 16859
    assert stats["instances"] == {"train": 50546, "valid": 50546, "test": 50546}
    first = ds.instances("test")[0]
    assert ds.items[first.target]["raw_id"] == "14" and len(first.history) == 14
    check_candidates(ds)
    assert ds.fingerprint == "c8bb345797883aa6"  # the bytes the line-by-line data layer wrote: the Arrow reader
    # (which reads this file) and the columnar preprocessing must not change one
