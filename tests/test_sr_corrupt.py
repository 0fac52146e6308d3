"""Damaged SR files and a full disk: one line naming the file, exit code 2, nothing lost, nothing half-written.

Model folders (a truncated or garbled model.safetensors or config.json) are refused where they are loaded;
training checkpoints (a pickle that torch's safe loader refuses, a truncated file, entries that do not fit) are
refused on resume, leaving the run folder as it was; a disk that fills while a checkpoint or the weights are
written leaves no partial file, and the same command then resumes from the last complete checkpoint to the
result of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_checks import one_line_error, run_cli, snapshot
from distill_fixtures import TINY_SASREC

WEIGHTS, CONFIG, CHECKPOINT = "model.safetensors", "config.json", Path("checkpoint") / "state.pt"
# The options `sr_model` was trained with (distill_fixtures.train_tiny_sasrec), but for the epochs.
TINY_RUN_FLAGS = ["--model", "sasrec", "--hidden_size", str(TINY_SASREC.hidden_size),
                  "--num_layers", str(TINY_SASREC.num_layers), "--num_heads", str(TINY_SASREC.num_heads),
                  "--inner_size", str(TINY_SASREC.inner_size), "--max_length", str(TINY_SASREC.max_length),
                  "--dropout", str(TINY_SASREC.dropout), "--lr", "0.01", "--batch_size", "32", "--patience", "0",
                  "--seed", "0", "--device", "cpu", "--no_progress"]
SR_MODEL_FLAGS = [*TINY_RUN_FLAGS, "--epochs", "4"]  # `sr_model`'s run, resumed


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_a_tensor(path: Path) -> None:
    tensors = load_file(path)
    del tensors["final_norm.bias"]
    save_file(tensors, path)


def retype_a_tensor(dtype: torch.dtype):
    """model.safetensors with one floating tensor stored as `dtype`, which `load_state_dict` would cast silently."""
    def damage(path: Path) -> None:
        tensors = load_file(path)
        tensors["final_norm.bias"] = tensors["final_norm.bias"].to(dtype)
        save_file(tensors, path)
    return damage


def nan_dropout(path: Path) -> None:
    path.write_text(path.read_text().replace(f'"dropout": {TINY_SASREC.dropout}', '"dropout": NaN'))


def edit_config(**changes):
    """config.json with `changes` made to its fields, as a hand edit would."""
    def damage(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))
    return damage


MODEL_CASES = {
    "truncated-weights": (WEIGHTS, truncate, "model.safetensors: not a readable safetensors file"),
    "empty-weights": (WEIGHTS, lambda p: p.write_bytes(b""), "model.safetensors: not a readable safetensors file"),
    "garbled-weights-header": (WEIGHTS, lambda p: p.write_bytes(p.read_bytes()[:8] + b"{" * 64),
                               "model.safetensors: not a readable safetensors file"),
    "weights-of-another-model": (WEIGHTS, drop_a_tensor,
                                 "model.safetensors: weights do not match config.json (missing ['final_norm.bias']"),
    "integer-weights": (WEIGHTS, retype_a_tensor(torch.int64),
                        "model.safetensors: tensor 'final_norm.bias' is int64, expected a floating-point tensor "
                        "(float32)"),
    "truth-value-weights": (WEIGHTS, retype_a_tensor(torch.bool), "tensor 'final_norm.bias' is bool, expected a "
                            "floating-point tensor"),
    "truncated-config": (CONFIG, truncate, "config.json:"),
    "config-not-an-object": (CONFIG, lambda p: p.write_text("[1, 2]\n"), "config.json: expected a JSON object"),
    "nan-in-config": (CONFIG, nan_dropout, "config.json: invalid JSON (NaN is not a JSON number"),
    "text-for-an-integer": (CONFIG, edit_config(hidden_size=str(TINY_SASREC.hidden_size)),
                            "config.json field 'hidden_size': expected an integer, found text '16'"),
    "a-truth-value-for-a-number": (CONFIG, edit_config(dropout=True),
                                   "config.json field 'dropout': expected a number, found true/false True"),
    "a-list-for-an-integer": (CONFIG, edit_config(num_layers=[1]),
                              "config.json field 'num_layers': expected an integer, found a list [1]"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_a_damaged_model_folder_is_refused_in_one_line(case, sr_model, tiny_llm_data, tmp_path, capsys):
    file, damage, expected = MODEL_CASES[case]
    model = shutil.copytree(sr_model, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint"))
    damage(model / file)
    before = snapshot(model)
    out = tmp_path / "p.jsonl"
    code = run_cli(["sr", "predict", "--model", model, "--data", tiny_llm_data, "--split", "test", "--out", out])
    line = one_line_error(capsys, code, expected)
    assert str(model / file) in line
    assert not out.exists() and snapshot(model) == before


def test_half_precision_weights_still_load(sr_model, tiny_llm_data, tmp_path, capsys):
    """Another float width is a real export, not damage: it is cast, unlike the integer weights above."""
    model = shutil.copytree(sr_model, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint"))
    retype_a_tensor(torch.float16)(model / WEIGHTS)
    out = tmp_path / "p.jsonl"
    code = run_cli(["sr", "predict", "--model", model, "--data", tiny_llm_data, "--split", "test", "--out", out])
    assert code == 0 and out.is_file(), capsys.readouterr().err


def test_the_weights_file_for_the_model_folder_is_named_as_a_file(sr_model, tiny_llm_data, tmp_path, capsys):
    """It was reported as "model folder not found", which sends the user looking for a missing folder."""
    out = tmp_path / "p.jsonl"
    code = run_cli(["sr", "predict", "--model", sr_model / WEIGHTS, "--data", tiny_llm_data, "--split", "test",
                    "--out", out])
    one_line_error(capsys, code, f"{sr_model / WEIGHTS} is a file, expected an SR model folder (the folder holding "
                   "config.json and model.safetensors)")
    assert not out.exists()


SIZE_EDITS = {  # config.json edits whose model would not be the one the weights file holds
    "num_items-of-10**12": ({"num_items": 10**12}, "'item_embedding.weight' is [", "config.json implies "
                            "[1000000000001, 16]"),
    "a-wider-model": ({"hidden_size": 4096, "inner_size": 65536}, "'blocks.0.ffn.0.bias' is [32] in the file, "
                      "config.json implies [65536] (15 more of a wrong shape)"),
    "more-layers": ({"num_layers": 1024}, "(missing ['blocks.1."),
}


@pytest.mark.parametrize("case", SIZE_EDITS)
def test_config_sizes_that_the_weights_do_not_hold_are_refused_before_anything_is_allocated(case, sr_model,
                                                                                          tiny_llm_data, tmp_path,
                                                                                          capsys):
    """The shapes config.json implies are compared with the safetensors header first: a terabyte embedding table
    (or 1024 blocks 4096 wide) is never allocated, only named."""
    changes, *expected = SIZE_EDITS[case]
    model = shutil.copytree(sr_model, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint"))
    edit_config(**changes)(model / CONFIG)
    before, peak = snapshot(model), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = tmp_path / "p.jsonl"
    code = run_cli(["sr", "predict", "--model", model, "--data", tiny_llm_data, "--split", "test", "--out", out])
    one_line_error(capsys, code, f"{model / WEIGHTS}: weights do not match config.json", *expected)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: nothing big was allocated
    assert not out.exists() and snapshot(model) == before


class Foreign:
    """A class torch's safe loader (weights_only) refuses to unpickle."""


