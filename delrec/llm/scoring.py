"""Log-likelihood read-out: score each candidate title by log P(title + EOS | prompt).

DELRec ranks the C candidates of an instance by the likelihood the LLM gives each title after
the prompt (docs/methods.md#candidate-ranking-read-outs); stage 1 (RPS agreement), stage 2 (valid HR@1)
and the HF ranking backend all use this module, with the ids from `delrec.llm.tokenization`.

Why it is fast: the C candidates of an instance share one prompt, which is most of the tokens
(a prompt of a few hundred tokens, titles of a few). `score_candidates` runs each prompt once,
left-padded with other prompts of similar length, and keeps its KV cache; then one more pass
holds, in prompt b's row, all of prompt b's candidates one after another, reading b's cache as it
is, with a block-diagonal causal 4D mask and positions that restart at the prompt's length for
each candidate. The first token of a candidate is scored from the prompt's last logits, so a
candidate of m ids (EOS included) costs m - 1 new positions. Attention kernels that ignore custom
masks (flash attention) get one row per candidate instead, each with a copy of its prompt's cache.
`score_candidates_naive` (one full forward
per pair) is the reference the tests and the benchmark compare against.

With a large vocabulary the LM head dominates (Gemma: 262k x 640, 0.34 GFLOP per scored position), so
candidate rows are batched by length and only real positions go through the head, applied in
vocabulary chunks with a running logsumexp (`LogProbHead`): 1.6-1.9x faster on Gemma 3 270M on CPU,
the same log-likelihoods within 4e-5 (measured for issue #12; benchmarks/RESULTS.md keeps its successor, "The
real LLM at its FLOP floor").
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from delrec.errors import DelrecError
from delrec.llm.tokenization import encode_completion, encode_pair, encode_prompt
from delrec.llm.user_prompt import reading_states

_PAD_ID = 0  # any id: padded positions are masked out and never scored
LOGIT_CHUNK = 8192  # LM-head rows per block of the chunked log-softmax (measured best of 8k-32k on Gemma, CPU)


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
    states: torch.Tensor | None = None,
) -> list[CandidateScores]:
    """Score `candidates[i]` as completions of `prompts[i]`; one `CandidateScores` per prompt.

    `states` [len(prompts), d]: the SR model's state of each prompt's history, for a model that reads a per-user
    soft prompt (`delrec.llm.user_prompt`).

    `batch_size` bounds the prompts in one forward pass (their candidates share their rows), and
    the candidate rows of a pass where the attention kernel cannot pack them (each such row holds a
    copy of its prompt's KV cache, so this bounds memory too). Runs under `torch.inference_mode` with the model in eval mode (restored after),
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
            with reading_states(model, None if states is None else states[group]):
                logprobs = candidate_log_likelihoods(
                    model, [prompt_ids[i] for i in group], [candidate_ids[i] for i in group], batch_size
                )
            for i, values in zip(group, logprobs):
                results[i] = CandidateScores(values.tolist(), [len(c) for c in candidate_ids[i]])
            bar.update(len(group))
    return results


# Compiled decoder layers (`delrec.llm.trainer.compile_layers`) cannot share one graph here: every layer reads the
# cache by its own index, so torch compiled each layer of each pass anew, past its recompile limit of 8 (minutes of
# compilation, then eager anyway). The cache passes run eager; passes without a cache keep the compiled layers.
@torch.compiler.set_stance("force_eager")
def candidate_log_likelihoods(
    model, prompts: list[list[int]], candidates: list[list[list[int]]], batch_size: int
) -> list[torch.Tensor]:
    """log P(candidate | prompt) per candidate of each prompt (float32 [C_i] tensors), from token ids.

    Differentiable when called with gradients on: the title-listwise training objective
    (`delrec.llm.listwise`) ranks by exactly the quantity the read-out ranks by, through the same
    shared-prompt KV cache. `score_candidates` is this under inference mode, from text.
    """
    from transformers import DynamicCache

    device = _device(model)
    head = LogProbHead.of(model)
    ids, prompt_mask = _pad(prompts, left=True, device=device)
    prompt_lengths = prompt_mask.sum(-1)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    packs = packs_candidates(model)
    # Packing keeps every prompt token in the cache (no layer drops what slides out of its window) and puts each
    # sliding layer's window into its mask instead (`_packed_masks`), so prompts may be longer than the window.
    full_cache = {"past_key_values": DynamicCache()} if packs and sliding_window(model) else {}
    last_hidden, cache = head.forward(input_ids=ids, attention_mask=prompt_mask, position_ids=positions,
                                      use_cache=True, last_only=True, **full_cache)
    prompt_last = last_hidden[:, -1]  # every prompt ends at the last column
    prompt_normaliser = head.normaliser(prompt_last)
    cache_layers = [(layer[0], layer[1]) for layer in cache]
    if any(keys.shape[-2] != ids.shape[1] for keys, _ in cache_layers):
        raise DelrecError(
            "the model keeps a sliding-window cache shorter than the prompts; score with score_candidates_naive"
        )

    rows = [(owner, cand) for owner, cands in enumerate(candidates) for cand in cands]
    owners = torch.tensor([owner for owner, _ in rows], device=device)
    first_ids = torch.tensor([cand[0] for _, cand in rows], device=device)
    first = head.target_logits(prompt_last[owners], first_ids) - prompt_normaliser[owners]
    if packs:
        rest = _packed_continuation_logprobs(head, candidates, cache_layers, prompt_mask, prompt_lengths)
    else:  # a kernel that ignores custom masks (flash attention): one row per candidate, each with its own cache copy
        rest = torch.zeros(len(rows), device=device)
        # Rows of similar length share a pass: fewer padded positions to run through the model.
        by_length = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
        for start in range(0, len(rows), batch_size):
            taken = torch.tensor(by_length[start : start + batch_size], device=device)
            rest = rest.index_put((taken,), _continuation_logprobs(
                head, [rows[r][1] for r in taken.tolist()], owners[taken], cache_layers, prompt_mask, prompt_lengths))
    return list((first + rest).split([len(cands) for cands in candidates]))


PACKING_ATTENTION = ("eager", "sdpa")  # attention implementations that honour a custom 4D mask


def packs_candidates(model) -> bool:
    """Whether each prompt's candidates share one row behind a custom mask (eager and SDPA attention honour one),
    which also lets prompts outrun a sliding window; other kernels get one row per candidate."""
    return getattr(model.config, "_attn_implementation", None) in PACKING_ATTENTION


def sliding_window(model) -> int | None:
    """The attention window of the model's sliding layers (Gemma 3: 5 of every 6 layers, 512 tokens), None without."""
    config = getattr(model.config, "text_config", None) or model.config
    window = getattr(config, "sliding_window", None)
    return window if window and "sliding_attention" in (getattr(config, "layer_types", None) or ()) else None


def _packed_masks(head: "LogProbHead", visible: torch.Tensor, key_positions: torch.Tensor,
                  query_positions: torch.Tensor):
    """The packed pass's mask as the attention kernel takes it: additive for eager, boolean for SDPA; for a model
    with sliding layers, one per layer type, the sliding one also hiding keys a window or more behind the query
    (transformers' rule: key position > query position - window)."""
    window = sliding_window(head.model)
    masks = {"full_attention": visible}
    if window:
        near = key_positions[:, None, :] > query_positions[:, :, None] - window
        masks["sliding_attention"] = visible & near[:, None]
    if head.model.config._attn_implementation == "eager":  # eager adds its mask to the scores
        dtype = next(head.model.parameters()).dtype
        masks = {kind: torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
                 for kind, mask in masks.items()}
    return masks if window else masks["full_attention"]


def _packed_continuation_logprobs(head: "LogProbHead", candidates, cache_layers, prompt_mask, prompt_lengths):
    """Sum of log P(cand[j] | prompt, cand[:j]) for j >= 1 of every candidate, in one pass whose row b holds all of
    prompt b's candidates one after another (each as `cand[:-1]`) and reads prompt b's cache as it is.

    A block-diagonal causal 4D mask keeps each candidate to the prompt and its own earlier tokens, and each
    candidate's positions restart at its prompt's length, so the numbers are those of one row per candidate; but
    no row copies a prompt's cache (C copies per prompt, repeated per attention head: most of a listwise step's
    memory traffic and 11-15 GB of Gemma's peak RSS, benchmarks/RESULTS.md "The real LLM at its FLOP floor").
    """
    from transformers import DynamicCache

    device = prompt_mask.device
    widths = [sum(len(c) - 1 for c in cands) for cands in candidates]
    width = max(max(widths), 1)
    shape = (len(candidates), width)
    ids = torch.full(shape, _PAD_ID, dtype=torch.long)
    targets = torch.zeros(shape, dtype=torch.long)
    offsets = torch.zeros(shape, dtype=torch.long)  # each query's position inside its candidate
    segment = torch.full(shape, -1, dtype=torch.long)  # which row of the output each query belongs to (-1: padding)
    row = 0
    for b, cands in enumerate(candidates):
        start = 0
        for cand in cands:
            n = len(cand) - 1
            ids[b, start:start + n] = torch.tensor(cand[:-1])
            targets[b, start:start + n] = torch.tensor(cand[1:])
            offsets[b, start:start + n] = torch.arange(n)
            segment[b, start:start + n] = row
            start, row = start + n, row + 1
    ids, targets, offsets, segment = (t.to(device) for t in (ids, targets, offsets, segment))
    real = segment >= 0
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    own = (segment[:, :, None] == segment[:, None, :]) & causal & real[:, :, None]
    visible = torch.cat([prompt_mask.bool()[:, None, :].expand(-1, width, -1), own], dim=-1)[:, None]
    query_positions = prompt_lengths[:, None] + offsets
    prompt_positions = torch.arange(prompt_mask.shape[1], device=device) - (prompt_mask.shape[1] - prompt_lengths)[:, None]
    masks = _packed_masks(head, visible, torch.cat([prompt_positions, query_positions], dim=1), query_positions)
    # full layers only (no config): the prompt's cache is read as it is, whatever the model's layer types
    cache = DynamicCache(ddp_cache_data=cache_layers)
    hidden, _ = head.forward(input_ids=ids, attention_mask=masks, position_ids=query_positions,
                             past_key_values=cache, use_cache=True)
    token_logprobs = head.target_log_probs(hidden[real], targets[real])
    rest = torch.zeros(row, device=device, dtype=token_logprobs.dtype)
    return rest.index_add(0, segment[real], token_logprobs)


def _continuation_logprobs(head: "LogProbHead", cands, owners, cache_layers, prompt_mask, prompt_lengths):
    """Sum of log P(cand[j] | prompt, cand[:j]) for j >= 1, each row reading the cache of prompt `owners[row]`.

    The rows feed `cand[:-1]` right-padded after their prompt's (left-padded) cache; the hidden
    state at input position j scores `cand[j + 1]`. Only real (not padded) positions are scored.
    """
    from transformers import DynamicCache

    device = prompt_mask.device
    inputs, input_mask = _pad([c[:-1] for c in cands], left=False, device=device)
    targets, _ = _pad([c[1:] for c in cands], left=False, device=device)
    cache = DynamicCache(ddp_cache_data=[(k[owners], v[owners]) for k, v in cache_layers], config=head.model.config)
    attention = torch.cat([prompt_mask[owners], input_mask], dim=1)
    positions = prompt_lengths[owners, None] + torch.arange(inputs.shape[1], device=device)
    hidden, _ = head.forward(input_ids=inputs, attention_mask=attention, position_ids=positions,
                             past_key_values=cache, use_cache=True)
    real = input_mask.bool()
    token_logprobs = torch.zeros(inputs.shape, device=device)
    token_logprobs[real] = head.target_log_probs(hidden[real], targets[real])
    return token_logprobs.sum(-1)


class LogProbHead:
    """log P(token | hidden state) for chosen tokens, without an [n, vocab] logits tensor per pass.

    The decoder runs without the LM head (`model.get_decoder()`); the head is applied here in
    vocabulary chunks with a running logsumexp: the same FLOPs, but no 262k-column tensor (Gemma)
    written for every padded position and read back for the softmax. That this equals the model's
    own log-softmax is checked once per model (per LM-head module) on a short input; a model that transforms its logits
    (scaling, soft-capping) or has no plain linear head falls back to its full forward.
    """

    _checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, model, plain: bool):
        self.model = model
        self.plain = plain

    @classmethod
    def of(cls, model) -> "LogProbHead":
        head = model.get_output_embeddings()  # the key: a model whose head is replaced is checked again
        if head is None:
            return cls(model, False)
        if head not in cls._checked:
            cls._checked[head] = cls(model, False)._matches_model()
        return cls(model, cls._checked[head])

    def forward(self, last_only: bool = False, **inputs):
        """(last hidden states [B, T, d], cache) of the decoder; with the fallback, the logits instead (of the
        last position only with `last_only`)."""
        if self.plain:
            out = self.model.get_decoder()(**inputs)
            return out.last_hidden_state, out.past_key_values
        out = self.model(**inputs, **({"logits_to_keep": 1} if last_only else {}))
        return out.logits, out.past_key_values

    def target_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log softmax(head(hidden))[targets], float32, for [n, d] hidden states (or [n, vocab] fallback logits)."""
        return self.target_logits(hidden, targets) - self.normaliser(hidden)

    def target_logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.plain:
            return hidden.float().gather(-1, targets[:, None]).squeeze(-1)
        head = self.model.get_output_embeddings()
        # in float32: one dot product per row costs nothing, and a 16-bit sum of 640 products is off by up to a
        # tenth of a nat, enough to swap close candidates (the normaliser's rounding errors average out instead)
        logits = (hidden.float() * head.weight[targets].float()).sum(-1)
        return logits if head.bias is None else logits + head.bias[targets].float()

    def normaliser(self, hidden: torch.Tensor) -> torch.Tensor:
        """logsumexp of the logits over the vocabulary, one vocabulary chunk at a time."""
        if not self.plain:
            return hidden.float().logsumexp(-1)
        head = self.model.get_output_embeddings()
        # split, not slicing: when the head trains (stage 1's tied soft rows), the backward of split writes one
        # vocabulary-sized gradient, where each slice's writes its own (32 x 670 MB for Gemma; 4x slower backward)
        weights = head.weight.split(LOGIT_CHUNK)
        biases = head.bias.split(LOGIT_CHUNK) if head.bias is not None else [None] * len(weights)
        total = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
        for weight, bias in zip(weights, biases):
            logits = torch.nn.functional.linear(hidden, weight, bias)
            total = torch.logaddexp(total, logits.float().logsumexp(-1))
        return total

    def _matches_model(self) -> bool:
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or not hasattr(self.model, "get_decoder"):
            return False
        ids = torch.tensor([[1, 2, 3, 4]], device=_device(self.model)) % head.weight.shape[0]
        with _eval_mode(self.model), torch.inference_mode():
            expected = self.model(input_ids=ids).logits[0].float().log_softmax(-1)
            try:
                hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0]
            except (AttributeError, TypeError):
                return False
            self.plain = True
            got = self.target_log_probs(hidden, expected.argmax(-1))
        # The two paths round differently in 16-bit (Gemma 3 270M in bfloat16: up to 0.125 nats apart), while a
        # transformed head (soft-capping, a scale) moves logits by whole nats: tolerate the dtype's rounding only.
        # A 1e-4 tolerance sent every bfloat16 model to the fallback, whose strided last-position head ran 40x
        # slower on torch 2.13 CPU for a Gemma stage-2 folder.
        dtype = head.weight.dtype
        tolerance = 1e-4 if torch.finfo(dtype).bits >= 32 else 64 * torch.finfo(dtype).eps
        return torch.allclose(got, expected.max(-1).values, rtol=0, atol=tolerance)


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
