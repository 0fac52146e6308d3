"""A synthetic dataset and the model flags of the SR command-line tests (tests/test_sr_cli.py,
tests/test_user_states.py).

Registered for every test module by tests/conftest.py: a test names `sr_data` as an argument. Built once per
session; tests must not modify it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic

# a small SASRec that trains in seconds: `delrec sr train ... *TINY_FLAGS`
TINY_FLAGS = [
    "--hidden_size", "16", "--num_layers", "1", "--num_heads", "1", "--inner_size", "32",
    "--epochs", "3", "--lr", "0.01", "--batch_size", "32", "--no_progress", "--num_threads", "1",
]


@pytest.fixture(scope="session")
def sr_data(tmp_path_factory) -> Path:
    """A prepared synthetic dataset folder (200 users, 50 items, 10 candidates)."""
    raw = make_synthetic(num_users=200, num_items=50, min_length=6, max_length=16, seed=3)
    return prepare_dataset(raw, PreprocessConfig(num_candidates=10), tmp_path_factory.mktemp("cli") / "data").path
