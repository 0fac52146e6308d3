"""NaN and inf never reach a file, a ranking or an answer: refused, in one line naming the file, where they are
loaded (SR weights, predictions, teacher folders) or produced (scores of a model whose finite weights overflow).

Each case runs `delrec.cli.main` in-process on the session fixtures (the tiny synthetic dataset, a tiny SASRec and
its teacher) edited the way a diverged training or a damaged file leaves them, and asserts exit code 2, one line on
stderr with the file and the key fact, and that nothing was written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_checks import one_line_error, run_cli, snapshot
from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.predictions import meta_path
from delrec.sr import TrainConfig, load_model, train_sr, write_predictions
from distill_fixtures import TINY_SASREC

WEIGHTS = "model.safetensors"
TINY_SASREC_FLAGS = ["--hidden_size", str(TINY_SASREC.hidden_size), "--num_layers", str(TINY_SASREC.num_layers),
                     "--num_heads", str(TINY_SASREC.num_heads), "--inner_size", str(TINY_SASREC.inner_size),
                     "--max_length", str(TINY_SASREC.max_length), "--dropout", str(TINY_SASREC.dropout),
                     "--batch_size", "32", "--epochs", "1", "--no_progress"]








def edited_model(source: Path, folder: Path, edit) -> Path:
    """A copy of SR model folder `source` (config.json + weights) whose weights `edit` changed in place."""
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder / "config.json")
    tensors = load_file(source / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)
    return folder


def resealed_predictions(source: Path, target: Path, line_no: int, token: str) -> Path:
    """A copy of predictions file `source` whose line `line_no` has `token` as its first score, with the sidecar's
    checksum updated: what a delrec that wrote NaN scores left behind (the checksum matches, the JSON is invalid)."""
    lines = source.read_text().splitlines(keepends=True)
    row = json.loads(lines[line_no - 1])
    row["scores"][0] = "@"
    lines[line_no - 1] = json.dumps(row).replace('"@"', token) + "\n"
    target.write_text("".join(lines))
    meta = json.loads(meta_path(source).read_text())
    meta["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    meta_path(target).write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def w(sr_model, sr_teacher, tiny_llm_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")

    def nan_weight(tensors):
        tensors["item_embedding.weight"][3, 0] = float("nan")

    def huge_gain(tensors):  # every weight finite, but the states (and so the scores) overflow to inf
        tensors["final_norm.weight"].fill_(3e38)

    overflow = edited_model(sr_model, root / "overflow", huge_gain)
    scores = load_model(overflow).score_all(torch.tensor([[1, 2, 3]]))
    assert not bool(torch.isfinite(scores).all())  # the case below needs a model that overflows
    preds = root / "predictions"
    dataset = PreparedDataset.load(tiny_llm_data)
    model = load_model(sr_model)
    for split in ("train", "valid"):
        write_predictions(preds / f"{split}.jsonl", model, dataset, split, 10, prefix_predictions=True)
    return SimpleNamespace(data=tiny_llm_data, sr=sr_model, teacher=sr_teacher, preds=preds, overflow=overflow,
                           nan=edited_model(sr_model, root / "nan", nan_weight))


COMMANDS = {
    "sr-predict": lambda model, data, t: ["sr", "predict", "--model", model, "--data", data, "--split", "test",
                                          "--out", t / "p.jsonl"],
    "sr-evaluate": lambda model, data, t: ["sr", "evaluate", "--model", model, "--data", data, "--out", t / "eval"],
    "teacher-export": lambda model, data, t: ["teacher", "export", "--model", model, "--data", data,
                                              "--out", t / "teacher", "--no_progress"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_with_nan_weights_is_refused_where_it_is_loaded(command, w, tmp_path, capsys):
    before = snapshot(w.nan)
    code = run_cli(COMMANDS[command](w.nan, w.data, tmp_path))
    one_line_error(capsys, code, f"{w.nan / WEIGHTS}: tensor 'item_embedding.weight' holds 1 NaN/inf value(s)",
                   "train the model again")
    assert list(tmp_path.iterdir()) == [] and snapshot(w.nan) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_scores_that_overflow_are_refused_before_they_are_written(command, w, tmp_path, capsys):
    """Finite weights pass the load check; the scores they compute are checked where they are produced."""
    code = run_cli(COMMANDS[command](w.overflow, w.data, tmp_path))
    one_line_error(capsys, code, f"{w.overflow}: the SR model gave", "NaN/inf score(s)", "train the model again")
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_model_with_nan_weights_before_it_listens(w, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")

    def listen(*args, **kwargs):
        raise AssertionError("delrec serve started a server for a model with NaN weights")

    monkeypatch.setattr("delrec.serving.serve", listen)
    code = run_cli(["serve", "--model", w.nan, "--data", w.data])
    one_line_error(capsys, code, f"{w.nan / WEIGHTS}: tensor 'item_embedding.weight' holds 1 NaN/inf value(s)")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", '"0.5"'])
def test_stage1_refuses_predictions_with_a_score_that_is_not_a_finite_number(token, w, tiny_llama, tmp_path, capsys):
    bad = resealed_predictions(w.preds / "train.jsonl", tmp_path / "bad-train.jsonl", 2, token)
    out = tmp_path / "stage1"
    code = run_cli(["llm", "distill-pattern", "--data", w.data, "--train_predictions", bad, "--valid_predictions",
                    w.preds / "valid.jsonl", "--out", out, "--soft_prompt_tokens", "2",
                    "--model_name_or_path", tiny_llama])
    one_line_error(capsys, code, f"{bad}:2", token)  # the line and the token, whichever check names them
    assert {p.name for p in out.rglob("*")} <= {"run.json"}  # no checkpoint, no soft prompt


def teacher_with(source: Path, folder: Path, file: str, name: str, edit) -> Path:
    shutil.copytree(source, folder)
    tensors = load_file(folder / file)
    edit(tensors[name])
    save_file(tensors, folder / file)
    return folder


@pytest.mark.parametrize("file, name, expected", [
    ("rankings.safetensors", "scores", "rankings.safetensors: 1 NaN/inf scores (first in row 3, train instance 3)"),
    ("item_embeddings.safetensors", "embeddings",
     "item_embeddings.safetensors: NaN/inf values in the embedding matrix"),
], ids=["scores", "embeddings"])
def test_student_training_refuses_a_teacher_with_nan_or_inf(file, name, expected, w, tmp_path, capsys):
    def spoil(tensor):
        tensor[3, 2] = float("nan") if name == "scores" else float("inf")

    teacher = teacher_with(w.teacher, tmp_path / "teacher", file, name, spoil)
    out = tmp_path / "student"
    code = run_cli(["student", "train", "--data", w.data, "--model", "sasrec", "--out", out, "--teacher", teacher,
                    *TINY_SASREC_FLAGS])
    line = one_line_error(capsys, code, expected)
    assert str(teacher / file) in line
    assert not out.exists()


def test_training_stops_when_a_step_breaks_the_weights_after_a_finite_loss(tiny_llm_data, tmp_path):
    """sqrt at 0: the value is 0 (a finite loss) but the gradient is NaN, so Adam writes NaN weights; one batch per
    epoch, so no later batch shows a NaN loss."""
    def nan_gradient(model, batch, last_states):
        return (last_states.sum() * 0.0).sqrt()

    config = TrainConfig(epochs=2, lr=0.01, batch_size=10_000, progress=False, device="cpu")
    with pytest.raises(DelrecError, match=r"^epoch 1: weight '.+' became NaN/inf \(training diverged\); lower --lr$"):
        train_sr(tiny_llm_data, TINY_SASREC, config, tmp_path / "run", extra_loss=nan_gradient)
    assert not (tmp_path / "run").exists()  # no checkpoint to resume the broken weights from, no model
