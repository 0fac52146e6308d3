"""The vLLM backend on the real pretrained LLM (Gemma 3 270M): zero-shot and the served DELRec export.

Both engines score the same fixed candidates as the transformers backend; they must pick the same
top-1 for at least 90% of the instances and give log-likelihoods within `LOGPROB_TOLERANCE`
(measured on these 12 x 6 candidates, float32 on both sides: at most 1.5e-4 nats per title, 2.7e-5
per token, from vLLM's own attention kernels and the 262k-way log-softmax; the bound is ~6x that). Skips without vllm or without the
`[gemma]` extra (DELREC_REQUIRE_VLLM / DELREC_REQUIRE_GEMMA turn each skip into a failure).
"""

from __future__ import annotations

import pytest

from delrec.data.dataset import PreparedDataset
from delrec.llm.tokenization import encode_completion
from delrec.prompts import get_template
from delrec.ranking.hf import HFBackend
from delrec.ranking.models import describe_model
from delrec.ranking.requests import build_requests
from gemma_fixtures import MAX_LENGTH, model_config
from vllm_fixtures import open_vllm, top1_agreement

pytestmark = [
    pytest.mark.gemma, pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.usefixtures("vllm_env"),  # first: without vllm, skip before importing Gemma
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

LOGPROB_TOLERANCE = 1e-3


def scored_by_both(model, data):
    from delrec.llm.loading import load_model

    loaded, tokenizer = load_model(model_config(model))
    hf = HFBackend(loaded, tokenizer, batch_size=8)
    spec = describe_model(str(model))
    requests = build_requests(PreparedDataset.load(data), "test", spec, get_template(spec.template), tokenizer,
                              MAX_LENGTH, lambda titles: max(len(encode_completion(tokenizer, t)) for t in titles))
    prompts, titles = [r.prompt for r in requests], [list(r.titles) for r in requests]
    expected = hf.score(prompts, titles)
    del hf, loaded
    with open_vllm(model, max_model_len=MAX_LENGTH) as backend:
        got = backend.score(prompts, titles)
    return got, expected


@pytest.mark.parametrize("which", ["zero-shot", "export"])
def test_vllm_scores_like_the_transformers_backend(which, request, gemma_data):
    model = request.getfixturevalue("gemma" if which == "zero-shot" else "gemma_export")
    got, expected = scored_by_both(model, gemma_data)
    assert len(expected) == 12
    for a, b in zip(got, expected):
        assert a.num_tokens == b.num_tokens
        assert a.logprob == pytest.approx(b.logprob, abs=LOGPROB_TOLERANCE)
    assert top1_agreement(got, expected) >= 0.9
