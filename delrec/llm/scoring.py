"""Log-likelihood read-out: score each candidate title by log P(title + EOS | prompt).

DELRec ranks the C candidates of an instance by the likelihood the LLM gives each title after
the prompt (METHODS.md, "Read-out for ranking"); stage 1 (RPS agreement), stage 2 (valid HR@1)
and the HF ranking backend all use this module, with the ids from `delrec.llm.tokenization`.

Why it is fast: the C candidates of an instance share one prompt, which is most of the tokens
(a prompt of a few hundred tokens, titles of a few). `score_candidates` runs each prompt once,
left-padded with other prompts of similar length, keeps its KV cache, and then runs only the
candidate tokens, right-padded, each row reading its own prompt's cache. The first token of a
candidate is scored from the prompt's last logits, so a candidate of m ids (EOS included) costs
m - 1 new positions. (Packing all candidates after one prompt copy with a tree-shaped 4D mask
would avoid the per-row cache copies, but flash-attention kernels ignore custom masks; the
cache works with every attention implementation.) `score_candidates_naive` (one full forward
per pair) is the reference the tests and the benchmark compare against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from delrec.errors import DelrecError
from delrec.llm.tokenization import encode_completion, encode_pair, encode_prompt

_PAD_ID = 0  # any id: padded positions are masked out and never scored


@dataclass(frozen=True)
class CandidateScores:
    """One instance's candidates, in their given order: summed log-probabilities and token counts (EOS included)."""

    logprob: list[float]
    num_tokens: list[int]

    @property
    def normalized(self) -> list[float]:
        """Mean log-probability per token, so long titles are not penalised for their length alone."""
        return [lp / n for lp, n in zip(self.logprob, self.num_tokens)]


