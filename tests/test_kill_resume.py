"""A training stage killed mid-way (SIGKILL) and re-run with the same command ends as an uninterrupted run.

The command runs in a subprocess of the console script, is killed as soon as its first checkpoint
appears, and the same command is run again: it resumes from the checkpoint. CPU, one thread, fixed
seed: the final weights are bit-identical to those of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from delrec.cli import main
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.llm.run_folder import last_complete_checkpoint

SCRIPT = Path(sys.executable).with_name("delrec")
EPOCHS = 4
SR_FLAGS = ["--model", "sasrec", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "1", "--inner_size", "64",
            "--max_length", "30", "--epochs", str(EPOCHS), "--lr", "0.005", "--batch_size", "64", "--patience", "0",
            "--seed", "0", "--device", "cpu", "--num_threads", "1", "--no_progress"]
SR_KEYS = ("valid", "test", "candidates", "best_epoch", "epochs_run")
STAGE2_KEYS = ("global_step", "valid", "test")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    raw = make_synthetic(num_users=300, num_items=100, seed=0)
    return prepare_dataset(raw, PreprocessConfig(num_candidates=10), tmp_path_factory.mktemp("kill") / "data").path


def kill_after(argv: list[str], marker, timeout: float = 240.0) -> None:
    """Run the console script with `argv`, SIGKILL it as soon as `marker()` is true; fail if it finished first."""
    process = subprocess.Popen([str(SCRIPT), *map(str, argv)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    while not marker():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before it could be killed: "
                        f"{process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint within {timeout} s")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def trainer_log(out: Path) -> list[dict]:
    """The log history of the last complete Trainer checkpoint (evaluations with their run times)."""
    return json.loads((Path(last_complete_checkpoint(out / "checkpoints")) / "trainer_state.json").read_text())[
        "log_history"]


def results(out: Path, keys=SR_KEYS) -> dict:
    """The outcome in OUT/metrics.json, without its timings."""
    metrics = json.loads((out / "metrics.json").read_text())
    return {key: metrics[key] for key in keys}


def test_sr_train_killed_after_its_first_checkpoint_resumes_to_the_same_model(data, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    argv = ["sr", "train", "--data", str(data), "--out", str(killed), *SR_FLAGS]
    state = killed / "checkpoint" / "state.pt"
    kill_after(argv, state.is_file)
    assert not (killed / "metrics.json").exists()
    done_before = torch.load(state, weights_only=True)["log"]
    assert len(done_before) < EPOCHS  # killed mid-way
    assert main(argv) == 0  # the same command: resumes
    resumed_log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert resumed_log[:len(done_before)] == done_before  # the killed run's epochs (timings too) were kept
    assert main(["sr", "train", "--data", str(data), "--out", str(straight), *SR_FLAGS]) == 0
    assert results(killed) == results(straight)
    assert (killed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def test_a_checkpoint_cut_short_by_a_kill_is_skipped(tmp_path):
    """The Trainer writes trainer_state.json last: a newer checkpoint without it was cut short by a kill."""
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "missing") is None


@pytest.mark.slow  # two stage-2 subprocesses (~7 s)
def test_stage2_killed_after_its_first_checkpoint_resumes_to_the_same_adapter(tiny_llm_data, tiny_llama, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    flags = ["--data", str(tiny_llm_data), "--model_name_or_path", str(tiny_llama), "--soft_prompt", "random",
             "--soft_prompt_tokens", "2", "--r", "2", "--lora_alpha", "4", "--max_train_instances", "16",
             "--eval_max_instances", "4", "--test_max_instances", "4", "--max_length", "512",
             "--per_device_train_batch_size", "4", "--max_steps", "6", "--eval_steps", "2", "--logging_steps", "2",
             "--warmup_steps", "0", "--learning_rate", "0.01", "--device", "cpu", "--dtype", "float32",
             "--num_threads", "1", "--no_progress"]
    argv = ["llm", "finetune", "--out", str(killed), *flags]
    kill_after(argv, lambda: last_complete_checkpoint(killed / "checkpoints") is not None)
    assert not (killed / "metrics.json").exists()
    done_before = trainer_log(killed)
    assert main(argv) == 0
    assert trainer_log(killed)[:len(done_before)] == done_before  # resumed: the evaluations before the kill kept
    assert main(["llm", "finetune", "--out", str(straight), *flags]) == 0
    assert results(killed, STAGE2_KEYS) == results(straight, STAGE2_KEYS)
    adapters = [load_file(str(out / "adapter_model.safetensors")) for out in (killed, straight)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
