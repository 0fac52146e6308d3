"""The transformers backend: any causal LM transformers loads, on CPU or CUDA.

- score: `delrec.llm.scoring.score_candidates` (each prompt computed once, its KV cache shared by
  all its candidates);
- constrained: our own beam search over the candidates' prefix trie (below);
- generate: `model.generate`, greedy, stopping at the tokenizer's EOS (the end marker training
  appends to every answer).
Prompts of similar length share a batch, so left padding wastes little.

Why our own constrained beam search instead of `generate(prefix_allowed_tokens_fn=..., num_beams=B)`:
`generate` copies each prompt B times before its first forward pass, so the prompt (most of the
tokens) is computed B times; here it is computed once and its KV cache rows are selected for the
beams (`Cache.reorder_cache`). Scores are the plain summed log-probabilities under the model's
unconstrained distribution, ties go to the lower candidate index, and every title that finishes
is ranked, so the result is exactly specified.

Relation to the score read-out: each step keeps the `num_beams` best one-token expansions (a
title finishing with EOS takes a slot in the step it finishes). With `num_beams` >= the number of
distinct candidates nothing is ever pruned: the search is exhaustive and ranks by the same summed
log-likelihood as `score_candidates`. With `num_beams=1` it is greedy decoding over the allowed
tokens, which can pick a title whose first token is likely but whose whole title is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from delrec.config import Device, at_least, device_option
from delrec.llm.stage_folder import load_delrec_model
from delrec.device import resolve_device
from delrec.llm.loading import TRUST_REMOTE_CODE_HELP, ModelConfig, load_model
from delrec.llm.scoring import CandidateScores, packs_candidates, score_candidates, sliding_window
from delrec.llm.tokenization import decode_completion, encode_completion, encode_prompt
from delrec.ranking.base import Backend
from delrec.ranking.models import ModelSpec
from delrec.ranking.trie import Beam, Finished, TrieNode, build_trie, prune, ranked

CHUNK_BATCHES = 8  # batches per backend call: enough prompts to sort by length, a progress step still short


@dataclass
class Options:
    """The transformers backend's settings."""

    device: Device = device_option(what="Where to run the model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Weight dtype; auto: the checkpoint's (float16 becomes float32 on CPU). bfloat16 scores "
                  "Gemma 3 270M 1.9x faster on a CPU with fast bfloat16 and gave the same HR@1, but its top-1 agrees "
                  "with float32's on only 94.0% of Last.fm and 94.5% of games instances (benchmarks/RESULTS.md, "
                  "\"The real LLM at its FLOP floor\")."},
    )
    batch_size: int = field(
        default=16, metadata={"help": "Sequences per forward pass (prompts, candidate rows or beams).",
                              "range": at_least(1)}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel, e.g. eager, sdpa, flash_attention_2 (default: transformers'; "
                  "plain and exported models)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def open_backend(spec: ModelSpec, options: Options) -> "HFBackend":
    """Load the model of `spec` (stage-2 folders with their adapter and soft prompt) for ranking."""
    resolve_device(options.device)  # a CUDA request on a CPU machine fails here, before any loading
    if spec.kind == "stage2":
        model, tokenizer, _ = load_delrec_model(spec.path, device=options.device, dtype=options.dtype,
                                                trust_remote_code=options.trust_remote_code)
    else:
        config = ModelConfig(spec.path, dtype=options.dtype, device=options.device,
                             attn_implementation=options.attn_implementation,
                             trust_remote_code=options.trust_remote_code)
        model, tokenizer = load_model(config)
    return HFBackend(model, tokenizer, options.batch_size, source=spec.path)


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 16, source: str = ""):
        self.model = model.eval()
        self.source = source
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chunk_size = batch_size * CHUNK_BATCHES
        config = getattr(model.config, "text_config", model.config)
        self.max_length = (
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            or tokenizer.model_max_length
        )
        window = sliding_window(model)
        if window and not packs_candidates(model):
            # an attention kernel without custom masks scores candidates through the model's own cache, whose
            # sliding layers keep the last window - 1 tokens: prompts lose their oldest history items to fit (counted)
            self.max_length = min(self.max_length, window - 1)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def settings(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.model.dtype).removeprefix("torch."),
                "batch_size": self.batch_size}

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
              states: torch.Tensor | None = None) -> list[CandidateScores]:
        """`states`: each prompt's SR user state, for a model with a per-user soft prompt (this backend only)."""
        return score_candidates(self.model, self.tokenizer, prompts, candidates, batch_size=self.batch_size,
                                states=states)

    def constrained(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], num_beams: int
    ) -> list[list[tuple[int, float]]]:
        tries = [build_trie([encode_completion(self.tokenizer, t) for t in titles]) for titles in candidates]
        prompts_per_batch = max(1, self.batch_size // num_beams)  # each step runs up to num_beams rows per prompt
        return self._batched(prompts, prompts_per_batch, lambda group, ids: constrained_beam_search(
            self.model, ids, [tries[i] for i in group], num_beams))

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

        def run(group, ids):
            inputs, mask = left_pad(ids, self.device)
            out = self.model.generate(
                input_ids=inputs, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                repetition_penalty=1.0, eos_token_id=eos, pad_token_id=pad,
            )
            return [decode_completion(self.tokenizer, row) for row in out[:, inputs.shape[1]:].tolist()]

        return self._batched(prompts, self.batch_size, run)

    def _batched(self, prompts: Sequence[str], size: int, run) -> list:
        """`run(indices, prompt ids)` over batches of `size` similar-length prompts; results in input order."""
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list = [None] * len(ids)
        with torch.inference_mode():
            for start in range(0, len(order), size):
                group = order[start : start + size]
                for i, result in zip(group, run(group, [ids[i] for i in group])):
                    results[i] = result
        return results


def left_pad(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (pad id 0: padded positions are masked out) and attention mask, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------- constrained beam search


def constrained_beam_search(
    model, prompt_ids: list[list[int]], tries: list[TrieNode], num_beams: int
) -> list[list[tuple[int, float]]]:
    """Per prompt: the finished candidates, best first, as (candidate index, summed log-probability).

    One left-padded prompt pass over the batch, then one single-token pass per step over all live
    beams (`delrec.ranking.trie` has the search's rules). Call under `torch.inference_mode()` with
    the model in eval mode.
    """
    device = model.get_input_embeddings().weight.device
    ids, mask = left_pad(prompt_ids, device)
    lengths = mask.sum(-1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    beams = [Beam(owner, trie, 0.0) for owner, trie in enumerate(tries)]
    finished: Finished = [[] for _ in tries]
    step = 0
    while True:
        cache, logprobs = out.past_key_values, out.logits[:, -1].float().log_softmax(-1)
        rows = [row for row, beam in enumerate(beams) for _ in beam.node.children]
        tokens = [token for beam in beams for token in beam.node.children]
        values = logprobs[torch.tensor(rows, device=device), torch.tensor(tokens, device=device)].tolist()
        beams = prune((beams[row].extend(token, value, row) for row, token, value in zip(rows, tokens, values)),
                      num_beams, finished)
        if not beams:
            return ranked(finished)
        owners = torch.tensor([beam.owner for beam in beams], device=device)
        cache.reorder_cache(torch.tensor([beam.parent for beam in beams], device=device))
        step += 1
        out = model(
            input_ids=torch.tensor([[beam.tokens[-1]] for beam in beams], device=device),
            attention_mask=torch.cat([mask[owners], mask.new_ones(len(beams), step)], dim=1),
            position_ids=(lengths[owners] + step - 1)[:, None],
            past_key_values=cache,
            use_cache=True,
        )
