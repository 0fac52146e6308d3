"""The real pretrained LLM (Gemma 3 270M, from the `[gemma]` extra) and the DELRec folders built on it.

Registered for every test module by tests/conftest.py. Everything is built once per test session, lazily,
whichever modules ask: the imported folder (the
`delrec llm import gemma-3-270m` CLI itself, about 90 s on 2 cores, the only GGUF conversion of the
run), a small synthetic dataset (12 users, 6 candidates: a few seconds of Gemma per read-out),
popularity predictions, then stage 1, stage 2 and the export, each with a handful of steps.
Without the extra every test using them skips with the install hint; DELREC_REQUIRE_GEMMA=1 (CI)
turns that skip into a failure. Tests must not modify the folders.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

from delrec.cli import main
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.llm.gguf_import import INSTALL_HINT, PACKAGED_MODELS
from delrec.llm.loading import LoraSettings, ModelConfig
from llm_fixtures import write_pop_predictions

if TYPE_CHECKING:
    from delrec.llm.run_folder import StageResult

NAME = "gemma-3-270m"
SOFT_TOKENS = 4
MAX_LENGTH = 512
FAST = dict(per_device_train_batch_size=2, max_steps=2, eval_steps=2, logging_steps=1, progress=False,
            eval_batch_size=8, warmup_steps=0.0)


class StageRun(NamedTuple):
    folder: Path
    result: StageResult  # the summary, and the trainer holding the trained model


def require_gemma() -> None:
    missing = [name for name in ("gguf", PACKAGED_MODELS[NAME].module) if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"the real-LLM tests need {', '.join(missing)}: {INSTALL_HINT}"
        if os.environ.get("DELREC_REQUIRE_GEMMA") == "1":
            pytest.fail(f"DELREC_REQUIRE_GEMMA=1 but {reason}")
        pytest.skip(reason)


def model_config(folder) -> ModelConfig:
    return ModelConfig(str(folder), dtype="float32", device="cpu")


def run_stage1(out: Path, model: ModelConfig, data: Path, pop: Path, **settings) -> StageResult:
    """Stage 1 on the real model from the popularity predictions in `pop`, FAST settings with `settings` over them."""
    from delrec.llm.stage1 import DistillArguments, distill_pattern
    from delrec.llm.trainer import TrainingSettings

    args = DistillArguments(data=str(data), train_predictions=str(pop / "train.jsonl"),
                            valid_predictions=str(pop / "valid.jsonl"), out=str(out),
                            soft_prompt_tokens=SOFT_TOKENS, max_train_instances=4, eval_max_instances=2,
                            max_length=MAX_LENGTH)
    return distill_pattern(args, model, TrainingSettings(**{**FAST, **settings}))


def run_stage2(out: Path, model: ModelConfig, data: Path, stage1: Path, **settings) -> StageResult:
    """Stage 2 on the real model (LoRA r 4 on q and v), FAST settings with `settings` over them."""
    from delrec.llm.stage2 import FinetuneArguments, finetune
    from delrec.llm.trainer import TrainingSettings

    args = FinetuneArguments(data=str(data), out=str(out), stage1=str(stage1), max_train_instances=4,
                             eval_max_instances=2, test_max_instances=4, max_length=MAX_LENGTH)
    lora = LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return finetune(args, model, lora, TrainingSettings(**{**FAST, "learning_rate": 1e-3, **settings}))


def _check(code: int) -> None:
    assert code == 0, f"delrec exited with {code}"


def _folder(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.mktemp("gemma") / name


@pytest.fixture(scope="session")
def gemma(tmp_path_factory) -> Path:
    """The folder `delrec llm import gemma-3-270m` wrote."""
    require_gemma()
    out = _folder(tmp_path_factory, "model")
    _check(main(["llm", "import", NAME, "--out", str(out)]))
    return out


@pytest.fixture(scope="session")
def gemma_data(tmp_path_factory) -> Path:
    out = _folder(tmp_path_factory, "data")
    raw = make_synthetic(num_users=12, num_items=24, min_length=4, max_length=7, seed=3)
    prepare_dataset(raw, PreprocessConfig(num_candidates=6), out)
    return out


@pytest.fixture(scope="session")
def gemma_pop(gemma_data, tmp_path_factory) -> Path:
    """A popularity model (`model/`) and its train/valid predictions on `gemma_data`."""
    return write_pop_predictions(gemma_data, _folder(tmp_path_factory, "pop"))


@pytest.fixture(scope="session")
def gemma_stage1_run(gemma, gemma_data, gemma_pop, tmp_path_factory) -> StageRun:
    out = _folder(tmp_path_factory, "stage1")
    return StageRun(out, run_stage1(out, model_config(gemma), gemma_data, gemma_pop))


@pytest.fixture(scope="session")
def gemma_stage2_run(gemma, gemma_data, gemma_stage1, tmp_path_factory) -> StageRun:
    out = _folder(tmp_path_factory, "stage2")
    return StageRun(out, run_stage2(out, model_config(gemma), gemma_data, gemma_stage1))


@pytest.fixture(scope="session")
def gemma_stage1(gemma_stage1_run) -> Path:
    return gemma_stage1_run.folder


@pytest.fixture(scope="session")
def gemma_stage2(gemma_stage2_run) -> Path:
    return gemma_stage2_run.folder


@pytest.fixture(scope="session")
def gemma_export(gemma_stage2, tmp_path_factory) -> Path:
    out = _folder(tmp_path_factory, "export")
    _check(main(["export", "--model", str(gemma_stage2), "--out", str(out)]))
    return out
