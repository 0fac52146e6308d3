"""The shared tokenization and the log-likelihood read-out.

On a tiny Llama (adds BOS, untied head) and a tiny Qwen2 (no BOS, tied embeddings).
"""

import pytest
import torch

from delrec.llm.loading import LoraSettings, apply_lora
from delrec.llm.scoring import (
    LogProbHead,
    CandidateScores,
    count_duplicate_titles,
    normalize_title,
    rank_candidates,
    score_candidates,
    score_candidates_naive,
    sliding_window,
)
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tokenization import adds_bos, decode_completion, encode_completion, encode_pair, encode_prompt
from delrec.prompts import get_template
from llm_fixtures import load_tiny

ONE_TOKEN_TITLE = "The"
PROMPTS = [
    "Answer:\n",
    "A user has played these games, from oldest to most recent:\n1. The Hollow Echo\n2. Endless Compass II\nAnswer:\n",
    "Candidates:\n" + "\n".join(f"{i}. The Crystal Mirror II" for i in range(1, 12)) + "\nAnswer:\n",
]
CANDIDATES = [
    ["The Hollow Echo", ONE_TOKEN_TITLE, "The Hollow Echo Deluxe Edition"],  # a title that is a prefix of another
    ["Endless Compass II", "Endless Compass", "The Crystal Mirror II", "A", "q w e r t y u i o p"],
    ["The Crystal Mirror II", ONE_TOKEN_TITLE],
]


def assert_same(got: list[CandidateScores], expected: list[CandidateScores], tol: float = 1e-4,
                rel: float = 0.0) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.num_tokens == b.num_tokens
        assert a.logprob == pytest.approx(b.logprob, abs=tol, rel=rel)
        assert a.normalized == pytest.approx(b.normalized, abs=tol, rel=rel)


def test_encode_pair_marks_exactly_the_completion(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    prompt, title = PROMPTS[1], "The Hollow Echo"
    pair = encode_pair(tokenizer, prompt, title)
    prompt_ids, completion_ids = encode_prompt(tokenizer, prompt), encode_completion(tokenizer, title)

    assert pair["input_ids"] == prompt_ids + completion_ids
    assert pair["completion_mask"] == [0] * len(prompt_ids) + [1] * len(completion_ids)
    assert completion_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in prompt_ids
    assert tokenizer.decode(completion_ids[:-1]) == title
    # BOS exactly as the tokenizer's own defaults put it: Llama yes, Qwen2 no
    assert adds_bos(tokenizer) == (model.config.model_type == "llama")
    assert prompt_ids == tokenizer(prompt).input_ids
    assert (prompt_ids[0] == tokenizer.bos_token_id) == adds_bos(tokenizer)


def test_a_generated_answer_is_decoded_up_to_its_first_eos_whole(tiny_llm):
    _, tokenizer = load_tiny(tiny_llm)
    title = "Café Ünïcode ☕"
    ids = encode_completion(tokenizer, title)  # ends with EOS
    assert decode_completion(tokenizer, ids + encode_completion(tokenizer, "padding after EOS")) == title
    assert decode_completion(tokenizer, ids[:-1]) == title  # cut at max_new_tokens: no EOS at all


def test_fast_path_equals_one_forward_per_candidate(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    assert len(encode_completion(tokenizer, ONE_TOKEN_TITLE)) == 2  # the title's one id + EOS
    # batch_size 2: prompts of different lengths share a left-padded pass, candidates span several chunks
    fast = score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=2)
    assert_same(fast, score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES))


def test_chunked_head_is_used_when_exact_and_transformed_logits_fall_back(tiny_llm):
    """The chunked log-softmax is checked against the model once; a head that is not a plain linear map
    (here: logits soft-capped by a wrapper module) is noticed and scored from the model's own logits."""
    model, tokenizer = load_tiny(tiny_llm)
    assert LogProbHead.of(model).plain
    reference = score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES)

    class SoftCapped(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, hidden):
            return 0.5 * torch.tanh(self.linear(hidden) / 0.5)  # a cap well inside the logits: a clear change

    model.set_output_embeddings(SoftCapped(model.get_output_embeddings()))
    assert not LogProbHead.of(model).plain
    capped = score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=2)
    assert_same(capped, score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES))
    assert any(abs(a - b) > 1e-2 for x, y in zip(capped, reference) for a, b in zip(x.logprob, y.logprob))


