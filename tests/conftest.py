"""Shared test helpers: one torch thread per test module, where the real datasets live, and the fixture modules.

The fixture modules (`pytest_plugins` below) are registered once here, for every test module: a test names a
fixture (`tiny_llama`, `sr_model`, `stage2_llama`, `gemma`, ...) as an argument and imports nothing. Import
from them only the plain helpers and constants a test calls (`load_tiny`, `TINY_SASREC`, ...). They import
their heavy modules lazily, so registering them costs a single-file run nothing.

`DELREC_CPU_BFLOAT16=0`: LLM stages and backends on `auto` would pick bfloat16 on a CPU that measures it
faster and float32 elsewhere; the suite pins float32 so that its results do not depend on the CPU, and tests
the bfloat16 paths by asking for them (tests/test_mixed_precision.py).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from delrec.data.dataset import META_FILE, dataset_files, fingerprint_files

pytest_plugins = [
    "llm_fixtures",  # tiny LLMs, their dataset, popularity predictions
    "ranking_fixtures",  # DELRec stage-2 folders and exports on the tiny LLMs
    "distill_fixtures",  # a tiny SASRec and its teacher folder
    "sr_fixtures",  # a synthetic dataset for the SR command-line tests
    "pipeline_fixtures",  # one finished `delrec run` on synthetic data
    "gemma_fixtures",  # the real Gemma 3 270M and its DELRec folders
    "vllm_fixtures",  # the vLLM engine environment
]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ["DELREC_CPU_BFLOAT16"] = "0"  # also for the subprocesses tests start


def shared_data(name: str) -> Path:
    """Path of a real dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset not found at {path} (a user's clone has no ../shared/data)")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread; on busy shared cores two threads made tests 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reseal_dataset(folder: Path) -> None:
    """Record the current content fingerprint in a prepared folder's meta.json, as if `delrec data prepare`
    had written its edited files: for tests that edit a dataset on purpose."""
    meta = json.loads((folder / META_FILE).read_text())
    meta["fingerprint"] = fingerprint_files(folder, dataset_files())
    (folder / META_FILE).write_text(json.dumps(meta))


def launch_two_processes(argv: list[str], cwd: Path):
    """`accelerate launch` of `python -m delrec ARGV` on 2 CPU processes (torchrun underneath, one thread each), on a
    free port (other test runs may hold accelerate's default one); the finished process, after checking it passed."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
         str(repo / "accelerate_configs" / "cpu-2proc.yaml"), "--main_process_port", str(port), "-m", "delrec", *argv],
        capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
