"""Session-wide tiny LLM folders (a Llama with an untied head, a Qwen2 with tied embeddings).

Import the fixtures into a test module (`from llm_fixtures import tiny_llama, tiny_qwen2, tiny_llm`).
The folders are built once per test session, whichever modules import them, from a small
synthetic dataset (`tiny_llm_data`) with a few pre-training steps: about a second each on 2 cores.
Tests must not modify them; load a fresh model per test (`load_tiny`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.llm.tiny import TinyLLMConfig, build_tiny_llm

ARCHS = ("llama", "qwen2")
_built: dict[str, Path] = {}  # one build per session even when several modules import the fixtures


def _folder(name: str, tmp_path_factory, make) -> Path:
    if name not in _built:
        path = tmp_path_factory.mktemp("tiny-llm") / name
        make(path)
        _built[name] = path
    return _built[name]


def tiny_llm_data_path(tmp_path_factory) -> Path:
    def make(path):
        raw = make_synthetic(num_users=80, num_items=40, min_length=5, max_length=12, seed=0)
        prepare_dataset(raw, PreprocessConfig(num_candidates=8), path)

    return _folder("data", tmp_path_factory, make)


def tiny_llm_path(arch: str, tmp_path_factory) -> Path:
    data = tiny_llm_data_path(tmp_path_factory)
    config = TinyLLMConfig(arch=arch, pretrain_steps=4, batch_size=4, block_size=64, max_position_embeddings=512)
    return _folder(arch, tmp_path_factory, lambda path: build_tiny_llm(data, path, config, progress=False))


@pytest.fixture(scope="session")
def tiny_llm_data(tmp_path_factory) -> Path:
    """A prepared synthetic dataset folder (40 items, 8 candidates)."""
    return tiny_llm_data_path(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llm_path("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return tiny_llm_path("qwen2", tmp_path_factory)


@pytest.fixture(scope="session", params=ARCHS)
def tiny_llm(request, tmp_path_factory) -> Path:
    """Each tiny LLM folder in turn: tests using it run once per architecture."""
    return tiny_llm_path(request.param, tmp_path_factory)


def load_tiny(folder: Path):
    """A fresh `(model, tokenizer)` on CPU in float32, through delrec's loader."""
    from delrec.llm.loading import ModelConfig, load_model

    return load_model(ModelConfig(str(folder), dtype="float32", device="cpu"))
