"""The real pretrained LLM (Gemma 3 270M, from the `[gemma]` extra) and the DELRec folders built on it.

Everything is built once per test session, lazily, whichever modules ask: the imported folder (the
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

import pytest

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.llm.gguf_import import INSTALL_HINT, PACKAGED_MODELS
from delrec.llm.loading import LoraSettings, ModelConfig
from delrec.llm.trainer import TrainingSettings

NAME = "gemma-3-270m"
SOFT_TOKENS = 4
MAX_LENGTH = 512
FAST = dict(per_device_train_batch_size=2, max_steps=2, eval_steps=2, logging_steps=1, progress=False,
            eval_batch_size=8, warmup_steps=0.0)
_built: dict[str, Path] = {}
results: dict = {}  # the StageResult (summary + trainer with the trained model) of each stage built


def require_gemma() -> None:
    missing = [name for name in ("gguf", PACKAGED_MODELS[NAME].module) if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"the real-LLM tests need {', '.join(missing)}: {INSTALL_HINT}"
        if os.environ.get("DELREC_REQUIRE_GEMMA") == "1":
            pytest.fail(f"DELREC_REQUIRE_GEMMA=1 but {reason}")
        pytest.skip(reason)


def _once(name: str, tmp_path_factory, make) -> Path:
    if name not in _built:
        path = tmp_path_factory.mktemp("gemma") / name
        make(path)
        _built[name] = path
    return _built[name]


def gemma_path(tmp_path_factory) -> Path:
    require_gemma()
    return _once("model", tmp_path_factory, lambda out: _check(main(["llm", "import", NAME, "--out", str(out)])))


def gemma_data_path(tmp_path_factory) -> Path:
    def make(out):
        raw = make_synthetic(num_users=12, num_items=24, min_length=4, max_length=7, seed=3)
        prepare_dataset(raw, PreprocessConfig(num_candidates=6), out)

    return _once("data", tmp_path_factory, make)


def model_config(folder) -> ModelConfig:
    return ModelConfig(str(folder), dtype="float32", device="cpu")


def predictions_path(tmp_path_factory) -> Path:
    from delrec.sr import PopConfig, TrainConfig, load_model, train_sr, write_predictions

    data = gemma_data_path(tmp_path_factory)

    def make(out):
        train_sr(data, PopConfig(), TrainConfig(epochs=1, progress=False, device="cpu"), out / "model")
        model, dataset = load_model(out / "model", "cpu"), PreparedDataset.load(data)
        for split in ("train", "valid"):
            write_predictions(out / f"{split}.jsonl", model, dataset, split, 10, prefix_predictions=True)

    return _once("pop", tmp_path_factory, make)


def run_stage1(tmp_path_factory, out: Path, model: ModelConfig, **settings):
    """Stage 1 on the real model, FAST settings with `settings` over them."""
    from delrec.llm.stage1 import DistillArguments, distill_pattern

    data, predictions = gemma_data_path(tmp_path_factory), predictions_path(tmp_path_factory)
    args = DistillArguments(data=str(data), train_predictions=str(predictions / "train.jsonl"),
                            valid_predictions=str(predictions / "valid.jsonl"), out=str(out),
                            soft_prompt_tokens=SOFT_TOKENS, max_train_instances=4, eval_max_instances=2,
                            max_length=MAX_LENGTH)
    return distill_pattern(args, model, TrainingSettings(**{**FAST, **settings}))


def run_stage2(tmp_path_factory, out: Path, model: ModelConfig, **settings):
    """Stage 2 on the real model (LoRA r 4 on q and v), FAST settings with `settings` over them."""
    from delrec.llm.stage2 import FinetuneArguments, finetune

    args = FinetuneArguments(data=str(gemma_data_path(tmp_path_factory)), out=str(out),
                             stage1=str(stage1_path(tmp_path_factory)), max_train_instances=4, eval_max_instances=2,
                             test_max_instances=4, max_length=MAX_LENGTH)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    return finetune(args, model, lora, TrainingSettings(**{**FAST, "learning_rate": 1e-3, **settings}))


def stage1_path(tmp_path_factory) -> Path:
    model = model_config(gemma_path(tmp_path_factory))

    def make(out):
        results["stage1"] = run_stage1(tmp_path_factory, out, model)

    return _once("stage1", tmp_path_factory, make)


def stage2_path(tmp_path_factory) -> Path:
    model = model_config(gemma_path(tmp_path_factory))

    def make(out):
        results["stage2"] = run_stage2(tmp_path_factory, out, model)

    return _once("stage2", tmp_path_factory, make)


def export_path(tmp_path_factory) -> Path:
    stage2 = stage2_path(tmp_path_factory)
    return _once("export", tmp_path_factory, lambda out: _check(main(["export", "--model", str(stage2), "--out",
                                                                       str(out)])))


def _check(code: int) -> None:
    assert code == 0, f"delrec exited with {code}"


@pytest.fixture(scope="session")
def gemma(tmp_path_factory) -> Path:
    """The folder `delrec llm import gemma-3-270m` wrote."""
    return gemma_path(tmp_path_factory)


@pytest.fixture(scope="session")
def gemma_data(tmp_path_factory) -> Path:
    return gemma_data_path(tmp_path_factory)


@pytest.fixture(scope="session")
def gemma_pop(tmp_path_factory) -> Path:
    """A popularity model (`model/`) and its train/valid predictions on `gemma_data`."""
    return predictions_path(tmp_path_factory)


@pytest.fixture(scope="session")
def gemma_stage1(tmp_path_factory) -> Path:
    return stage1_path(tmp_path_factory)


@pytest.fixture(scope="session")
def gemma_stage2(tmp_path_factory) -> Path:
    return stage2_path(tmp_path_factory)


@pytest.fixture(scope="session")
def gemma_export(tmp_path_factory) -> Path:
    return export_path(tmp_path_factory)
