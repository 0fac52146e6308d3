"""`delrec sr train | evaluate | predict`: files written, metrics agree, bad input exits 2 in one line."""

import json
from pathlib import Path

import pytest

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.metrics import metrics_from_ranked_lists
from delrec.predictions import read_predictions
from delrec.sr import load_model
from sr_fixtures import TINY_FLAGS


def run(args):
    try:
        return main(args)
    except SystemExit as exc:  # argparse errors
        return exc.code


@pytest.fixture(scope="module")
def trained(sr_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sasrec"
    assert run(["sr", "train", "--data", str(sr_data), "--model", "sasrec", "--out", str(out), *TINY_FLAGS]) == 0
    return out


def test_train_writes_model_and_metrics(trained, capsys):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["protocol"] == "full" and metrics["epochs_run"] == 3
    assert metrics["model_config"]["hidden_size"] == 16 and metrics["train_config"]["lr"] == 0.01
    assert json.loads((trained / "config.json").read_text())["model_type"] == "sasrec"


def test_evaluate_prints_and_writes_the_same_metrics(trained, sr_data, tmp_path, capsys):
    capsys.readouterr()
    assert run(["sr", "evaluate", "--model", str(trained), "--data", str(sr_data), "--out", str(tmp_path),
                "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "evaluation.json").read_text())
    trained_metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("valid", "test", "candidates"):
        assert printed[key] == written[key] == trained_metrics[key]


def test_evaluate_in_the_model_folder_keeps_the_training_metrics(trained, sr_data, capsys):
    before = (trained / "metrics.json").read_bytes()
    assert run(["sr", "evaluate", "--model", str(trained), "--data", str(sr_data), "--device", "cpu",
                "--keep_history"]) == 0
    assert (trained / "metrics.json").read_bytes() == before
    evaluation = json.loads((trained / "evaluation.json").read_text())
    assert evaluation["exclude_history"] is False and "best_epoch" in json.loads(before)
    (trained / "evaluation.json").unlink()


def test_predictions_reproduce_metrics_json(trained, sr_data, tmp_path):
    dataset = PreparedDataset.load(sr_data)
    metrics = json.loads((trained / "metrics.json").read_text())
    for split in ("valid", "test"):
        path = tmp_path / f"{split}.jsonl"
        assert run(["sr", "predict", "--model", str(trained), "--data", str(sr_data), "--split", split,
                    "--topk", "20", "--out", str(path)]) == 0
        predictions = read_predictions(path, dataset, split)
        assert predictions.meta["topk"] == 20 and predictions.meta["model"]["model_type"] == "sasrec"
        instances = dataset.instances(split)
        for items, inst in zip(predictions.items, instances):
            assert len(items) == 20 and not set(items) & set(inst.history)  # history excluded
        from_file = metrics_from_ranked_lists(predictions.items, [inst.target for inst in instances])
        assert from_file == pytest.approx(metrics[split], abs=1e-12)


def test_predictions_reader_validates_the_file(trained, sr_data, tmp_path):
    dataset = PreparedDataset.load(sr_data)
    path = tmp_path / "p.jsonl"
    assert run(["sr", "predict", "--model", str(trained), "--data", str(sr_data), "--split", "valid",
                "--topk", "5", "--out", str(path), "--keep_history"]) == 0
    assert len(read_predictions(path, dataset, "valid")) == len(dataset.instances("valid"))
    with pytest.raises(DelrecError, match="holds predictions for split 'valid', expected 'test'"):
        read_predictions(path, dataset, "test")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DelrecError, match="content does not match"):
        read_predictions(path, dataset, "valid")
    meta = json.loads((tmp_path / "p.jsonl.meta.json").read_text())
    (tmp_path / "p.jsonl.meta.json").write_text(json.dumps({**meta, "dataset_fingerprint": "0" * 16}))
    with pytest.raises(DelrecError, match="predictions were made on dataset 0000000000000000"):
        read_predictions(path, dataset, "valid")
    (tmp_path / "p.jsonl.meta.json").unlink()
    with pytest.raises(DelrecError, match="not a delrec predictions file"):
        read_predictions(path, dataset, "valid")


def test_model_options_come_from_a_yaml_config(sr_data, tmp_path):
    config = tmp_path / "gru.yaml"
    config.write_text("model: gru4rec\nhidden_size: 8\ngru_size: 12\nepochs: 1\nprogress: false\nnum_threads: 1\n")
    out = tmp_path / "gru"
    assert run(["sr", "train", "--config", str(config), "--data", str(sr_data), "--out", str(out)]) == 0
    model = load_model(out)  # the trained weights have the file's sizes, and one epoch was run
    assert model.model_type == "gru4rec" and model.gru.hidden_size == 12
    assert model.item_embeddings().shape == (PreparedDataset.load(sr_data).num_items, 8)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "caser"])
