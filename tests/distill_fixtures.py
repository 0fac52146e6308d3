"""A small SR model and its teacher folder on the tiny-LLM synthetic dataset, for the distillation tests.

Registered for every test module by tests/conftest.py: a test names `sr_model` or `sr_teacher` as an
argument. The dataset is `llm_fixtures`' `tiny_llm_data` (40 items, 80 users), so SR and LLM teachers of
the same instances can be combined. Built once per session, in about a second; tests must not modify
them (copy a folder to edit it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
from delrec.sr import SASRecConfig, TrainConfig, train_sr

TINY_SASREC = SASRecConfig(hidden_size=16, num_layers=1, num_heads=1, inner_size=32, dropout=0.1, max_length=20)


def train_tiny_sasrec(data: Path, out: Path, epochs: int = 4) -> Path:
    """A small SASRec trained on `data` (seconds on one thread); returns its model folder."""
    config = TrainConfig(epochs=epochs, lr=0.01, batch_size=32, patience=0, progress=False, seed=0, device="cpu")
    train_sr(data, TINY_SASREC, config, out)
    return out


def write_sr_teacher(data: Path, model: Path, out: Path, topk: int = 10) -> Path:
    """The teacher folder of SR model `model` over `data`'s training instances (history excluded)."""
    return export_teacher(TeacherExportConfig(model=str(model), data=str(data), out=str(out), topk=topk,
                                              progress=False))


@pytest.fixture(scope="session")
def sr_model(tiny_llm_data, tmp_path_factory) -> Path:
    """A trained tiny SASRec folder on `tiny_llm_data`."""
    return train_tiny_sasrec(tiny_llm_data, tmp_path_factory.mktemp("distill") / "sasrec")


@pytest.fixture(scope="session")
def sr_teacher(tiny_llm_data, sr_model, tmp_path_factory) -> Path:
    """The top-10 teacher folder of `sr_model` on `tiny_llm_data` (with item embeddings)."""
    return write_sr_teacher(tiny_llm_data, sr_model, tmp_path_factory.mktemp("distill") / "teacher-sasrec")
