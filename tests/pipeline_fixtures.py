"""One small end-to-end `delrec run` on synthetic data, and the helpers that read a run folder, for the pipeline
tests (tests/test_pipeline.py, tests/test_pipeline_fingerprint.py).

Registered for every test module by tests/conftest.py: a test names `pipeline_run` (read-only) or `pipeline_copy`
(a copy to change) as an argument. The run is module-scoped, as when each of those modules defined it: a module
that runs `delrec run` again on it (test_pipeline.py) leaves the other module's run as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from delrec.cli import main

CONFIG = {
    "threads": 1,
    "data": {"format": "synthetic", "synthetic_users": 60, "synthetic_items": 40, "synthetic_min_length": 5,
             "synthetic_max_length": 9, "num_candidates": 8},
    "sr": {"pop": {"model": "pop"}, "sasrec": {"model": "sasrec", "hidden_size": 16, "num_layers": 1, "epochs": 2}},
    "predictions": {"model": "sasrec", "topk": 10},
    "llm": {"pretrain_steps": 2, "batch_size": 4, "block_size": 64, "max_position_embeddings": 512,
            "dtype": "float32", "device": "cpu"},
    "stage1": {"soft_prompt_tokens": 4, "max_train_instances": 8, "eval_max_instances": 4, "max_length": 512,
               "max_steps": 2, "per_device_train_batch_size": 4, "eval_steps": 1, "logging_steps": 1},
    "stage2": {"variants": ["stage1", "none"], "r": 2, "lora_alpha": 4, "max_train_instances": 8, "eval_max_instances": 4,
               "test_max_instances": 4, "max_length": 512, "max_steps": 2, "per_device_train_batch_size": 4,
               "eval_steps": 1, "logging_steps": 1},
    "rank": {"backends": ["hf"], "max_instances": 12, "hf": {"device": "cpu"}},
    "teacher": {"llm": {"model": "stage2/stage1", "mode": "grounding", "topk": 10, "max_new_tokens": 4,
                        "device": "cpu"},
                "sasrec": {"model": "sr/sasrec", "topk": 10}},
    "students": {"model": "sasrec", "hidden_size": 8, "num_layers": 1, "epochs": 2, "device": "cpu",
                 "runs": {"alone": {"method": "none"}, "distilled": {"method": "dllm2rec", "teacher": ["llm"]}}},
    "latency": {"users": 10, "repeats": 2, "topk": 10},
    "report": {"full_k": 10},
}


def write_config(folder: Path, config: dict, name: str = "pipeline.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def records(run: Path) -> dict[str, dict]:
    """Each stage's record (`STAGE_FILE`) in run folder `run`."""
    from delrec.pipeline import STAGE_FILE, STAGES

    return {s: json.loads((run / s / STAGE_FILE).read_text()) for s in STAGES}


def plan_lines(capsys, config: Path, run: Path, *extra: str) -> dict[str, str]:
    """`delrec run --dry-run`: stage -> 'action reason'."""
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run), "--dry-run", *extra]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    return {line.split()[0]: " ".join(line.split()[1:]) for line in lines}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """(config file, run folder) of one whole run of `CONFIG`."""
    folder = tmp_path_factory.mktemp("pipeline")
    config = write_config(folder, CONFIG)
    run = folder / "run"
    assert main(["run", str(config), "--out", str(run)]) == 0
    return config, run


@pytest.fixture
def pipeline_copy(pipeline_run, tmp_path):
    """A copy of the finished run to change (paths inside model folders still point at the original, which stays)."""
    config, run = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return config, copy
