"""The title-listwise objective: its value is the formula on the read-out's own log-likelihoods, its
gradient is that of the naive one-forward-per-candidate computation, and it teaches a ranking."""

from __future__ import annotations

import math

import torch

from delrec.llm.listwise import ListwiseCollator, listwise_loss
from delrec.llm.scoring import rank_candidates, score_candidates, score_candidates_naive
from delrec.llm.tokenization import encode_pair
from llm_fixtures import load_tiny

PROMPTS = [
    "A user has played these games, from oldest to most recent:\n1. The Hollow Echo\nAnswer:\n",
    "Candidates:\n1. Endless Compass II\n2. The Crystal Mirror\n3. A\nAnswer:\n",
]
CANDIDATES = [["The Hollow Echo", "Endless Compass", "The Crystal Mirror II"],
               ["Endless Compass II", "The Crystal Mirror", "A"]]
TARGETS = [2, 0]


def batch(tokenizer, targets=TARGETS):
    rows = [{"prompt": p, "candidates": c, "answer": t} for p, c, t in zip(PROMPTS, CANDIDATES, targets)]
    return ListwiseCollator(tokenizer)(rows)


def test_the_loss_is_the_cross_entropy_over_the_read_outs_log_likelihoods(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    model.eval()
    reference = score_candidates_naive(model, tokenizer, PROMPTS, CANDIDATES)
    by_hand = []
    for scores, target in zip(reference, TARGETS):
        for values, normalised in ((scores.logprob, False), (scores.normalized, True)):
            log_z = math.log(sum(math.exp(v / 0.5) for v in values))
            by_hand.append((normalised, log_z - values[target] / 0.5))
    with torch.no_grad():
        for normalised in (False, True):
            got = listwise_loss(model, **batch(tokenizer), length_normalized=normalised, temperature=0.5, batch_size=2)
            expected = sum(v for n, v in by_hand if n == normalised) / len(PROMPTS)
            assert abs(got.item() - expected) < 1e-4


def test_the_gradient_equals_that_of_one_forward_per_candidate(tiny_llm):
    """The shared KV cache is differentiable: same gradient as scoring each (prompt, title) alone."""
    model, tokenizer = load_tiny(tiny_llm)
    model.eval()
    listwise_loss(model, **batch(tokenizer), batch_size=2).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    losses = []
    for prompt, cands, target in zip(PROMPTS, CANDIDATES, TARGETS):
        values = []
        for title in cands:
            pair = encode_pair(tokenizer, prompt, title)
            ids = torch.tensor(pair["input_ids"])
            predicted = model(input_ids=ids[None]).logits[0, :-1].float().log_softmax(-1)
            scored = torch.tensor(pair["completion_mask"][1:], dtype=torch.bool)
            values.append(predicted.gather(-1, ids[1:, None]).squeeze(-1)[scored].sum())
        losses.append(-torch.log_softmax(torch.stack(values), 0)[target])
    torch.stack(losses).mean().backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == naive.keys() and len(fast) > 5
    for name in fast:
        assert torch.allclose(fast[name], naive[name], atol=1e-5, rtol=1e-3), name


def test_a_few_steps_teach_the_tiny_model_to_rank_a_small_set(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    before = rank_candidates(score_candidates(model, tokenizer, PROMPTS, CANDIDATES), normalize=False)
    targets = [order[-1] for order in before]  # what the untrained model likes least
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss = listwise_loss(model, **batch(tokenizer, targets))
        loss.backward()
        optimizer.step()
    after = rank_candidates(score_candidates(model, tokenizer, PROMPTS, CANDIDATES), normalize=False)
    assert [order[0] for order in after] == targets
    assert loss.item() < 0.1


def test_sampled_negatives_score_the_target_and_k_others_drawn_per_row(tiny_llm):
    """With `negatives` k the loss is the softmax over the target and k of the other shown candidates: the same
    loss as a row whose candidates are just those, drawn per row id (seeded) and kept in their shown order."""
    model, tokenizer = load_tiny(tiny_llm)
    model.eval()
    titles = [f"Game {name}" for name in "ABCDEFGH"]
    rows = [{"id": i, "prompt": PROMPTS[i % 2], "candidates": titles, "answer": i % 8} for i in range(6)]
    sampled = ListwiseCollator(tokenizer, negatives=3, seed=7)
    kept = [sampled.scored_candidates(r) for r in rows]
    assert all(len(k) == 4 and r["answer"] in k and k == sorted(k) for r, k in zip(rows, kept))
    assert kept == [ListwiseCollator(tokenizer, negatives=3, seed=7).scored_candidates(r) for r in rows]  # seeded
    assert len({tuple(k) for k in kept}) > 1  # drawn per row
    assert kept != [ListwiseCollator(tokenizer, negatives=3, seed=8).scored_candidates(r) for r in rows]
    subset = [{**r, "candidates": [titles[j] for j in k], "answer": k.index(r["answer"])} for r, k in zip(rows, kept)]
    with torch.no_grad():
        got = listwise_loss(model, **sampled(rows))
        expected = listwise_loss(model, **ListwiseCollator(tokenizer)(subset))
    assert torch.allclose(got, expected)
    every = ListwiseCollator(tokenizer, negatives=7)  # k >= C - 1: every candidate, the full softmax
    assert every.scored_candidates(rows[0]) == list(range(8))
