"""`delrec sr predict --user_states`: the SR model's state per history and its item table, whose product is exactly
its score of every item (so the LLM side can read the SR model's view of a user, and its order over any candidate
set, from files alone); bad or mismatched files are refused in one line."""

import json

import pytest
import torch

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.predictions import read_predictions, read_user_states, user_states_path
from delrec.sr import load_model
from cli_checks import run_cli as run
from sr_fixtures import TINY_FLAGS


@pytest.fixture(scope="module", params=["sasrec", "gru4rec", "caser"])
def predicted(request, sr_data, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    flags = TINY_FLAGS if request.param == "sasrec" else [
        "--hidden_size", "16", "--epochs", "3", "--lr", "0.01", "--batch_size", "32", "--no_progress",
        "--num_threads", "1"]
    assert run(["sr", "train", "--data", str(sr_data), "--model", request.param, "--out", str(out / "model"),
                *flags]) == 0
    assert run(["sr", "predict", "--model", str(out / "model"), "--data", str(sr_data), "--split", "valid",
                "--topk", "5", "--user_states", "--device", "cpu", "--out", str(out / "valid.jsonl")]) == 0
    return out


def test_states_times_the_item_table_are_the_models_scores(predicted, sr_data):
    dataset = PreparedDataset.load(sr_data)
    states = read_user_states(predicted / "valid.jsonl", dataset, "valid")
    model = load_model(predicted / "model").eval()
    instances = dataset.instances("valid")
    assert states.states.shape == (len(instances), states.dim) and states.item_table.shape[0] == dataset.num_items
    with torch.no_grad():
        for index in (0, len(instances) // 2, len(instances) - 1):
            history = torch.tensor([list(instances[index].history)[-model.context_length:]])
            expected = model.score_all(history)[0]
            got = states.scores([index], [list(range(dataset.num_items))])[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the predictions file's top-k is their order (history items excluded)
    predictions = read_predictions(predicted / "valid.jsonl", dataset, "valid")
    row = 3
    scores = states.scores([row], [predictions.items[row]])[0]
    assert scores.tolist() == pytest.approx(predictions.scores[row], rel=1e-5, abs=1e-5)


def test_a_changed_or_missing_states_file_is_refused_in_one_line(predicted, sr_data, tmp_path):
    dataset = PreparedDataset.load(sr_data)
    copy = tmp_path / "valid.jsonl"
    for suffix in ("", ".meta.json", ".states.safetensors"):
        (tmp_path / f"valid.jsonl{suffix}").write_bytes((predicted / f"valid.jsonl{suffix}").read_bytes())
    with pytest.raises(DelrecError, match="holds predictions for the valid split|split"):
        read_user_states(copy, dataset, "test")
    data = bytearray(user_states_path(copy).read_bytes())
    data[-1] ^= 1
    user_states_path(copy).write_bytes(bytes(data))
    with pytest.raises(DelrecError, match=r"states.safetensors: content does not match .* --user_states"):
        read_user_states(copy, dataset, "valid")
    user_states_path(copy).unlink()
    with pytest.raises(DelrecError, match="user-states file not found"):
        read_user_states(copy, dataset, "valid")


def test_predictions_without_states_say_how_to_write_them(predicted, sr_data, tmp_path):
    out = tmp_path / "plain.jsonl"
    assert run(["sr", "predict", "--model", str(predicted / "model"), "--data", str(sr_data), "--split", "valid",
                "--device", "cpu", "--out", str(out)]) == 0
    assert not user_states_path(out).exists() and "user_states" not in json.loads(
        (tmp_path / "plain.jsonl.meta.json").read_text())
    with pytest.raises(DelrecError, match=r"written without user states.*`delrec sr predict --split valid "
                                          r"--user_states`"):
        read_user_states(out, PreparedDataset.load(sr_data), "valid")


def test_a_popularity_model_has_no_states(sr_data, tmp_path, capsys):
    assert run(["sr", "train", "--data", str(sr_data), "--model", "pop", "--out", str(tmp_path / "pop"),
                "--no_progress"]) == 0
    capsys.readouterr()
    assert main(["sr", "predict", "--model", str(tmp_path / "pop"), "--data", str(sr_data), "--split", "valid",
                 "--user_states", "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "popularity model, which keeps no state per user" in err
    assert not (tmp_path / "p.jsonl").exists()