def score_candidates(
    model,
    tokenizer,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[CandidateScores]:
    """Score `candidates[i]` as completions of `prompts[i]`; one `CandidateScores` per prompt.

    `batch_size` bounds the sequences in one forward pass: prompts in a prompt pass, candidate
    rows in a candidate pass (each row holds a copy of its prompt's KV cache, so this bounds
    memory too). Runs under `torch.inference_mode` with the model in eval mode (restored after),
    on the model's device and dtype; log-probabilities are computed in float32.
    """
    _check_inputs(prompts, candidates, batch_size)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    candidate_ids = [[encode_completion(tokenizer, c) for c in cands] for cands in candidates]
    _check_lengths(model, prompt_ids, candidate_ids)
    # Prompts of similar length share a batch, so left padding wastes little.
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    results: list[CandidateScores | None] = [None] * len(prompts)
    with _eval_mode(model), torch.inference_mode(), tqdm(
        total=len(prompts), desc="scoring", unit="prompt", disable=not progress
    ) as bar:
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            scores = _score_group(model, [prompt_ids[i] for i in group], [candidate_ids[i] for i in group], batch_size)
            for i, score in zip(group, scores):
                results[i] = score
            bar.update(len(group))
    return results


def _score_group(model, prompts: list[list[int]], candidates: list[list[list[int]]], batch_size: int):
    """One prompt pass over `prompts`, then their candidates `batch_size` rows at a time over the cached prompts."""
    device = _device(model)
    ids, prompt_mask = _pad(prompts, left=True, device=device)
    prompt_lengths = prompt_mask.sum(-1)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    out = model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first_logprobs = out.logits[:, -1].float().log_softmax(-1)  # every prompt ends at the last column
    cache_layers = [(layer[0], layer[1]) for layer in out.past_key_values]
    if any(keys.shape[-2] != ids.shape[1] for keys, _ in cache_layers):
        raise DelrecError(
            "the model keeps a sliding-window cache shorter than the prompts; score with score_candidates_naive"
        )

    rows = [(owner, cand) for owner, cands in enumerate(candidates) for cand in cands]
    row_logprobs: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        owners = torch.tensor([owner for owner, _ in chunk], device=device)
        first_ids = torch.tensor([cand[0] for _, cand in chunk], device=device)
        first = first_logprobs[owners, first_ids]
        rest = _continuation_logprobs(
            model, [cand for _, cand in chunk], owners, cache_layers, prompt_mask, prompt_lengths
        )
        row_logprobs += (first + rest).tolist()

    scores, taken = [], 0
    for cands in candidates:
        scores.append(CandidateScores(row_logprobs[taken : taken + len(cands)], [len(c) for c in cands]))
        taken += len(cands)
    return scores


def _continuation_logprobs(model, cands, owners, cache_layers, prompt_mask, prompt_lengths) -> torch.Tensor:
    """Sum of log P(cand[j] | prompt, cand[:j]) for j >= 1, each row reading the cache of prompt `owners[row]`.

    The rows feed `cand[:-1]` right-padded after their prompt's (left-padded) cache; the logits
    at input position j score `cand[j + 1]`.
    """
    from transformers import DynamicCache

    device = prompt_mask.device
    inputs, input_mask = _pad([c[:-1] for c in cands], left=False, device=device)
    targets, _ = _pad([c[1:] for c in cands], left=False, device=device)
    cache = DynamicCache(ddp_cache_data=[(k[owners], v[owners]) for k, v in cache_layers], config=model.config)
    attention = torch.cat([prompt_mask[owners], input_mask], dim=1)
    positions = prompt_lengths[owners, None] + torch.arange(inputs.shape[1], device=device)
    logits = model(
        input_ids=inputs, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True
    ).logits.float()
    token_logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return token_logprobs.masked_fill(~input_mask.bool(), 0.0).sum(-1)


def score_candidates_naive(
    model, tokenizer, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, progress: bool = False
) -> list[CandidateScores]:
    """The reference read-out: one full forward per (prompt, candidate), no padding, no cache. Slow by design."""
    _check_inputs(prompts, candidates, 1)
    device = _device(model)
    results = []
    with _eval_mode(model), torch.inference_mode():
        for prompt, cands in tqdm(list(zip(prompts, candidates)), desc="scoring (naive)", disable=not progress):
            logprobs, counts = [], []
            for cand in cands:
                pair = encode_pair(tokenizer, prompt, cand)
                ids = torch.tensor(pair["input_ids"], device=device)
                # row t of `predicted` is the distribution of ids[t + 1]
                predicted = model(input_ids=ids[None]).logits[0, :-1].float().log_softmax(-1)
                token_logprobs = predicted.gather(-1, ids[1:, None]).squeeze(-1)
                scored = torch.tensor(pair["completion_mask"][1:], dtype=torch.bool, device=device)
                logprobs.append(token_logprobs[scored].sum().item())
                counts.append(int(scored.sum()))
            results.append(CandidateScores(logprobs, counts))
    return results


def rank_candidates(scores: Sequence[CandidateScores], normalize: bool) -> list[list[int]]:
    """Candidate indices best first, per instance; ties go to the lower index, so rankings are deterministic."""
    ranked = []
    for score in scores:
        values = score.normalized if normalize else score.logprob
        ranked.append(sorted(range(len(values)), key=lambda j: (-values[j], j)))
    return ranked


def normalize_title(title: str) -> str:
    """Title as compared for collisions: whitespace stripped and collapsed, case folded."""
    return " ".join(title.split()).casefold()


def count_duplicate_titles(titles: Sequence[str]) -> int:
    """How many titles repeat an earlier one after `normalize_title`.

    Such candidates are (nearly) indistinguishable to a title read-out; callers report the count.
    """
    return len(titles) - len({normalize_title(t) for t in titles})


def _check_inputs(prompts, candidates, batch_size: int) -> None:
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists; give one list per prompt")
    if any(isinstance(cands, str) for cands in candidates):
        raise TypeError("candidates must be one list of titles per prompt, not a string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _check_lengths(model, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]]) -> None:
    """Refuse empty prompts (nothing to condition on) and sequences beyond the model's positions (silently wrong)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    for i, (prompt, cands) in enumerate(zip(prompt_ids, candidate_ids)):
        if not prompt:
            raise DelrecError(f"instance {i}: the prompt encodes to no tokens; a prompt must have text")
        longest = len(prompt) + max((len(c) for c in cands), default=0)
        if limit is not None and longest > limit:
            raise DelrecError(
                f"instance {i}: prompt + candidate is {longest} tokens, the model takes {limit}; "
                "shorten the history before rendering the prompt"
            )


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _pad(sequences: list[list[int]], left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of `sequences` padded to the longest, on the left or the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), _PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (no dropout) while scoring, then the caller's mode back: evaluation runs inside training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
