"""Session-wide tiny LLM folders (a Llama with an untied head, a Qwen2 with tied embeddings), their data, and a
popularity model's predictions on that data (stage 1's input).

Registered for every test module by tests/conftest.py (`pytest_plugins`): a test names `tiny_llama`,
`tiny_qwen2`, `tiny_llm`, `tiny_llm_data` or `tiny_pop` as an argument, nothing to import. The folders are
built once per test session, whichever modules ask, from a small synthetic dataset (`tiny_llm_data`) with
a few pre-training steps: about a second each on 2 cores. Tests must not modify them; load a fresh model
per test (`load_tiny`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.llm.tiny import TinyLLMConfig, build_tiny_llm

ARCHS = ("llama", "qwen2")


def build_tiny(arch: str, data: Path, tmp_path_factory) -> Path:
    config = TinyLLMConfig(arch=arch, pretrain_steps=4, batch_size=4, block_size=64, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny-llm") / arch
    build_tiny_llm(data, path, config, progress=False)
    return path


def write_pop_predictions(data: Path, out: Path) -> Path:
    """A popularity model on `data` (`out/model`) and its top-10 train and valid predictions with prefix
    predictions (`out/train.jsonl`, `out/valid.jsonl`): what stage 1 reads, in a second."""
    from delrec.data.dataset import PreparedDataset
    from delrec.sr import PopConfig, TrainConfig, load_model, train_sr, write_predictions

    train_sr(data, PopConfig(), TrainConfig(epochs=1, progress=False, device="cpu"), out / "model")
    model, dataset = load_model(out / "model", "cpu"), PreparedDataset.load(data)
    for split in ("train", "valid"):
        write_predictions(out / f"{split}.jsonl", model, dataset, split, 10, prefix_predictions=True)
    return out


@pytest.fixture(scope="session")
def tiny_llm_data(tmp_path_factory) -> Path:
    """A prepared synthetic dataset folder (40 items, 8 candidates)."""
    raw = make_synthetic(num_users=80, num_items=40, min_length=5, max_length=12, seed=0)
    path = tmp_path_factory.mktemp("tiny-llm") / "data"
    prepare_dataset(raw, PreprocessConfig(num_candidates=8), path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_llm_data, tmp_path_factory) -> Path:
    return build_tiny("llama", tiny_llm_data, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_llm_data, tmp_path_factory) -> Path:
    return build_tiny("qwen2", tiny_llm_data, tmp_path_factory)


@pytest.fixture(scope="session", params=ARCHS)
def tiny_llm(request) -> Path:
    """Each tiny LLM folder in turn (`tiny_llama`, `tiny_qwen2`): tests using it run once per architecture."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def tiny_pop(tiny_llm_data, tmp_path_factory) -> Path:
    """A popularity model (`model/`) and its train/valid predictions with prefix predictions on `tiny_llm_data`."""
    return write_pop_predictions(tiny_llm_data, tmp_path_factory.mktemp("pop"))


def load_tiny(folder: Path):
    """A fresh `(model, tokenizer)` on CPU in float32, through delrec's loader."""
    from delrec.llm.loading import ModelConfig, load_model

    return load_model(ModelConfig(str(folder), dtype="float32", device="cpu"))
