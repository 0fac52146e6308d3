"""The vLLM test environment, shared by every module that starts an engine.

Registered for every test module by tests/conftest.py; a module that starts engines asks for it in its
`pytestmark` (`pytest.mark.usefixtures("vllm_env")`). Engines run in-process with one thread, no
telemetry, caches in a temp folder. Where vllm cannot import, that module's tests skip with the reason,
unless DELREC_REQUIRE_VLLM=1 (CI) turns that into a failure.
"""

from __future__ import annotations

import os

import pytest

from delrec.errors import DelrecError
from delrec.ranking.base import backend_module
from delrec.ranking.models import describe_model

ENGINE = {"device": "cpu", "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 256 * 2**20}
TIE = 1e-4  # scores closer than this are a tie: either order is a correct ranking


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory):
    """vLLM in this process (no worker processes), no telemetry, caches in a temp folder; or skip, saying why.

    Session-scoped, and named by `usefixtures` (which pytest sets up before a test's arguments), so that it
    runs before the (session-scoped) model fixtures: a skip costs no model build.
    """
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
        }.items():
            patch.setenv(key, value)
        try:
            backend_module("vllm")
        except DelrecError as exc:
            if os.environ.get("DELREC_REQUIRE_VLLM") == "1":
                pytest.fail(f"DELREC_REQUIRE_VLLM=1 but {exc}")
            pytest.skip(str(exc))
        yield


def open_vllm(model, **overrides):
    from delrec.ranking.vllm import Options, open_backend

    return open_backend(describe_model(str(model)), Options(**{**ENGINE, **overrides}))


def top1_agreement(got, expected) -> float:
    """Share of instances whose top-1 under `got` is a top-1 under `expected`, scores within `TIE` counted equal."""
    agree = 0
    for a, b in zip(got, expected):
        best = max(b.logprob)
        agree += b.logprob[max(range(len(a.logprob)), key=lambda j: (a.logprob[j], -j))] >= best - TIE
    return agree / len(expected)
