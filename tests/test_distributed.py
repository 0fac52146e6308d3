"""Both DELRec stages under `accelerate launch` with 2 CPU processes (DDP over gloo) match one process.

Same seed, same global batch: the logged training values (loss, gradient norm, per-task losses and
weights), the valid and test metrics and the trained weights agree within tolerances measured on
this machine. Stage 1 takes the whole batch of all processes as its batch (stage1.py), so 2 x 2
matches 1 x 4; stage 2's loss is a token mean per micro-batch, as with gradient accumulation
(training.py), so 2 x 2 matches 1 x 2 with 2 accumulation steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


pytestmark = pytest.mark.slow  # about 30 s per test on 2 cores

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
COMMON = ["max_train_instances: 16", "eval_max_instances: 8", "max_steps: 4", "eval_steps: 2", "logging_steps: 1",
          "warmup_steps: 0", "progress: false", "num_threads: 1", "max_length: 512", "device: cpu", "dtype: float32"]
# Measured, 2 processes vs 1 (float32, 2 cores): stage 1 loss and per-task losses within 9.6e-7 (2 float32 steps
# at 7.0), task weights within 3e-8, gradient norms within 1.5e-8, soft rows within 4.5e-8; stage 2 identical
# (differences 0); valid and test metrics identical in both. The tolerances leave a margin of about 20x.
LOG_TOLERANCE = 2e-5
WEIGHT_TOLERANCE = 1e-6


def launch(script: str, config: list[str], out: Path, processes: int, batch: int, accumulation: int = 1) -> Path:
    """Run a stage script under `accelerate launch` with `processes` CPU processes; return its output folder."""
    out.mkdir(parents=True)
    (out.parent / f"{out.name}.yaml").write_text("\n".join([*COMMON, *config, f"out: {out / 'run'}",
                                                            f"per_device_train_batch_size: {batch}",
                                                            f"gradient_accumulation_steps: {accumulation}"]))
    with socket.socket() as probe:  # a free port: other test runs may hold accelerate's default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accelerate_config = REPO / "accelerate_configs" / ("cpu-2proc.yaml" if processes == 2 else "cpu.yaml")
    done = subprocess.run(
        [str(ACCELERATE), "launch", "--config_file", str(accelerate_config), "--main_process_port", str(port),
         str(REPO / "scripts" / script), "--config", str(out.parent / f"{out.name}.yaml")],
        capture_output=True, text=True, timeout=300, cwd=out, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = out / "run" / "checkpoints" / "checkpoint-2"
    assert len(list(checkpoint.glob("rng_state*.pth"))) == processes  # one RNG state per process
    return out / "run"


def last_checkpoint(run: Path) -> Path:
    return max(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def log_history(run: Path) -> list[dict]:
    """The log of the last checkpoint (the last step), without timings."""
    history = json.loads((last_checkpoint(run) / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in entry.items() if not k.endswith("runtime")} for entry in history]


def assert_same_run(two: Path, one: Path, weights_file: str) -> None:
    logs = log_history(two), log_history(one)
    assert [sorted(e) for e in logs[0]] == [sorted(e) for e in logs[1]]  # the same log lines, with the same keys
    assert any("loss" in e for e in logs[0]) and any(k.startswith("eval_") for e in logs[0] for k in e)
    for mine, theirs in zip(*logs):
        for key, value in mine.items():
            if key.startswith("eval_") or key in ("step", "epoch", "learning_rate"):
                assert value == theirs[key], (key, mine, theirs)  # eval metrics: identical rankings
            else:  # loss, grad_norm, loss_<task>, weight_<task>
                assert value == pytest.approx(theirs[key], abs=LOG_TOLERANCE), (key, mine, theirs)
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (two, one)]
    for key in ("valid", "valid_before_training", "test", "global_step"):
        assert metrics[0].get(key) == metrics[1].get(key), key
    assert Path(metrics[0]["best_checkpoint"]).name == Path(metrics[1]["best_checkpoint"]).name
    tensors = [load_file(str(last_checkpoint(run) / weights_file)) for run in (two, one)]
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.allclose(tensors[0][key], tensors[1][key], rtol=0, atol=WEIGHT_TOLERANCE), key


def test_stage1_with_two_processes_matches_one_process_with_the_whole_batch(tiny_llm_data, tiny_llama, tiny_pop,
                                                                           tmp_path):
    config = [f"data: {tiny_llm_data}", f"model_name_or_path: {tiny_llama}", "soft_prompt_tokens: 4",
              f"train_predictions: {tiny_pop / 'train.jsonl'}", f"valid_predictions: {tiny_pop / 'valid.jsonl'}",
              "task_weighting: dynamic"]
    two = launch("distill_pattern.py", config, tmp_path / "two", processes=2, batch=2)
    one = launch("distill_pattern.py", config, tmp_path / "one", processes=1, batch=4)
    assert any("weight_ta" in e and "loss_rps" in e for e in log_history(two))
    assert_same_run(two, one, "soft_prompt.safetensors")


def test_stage2_with_two_processes_matches_one_process_accumulating_two_batches(tiny_llm_data, tiny_llama, tmp_path):
    # no LoRA dropout: the two processes draw the same dropout masks (same seed), one process two different ones
    config = [f"data: {tiny_llm_data}", f"model_name_or_path: {tiny_llama}", "soft_prompt: random",
              "soft_prompt_tokens: 2", "r: 2", "lora_alpha: 4", "lora_dropout: 0.0", "learning_rate: 0.01",
              "test_max_instances: 8"]
    two = launch("finetune.py", config, tmp_path / "two", processes=2, batch=2)
    one = launch("finetune.py", config, tmp_path / "one", processes=1, batch=2, accumulation=2)
    assert_same_run(two, one, "adapter_model.safetensors")
