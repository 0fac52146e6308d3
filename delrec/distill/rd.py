"""RD, ranking distillation (Tang & Wang, KDD 2018), and the pieces the other ranking losses share.

For one training instance s with the student's scores y(s, i) over all N items and the teacher's
ranked list O_T = (pi_1, ..., pi_K), best first:

    L_RD(s) = - sum_{k=1..K} w_k * log sigma(y(s, pi_k))

    position weight    w^a_k = exp(-k / beta) / sum_{k'} exp(-k' / beta)           (k = 1..K)
    dynamic weight     w^b_k = tanh(max(mu * (r_k - k), 0))    (`dynamic_weight`, off by default)
                       r_k = the student's current rank (1 = best, among all items but the
                       instance's history) of pi_k; RD's "hybrid" weight is w^a * w^b, normalised
                       to sum 1 over k: only the teacher items the student ranks BELOW the
                       teacher's position count, the more so the lower. A row where the student
                       already ranks every teacher item at least as high as the teacher gets no
                       distillation term. RD estimated r_k by sampling; we compute it exactly (the
                       scores over all items are at hand), without gradient.
    negatives (`rd_negatives` = L > 0, off by default):
                       + (1/L) sum_{j in U} -log(1 - sigma(y(s, j))),  U = L items drawn uniformly
                       (with replacement) from the N - K items NOT in the teacher's list. RD leaves
                       negatives to the student's own loss (its sampled BCE); with a full-softmax
                       student nothing in the positive-only term keeps all scores from rising,
                       which is what this option is for.

The batch loss is the mean of L_RD(s) over the instances; the student adds `rd_weight` times it.
Scores are raw dot products, as the student scores items (no temperature). The losses here and in
rrd.py / dllm2rec.py take the student's scores of the items they need (with gradient); the weights
take its scores over all items, without gradient (only they need the whole ranking).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from delrec.config import above, at_least, between, check_fields

MAX_SAMPLED = 100_000
"""Items sampled per instance (RD's negatives, RRD's uninteresting items): papers use tens to hundreds; each
one costs a student score with gradient per instance of every batch."""


@dataclass
class RDConfig:
    topk: int = field(default=10, metadata={"help": "K: how many of the teacher's top items are distilled (the "
                                            "teacher must have at least K).", "range": at_least(1)})
    beta: float = field(
        default=1.0, metadata={"help": "Position temperature: w_k ∝ exp(-k / beta) (RD's lambda).", "range": above(0)}
    )
    rd_weight: float = field(
        default=0.8, metadata={"help": "Weight of the RD term added to the student's own loss (DLLM2Rec's lambda_d "
                               "default, so the two differ only in their weights).", "range": at_least(0)}
    )
    dynamic_weight: bool = field(
        default=False, metadata={"help": "Multiply by RD's dynamic weight tanh(max(mu * (student rank - teacher rank), 0))."}
    )
    dynamic_mu: float = field(
        default=0.1, metadata={"help": "mu of the dynamic weight (RD's default 0.1).", "range": above(0)}
    )
    rd_negatives: int = field(
        default=0, metadata={"help": "L > 0: add -log(1 - sigma(y)) averaged over L items sampled outside the "
                             "teacher's list.", "range": between(0, MAX_SAMPLED)}
    )

    def __post_init__(self):
        check_fields(self)


def position_weights(k: int, beta: float, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
    """[K]: w_k ∝ exp(-k / beta) for k = 1..K, summing to 1 (shared by RD and DLLM2Rec)."""
    ranks = torch.arange(1, k + 1, device=device, dtype=dtype)
    return torch.softmax(-ranks / beta, dim=0)


def student_ranks(scores: torch.Tensor, items: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K] rank (1 = best) of each `items[b, k]` under `scores[b]`: 1 + the number of items
    scoring strictly higher, `exclude`d items not counted. No gradient."""
    with torch.no_grad():
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        picked = scores.gather(1, items)
        return 1 + (scores[:, None, :] > picked[:, :, None]).sum(-1)


def student_topk(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """[B, k] the student's current top-k items (`exclude`d items never among them). No gradient."""
    with torch.no_grad():
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return scores.topk(k, dim=1).indices


def sample_excluding(excluded: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] items drawn uniformly, with replacement, from the items NOT marked in the bool
    mask `excluded` [B, N] (a row must leave at least one item)."""
    allowed = (~excluded).float()
    if (allowed.sum(1) == 0).any():
        raise ValueError("cannot sample: a row excludes every item")
    return torch.multinomial(allowed, count, replacement=True)  # the global RNG: seeded and checkpointed by the trainer


def items_mask(items: torch.Tensor, num_items: int) -> torch.Tensor:
    """Bool [B, N]: True at each row's listed items (ids >= N, e.g. a padding id, are ignored)."""
    mask = torch.zeros(items.shape[0], num_items + 1, dtype=torch.bool, device=items.device)
    mask.scatter_(1, items.clamp(max=num_items), True)
    return mask[:, :num_items]


def rd_weights(
    teacher_items: torch.Tensor, config: RDConfig, scores: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[B, K] the weights of the RD term: position weights, times the dynamic weight if enabled
    (which needs the student's `scores` [B, N] over all items; `exclude`d items take no rank)."""
    b, k = teacher_items.shape
    weights = position_weights(k, config.beta, teacher_items.device, dtype).expand(b, k)
    if not config.dynamic_weight:
        return weights
    if scores is None:
        raise ValueError("RD's dynamic weight needs the student's scores over all items")
    positions = torch.arange(1, k + 1, device=teacher_items.device)
    dynamic = torch.tanh((config.dynamic_mu * (student_ranks(scores, teacher_items, exclude) - positions)).clamp(min=0))
    weights = weights * dynamic
    return weights / weights.sum(1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)


def rd_loss(listed: torch.Tensor, weights: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of -sum_k w_k log sigma(y(s, pi_k)) [+ mean_j -log(1 - sigma(y(s, j)))].

    `listed` [B, K] the student's scores of the teacher's items (with gradient), `weights` [B, K],
    `negatives` [B, L] the student's scores of the sampled items, or None.
    """
    loss = (weights * F.softplus(-listed)).sum(1)
    if negatives is not None:
        loss = loss + F.softplus(negatives).mean(1)
    return loss.mean()