def test_chunked_head_is_used_in_bfloat16_too(tiny_llm):
    """16-bit rounding differs between the two paths; it must not send the model to the slow fallback."""
    model, tokenizer = load_tiny(tiny_llm)
    model = model.to(torch.bfloat16)
    assert LogProbHead.of(model).plain
    fast = score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=2)
    assert_same(fast, score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES), tol=0.1)


def test_chunked_normaliser_and_its_gradients_equal_the_full_logsumexp(tiny_llm, monkeypatch):
    """Several vocabulary chunks (and a last, shorter one); gradients reach the head weight (stage 1 trains
    tied head rows) and the hidden states exactly as through one full logsumexp."""
    import delrec.llm.scoring as scoring

    model, _ = load_tiny(tiny_llm)
    head = model.get_output_embeddings()
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", head.weight.shape[0] // 3 + 1)
    hidden = torch.randn(5, head.weight.shape[1], requires_grad=True)
    head.weight.requires_grad_(True)
    chunked = LogProbHead(model, plain=True).normaliser(hidden)
    weight_grad, hidden_grad = torch.autograd.grad(chunked.square().sum(), [head.weight, hidden])
    full = head(hidden).float().logsumexp(-1)
    expected_weight, expected_hidden = torch.autograd.grad(full.square().sum(), [head.weight, hidden])
    assert torch.allclose(chunked, full, atol=1e-5)
    assert torch.allclose(weight_grad, expected_weight, atol=1e-6) and weight_grad.abs().sum() > 0
    assert torch.allclose(hidden_grad, expected_hidden, atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_candidates_equal_one_row_per_candidate_and_the_reference(attention, tiny_llm, monkeypatch):
    """Each prompt's candidates share one row behind a block-diagonal mask (eager and SDPA honour it); a kernel that
    ignores custom masks gets one row per candidate instead. Both give the reference read-out's numbers."""
    from delrec.llm import scoring

    model, tokenizer = load_tiny(tiny_llm)
    model.config._attn_implementation = attention
    assert scoring.packs_candidates(model)
    packed = score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=2)
    monkeypatch.setattr(scoring, "packs_candidates", lambda model: False)
    assert_same(score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=2), packed)
    assert_same(packed, score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_prompts_longer_than_a_sliding_window_are_scored_exactly(attention, tiny_llm):
    """Gemma 3's sliding layers see the last `window` tokens only: packed scoring keeps the whole prompt in the
    cache and puts the window into those layers' masks, so a prompt longer than the window scores as one full forward
    per candidate does (where the model applies its windows itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tokenizer = load_tiny(tiny_llm)
    config = AutoConfig.for_model("gemma3_text", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  sliding_window=6, layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention"],
                                  max_position_embeddings=256, attn_implementation=attention)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert sliding_window(model) == 6 and max(len(encode_prompt(tokenizer, p)) for p in PROMPTS) > 3 * 6
    packed = score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=2)
    assert_same(packed, score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES))
    config.sliding_window = 1000  # the windows matter: the same weights without them score otherwise
    unwindowed = AutoModelForCausalLM.from_config(config).eval()
    unwindowed.load_state_dict(model.state_dict())
    with pytest.raises(AssertionError):
        assert_same(packed, score_candidates_naive(unwindowed, tokenizer, PROMPTS, CANDIDATES))


def test_batch_size_does_not_change_the_numbers(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    one = score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=1)
    # float32 rounding only: another batch pads and blocks the products differently, and a title's log-likelihood
    # sums its tokens' (a 10-token sum of -74 nats came out 2 ulps apart on the CI machine)
    assert_same(score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=16), one, tol=1e-5, rel=1e-6)


def test_sum_is_the_log_softmax_of_one_full_forward_including_eos(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    prompt, title = PROMPTS[1], "Endless Compass II"
    title_ids = tokenizer(title, add_special_tokens=False).input_ids
    ids = tokenizer(prompt).input_ids + title_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    start = len(ids) - len(title_ids) - 1  # position of the title's first id
    terms = [logprobs[t - 1, ids[t]].item() for t in range(start, len(ids))]

    [score] = score_candidates(model, tokenizer, [prompt], [[title]])
    assert score.num_tokens == [len(title_ids) + 1]
    assert score.logprob[0] == pytest.approx(sum(terms), abs=1e-4)
    assert score.normalized[0] == pytest.approx(sum(terms) / len(terms), abs=1e-4)
    assert abs(terms[-1]) > 1e-3  # the EOS term is part of the sum and not negligible here


def test_prompt_with_soft_prompt_tokens(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    soft = SoftPrompt("sasrec", 5).add_to(model, tokenizer)
    variables = {"sr_model": "SASRec", "soft_prompt": soft.placeholder_text(),
                 "history": ["The Hollow Echo", "Endless Compass II"], "candidates": CANDIDATES[0]}
    prompt = get_template("lsr").render(variables, with_completion=False).prompt
    ids = encode_prompt(tokenizer, prompt)
    start = ids.index(soft.token_ids[0])
    assert ids[start : start + 5] == soft.token_ids  # one id per placeholder, in order
    assert sum(i in soft.token_ids for i in ids) == 5

    prompts, candidates = [prompt, PROMPTS[1]], [CANDIDATES[0], CANDIDATES[1]]
    fast = score_candidates(model, tokenizer, prompts, candidates, batch_size=4)
    assert_same(fast, score_candidates_naive(model, tokenizer, prompts, candidates))


def test_peft_model_in_training_mode_is_scored_without_dropout_and_left_training(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    peft_model = apply_lora(model, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.5))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); give it an effect
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.train()
    fast = score_candidates(peft_model, tokenizer, PROMPTS, CANDIDATES, batch_size=3)
    assert peft_model.training
    assert_same(fast, score_candidates_naive(peft_model, tokenizer, PROMPTS, CANDIDATES))
    with peft_model.disable_adapter():
        base = score_candidates(peft_model, tokenizer, PROMPTS, CANDIDATES)
    assert abs(fast[0].logprob[0] - base[0].logprob[0]) > 1e-3


def test_bfloat16_runs_close_to_the_reference(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    model = model.to(torch.bfloat16)
    fast = score_candidates(model, tokenizer, PROMPTS, CANDIDATES, batch_size=2)
    assert_same(fast, score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES), tol=0.05)


def test_rank_candidates_best_first_with_ties_to_the_lower_index():
    scores = [CandidateScores([-3.0, -1.0, -3.0, -2.0], [3, 1, 3, 1]), CandidateScores([], [])]
    assert rank_candidates(scores, normalize=False) == [[1, 3, 0, 2], []]
    assert rank_candidates(scores, normalize=True) == [[0, 1, 2, 3], []]  # -1, -1, -1, -2 per token


def test_duplicate_titles_after_normalisation():
    assert normalize_title("  The  Hollow\tEcho ") == "the hollow echo"
    assert count_duplicate_titles(["The Hollow Echo", "the hollow  echo ", "THE HOLLOW ECHO", "Echo"]) == 2
    assert count_duplicate_titles([]) == 0


def test_bad_inputs(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    with pytest.raises(ValueError, match="one list per prompt"):
        score_candidates(model, tokenizer, PROMPTS, CANDIDATES[:2])
    with pytest.raises(TypeError, match="not a string"):
        score_candidates(model, tokenizer, ["Answer:\n"], ["The Hollow Echo"])
    with pytest.raises(Exception, match="shorten the history"):
        score_candidates(model, tokenizer, ["word " * 600 + "Answer:\n"], [["A"]])