def with_state(edit):
    def damage(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return damage


def shrink_weights(state: dict) -> None:
    state["model"] = {name: tensor[:1] for name, tensor in state["model"].items()}


def nan_best_weight(state: dict) -> None:
    state["best_model"]["item_embedding.weight"][2, 1] = float("nan")


CHECKPOINT_CASES = {
    "refused-pickle": (with_state(lambda state: state.update(extra=Foreign())),
                       "state.pt: refused, it holds Python objects other than tensors and plain values"),
    "truncated": (truncate, "state.pt: unreadable checkpoint, truncated or damaged"),
    "missing-entry": (with_state(lambda state: state.pop("rng")),
                      "state.pt: not a delrec training checkpoint (entry 'rng' is missing or not a dict)"),
    "weights-that-do-not-fit": (with_state(shrink_weights),
                                "state.pt: checkpoint does not fit this run (RuntimeError: Error(s) in loading "
                                "state_dict for SASRec: size mismatch"),
    "nan-weights": (with_state(nan_best_weight),
                    "state.pt: 'best_model' tensor 'item_embedding.weight' holds 1 NaN/inf value(s)"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_a_damaged_checkpoint_is_refused_on_resume_and_the_run_folder_kept(case, sr_model, tiny_llm_data, tmp_path,
                                                                           capsys):
    damage, expected = CHECKPOINT_CASES[case]
    run = shutil.copytree(sr_model, tmp_path / "run")
    damage(run / CHECKPOINT)
    before = snapshot(run)
    code = run_cli(["sr", "train", "--data", tiny_llm_data, "--out", run, *SR_MODEL_FLAGS])
    one_line_error(capsys, code, str(run / CHECKPOINT), expected, f"delete {run / 'checkpoint'} to start over")
    assert snapshot(run) == before


# --- a full disk ------------------------------------------------------------------------------------------------

SMALL_RUN_FLAGS = [*TINY_RUN_FLAGS, "--epochs", "2"]


def fill_the_disk_at(monkeypatch, name: str, writes_that_succeed: int) -> None:
    """`os.fsync` (every atomic write syncs its temp file before the rename) fails with ENOSPC for file `name`
    after `writes_that_succeed` writes of it: the disk filled while that file was being written."""
    real, seen = os.fsync, []

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            seen.append(fd)
            if len(seen) > writes_that_succeed:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llm_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full-disk") / "run"
    assert run_cli(["sr", "train", "--data", tiny_llm_data, "--out", out, *SMALL_RUN_FLAGS]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the file behind a descriptor through /proc")
@pytest.mark.parametrize("name, writes_that_succeed, resumed_after", [
    ("state.pt", 1, 1),  # the second epoch's checkpoint
    (WEIGHTS, 0, 2),  # the best model, once training is done
], ids=["checkpoint", "weights"])
def test_a_disk_that_fills_while_sr_files_are_written(name, writes_that_succeed, resumed_after, uninterrupted,
                                                      tiny_llm_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["sr", "train", "--data", tiny_llm_data, "--out", out, *SMALL_RUN_FLAGS]
    with monkeypatch.context() as patch:
        fill_the_disk_at(patch, name, writes_that_succeed)
        code = run_cli(argv)
    line = one_line_error(capsys, code, "No space left on device; no space left on the device; free some space")
    assert f"{out}/" in line and name in line
    assert [p.name for p in out.rglob("*.tmp")] == []  # no partial file, whatever its name
    assert not (out / WEIGHTS).exists() and not (out / CONFIG).exists()
    assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == resumed_after  # the last complete one

    assert run_cli(argv) == 0
    assert f"resuming {out} after epoch {resumed_after}" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("valid", "test", "best_epoch")} == \
        {k: uninterrupted[k] for k in ("valid", "test", "best_epoch")}