def test_shipped_configs_train(name, sr_data, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "sr" / f"{name}.yaml"
    out = tmp_path / name
    assert run(["sr", "train", "--config", str(config), "--data", str(sr_data), "--out", str(out), "--epochs", "1",
                "--no_progress", "--num_threads", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == name


def bad_cases(sr_data, trained, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(
        json.dumps({**json.loads((trained / "config.json").read_text()), "format_version": 0})
    )
    (old / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes())
    wrong_key = tmp_path / "wrong.yaml"
    wrong_key.write_text("model: gru4rec\nnum_heads: 2\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: sasrec\nhiden_size: 2\n")
    train = ["sr", "train", "--data", str(sr_data), "--out", str(tmp_path / "o")]
    return {
        "not a dataset": (["sr", "train", "--data", str(tmp_path), "--model", "sasrec", "--out", str(tmp_path / "o")],
                          "not a prepared dataset"),
        "unknown model": ([*train, "--model", "bert4rec"], "unknown model 'bert4rec'"),
        "other model's key": ([*train, "--config", str(wrong_key)], "key 'num_heads' is not an option of model 'gru4rec'"),
        "unknown yaml key": ([*train, "--config", str(typo)], "unknown key 'hiden_size'; did you mean 'hidden_size'"),
        "unknown flag": ([*train, "--model", "caser", "--num_heads", "2"], "unrecognized arguments"),
        "hf folder": (["sr", "evaluate", "--model", str(hf), "--data", str(sr_data)], "Hugging Face model folder"),
        "old version": (["sr", "evaluate", "--model", str(old), "--data", str(sr_data)], "field 'format_version' must be a positive integer, got 0"),
        "topk": (["sr", "predict", "--model", str(trained), "--data", str(sr_data), "--split", "test",
                  "--topk", "51", "--out", str(tmp_path / "p.jsonl")], "--topk 51 must be between 1 and"),
        "resume other config": (["sr", "train", "--data", str(sr_data), "--model", "sasrec", "--out", str(trained),
                                 *TINY_FLAGS, "--lr", "0.5"], "cannot resume"),
    }


@pytest.mark.parametrize(
    "case",
    ["not a dataset", "unknown model", "other model's key", "unknown yaml key", "unknown flag", "hf folder", "old version", "topk",
     "resume other config"],
)
def test_bad_input_exits_2_with_one_line(case, sr_data, trained, tmp_path, capsys):
    argv, message = bad_cases(sr_data, trained, tmp_path)[case]
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "p.jsonl").exists()


def test_predictions_reader_refuses_an_item_ranked_twice(trained, sr_data, tmp_path):
    """A resealed file (checksum matching) whose first ranking names one item twice: no ranking can."""
    import hashlib

    dataset = PreparedDataset.load(sr_data)
    path = tmp_path / "p.jsonl"
    assert run(["sr", "predict", "--model", str(trained), "--data", str(sr_data), "--split", "valid",
                "--topk", "5", "--out", str(path)]) == 0
    lines = path.read_text().splitlines(keepends=True)
    row = json.loads(lines[0])
    row["items"][1] = row["items"][0]
    lines[0] = json.dumps(row) + "\n"
    path.write_text("".join(lines))
    meta = json.loads((tmp_path / "p.jsonl.meta.json").read_text())
    (tmp_path / "p.jsonl.meta.json").write_text(json.dumps({**meta, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))
    with pytest.raises(DelrecError, match=rf"p.jsonl:1 field 'items': item id {row['items'][0]} is ranked twice"):
        read_predictions(path, dataset, "valid")


def test_predict_never_replaces_a_file_of_the_model_it_reads_nor_writes_a_file_for_a_folder(trained, sr_data,
                                                                                               tmp_path, capsys):
    """`--out MODEL/model.safetensors --overwrite` destroyed the weights being read; `--out new/` wrote a file."""
    import shutil

    model = shutil.copytree(trained, tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    base = ["sr", "predict", "--model", str(model), "--data", str(sr_data), "--split", "valid"]
    capsys.readouterr()
    assert run([*base, "--out", str(model / "model.safetensors"), "--overwrite"]) == 2
    assert "is a file of the model folder" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == weights
    assert run([*base, "--out", str(tmp_path / "new") + "/"]) == 2
    assert "names a folder; expected the path of a predictions file" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert run([*base, "--out", str(model / "valid.jsonl")]) == 0  # new files beside the model are fine
