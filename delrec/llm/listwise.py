"""The title-listwise objective (stage 2; stage 1 as an option): a softmax cross-entropy over the
candidates' log-likelihoods.

The answer-only LM loss teaches the model to write the target title; the read-out then ranks the
C candidates by log P(title | prompt). The listwise loss trains that ranking directly:

    s_j = log P(c_j + EOS | prompt)        (divided by the token count with `length_normalized`)
    L   = -log softmax(s / tau)[target]

so the negatives (the other candidates, titles of the same catalogue) are pushed down as the
target is pushed up (with `negatives` k, a sampled softmax over the target and k of the others,
drawn per row: fewer title tokens to score, the same prompt), which is close to DELRec's original
verbalizer classification over titles.
One prompt pass per instance serves all C candidates through the shared KV cache of the read-out
(`delrec.llm.scoring.candidate_log_likelihoods`), so a step costs about one prompt plus C short
titles, not C prompts (docs/methods.md#model-and-loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from delrec.llm.scoring import candidate_log_likelihoods
from delrec.llm.tokenization import encode_completion, encode_prompt
from delrec.llm.user_prompt import with_user_states


def listwise_loss(
    model,
    prompts: list[list[int]],
    candidates: list[list[list[int]]],
    targets: list[int],
    *,
    batch_size: int = 64,
    length_normalized: bool = False,
    temperature: float = 1.0,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """-log softmax(s / temperature)[target] per instance (`reduction="none"`) or its mean, s the candidates'
    log-likelihoods."""
    scores = candidate_log_likelihoods(model, prompts, candidates, batch_size)
    losses = []
    for values, cands, target in zip(scores, candidates, targets):
        if length_normalized:
            values = values / torch.tensor([len(c) for c in cands], dtype=values.dtype, device=values.device)
        losses.append(-torch.log_softmax(values / temperature, dim=0)[target])
    losses = torch.stack(losses)
    return losses.mean() if reduction == "mean" else losses


# The dataset columns `ListwiseCollator` reads; input_ids stays too: TRL takes a dataset with it as already tokenized.
LISTWISE_COLUMNS = ["input_ids", "prompt", "candidates", "answer", "id"]  # id seeds the sampled negatives


@dataclass
class ListwiseCollator:
    """Rows with `prompt` (text), `candidates` (titles) and `answer` (the target's index) -> token ids.

    Encoded as the read-out encodes them (`delrec.llm.tokenization`), so the loss and the
    evaluation score the same ids. With `tasks` (stage 1), also the index of each example's `task`; rows that
    carry a `user_state` (a per-user soft prompt) also give `user_states`."""

    tokenizer: object
    tasks: list[str] | None = None
    negatives: int | None = None  # score the target + this many other candidates, drawn per row (sampled softmax)
    seed: int = 0

    def __call__(self, examples: list[dict]) -> dict:
        scored = [self.scored_candidates(e) for e in examples]
        batch = {
            "prompts": [encode_prompt(self.tokenizer, e["prompt"]) for e in examples],
            "candidates": [[encode_completion(self.tokenizer, e["candidates"][j]) for j in kept]
                           for e, kept in zip(examples, scored)],
            "targets": [kept.index(int(e["answer"])) for e, kept in zip(examples, scored)],
        }
        if self.tasks is not None:
            batch["task"] = torch.tensor([self.tasks.index(e["task"]) for e in examples], dtype=torch.long)
        return with_user_states(batch, examples)

    def scored_candidates(self, example: dict) -> list[int]:
        """Indices of the candidates the loss scores, in their shown order: all of them, or with `negatives` the
        target and `negatives` others drawn without replacement, seeded by (seed, the row's id): the prompt still
        shows every candidate, only fewer titles are scored."""
        count, answer = len(example["candidates"]), int(example["answer"])
        if self.negatives is None or self.negatives >= count - 1:
            return list(range(count))
        others = [j for j in range(count) if j != answer]
        drawn = np.random.default_rng([self.seed, int(example["id"])]).choice(others, self.negatives, replace=False)
        return sorted([answer, *drawn.tolist()])
