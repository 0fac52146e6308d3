"""RRD, relaxed ranking distillation (Kang et al., CIKM 2020, "DE-RRD"): listwise Plackett-Luce.

For one training instance s: the teacher's top-K list pi_1..pi_K ("interesting" items, ordered,
best first) and a set U of L "uninteresting" items drawn uniformly (with replacement) from the
N - K items not in the list. RRD maximises the Plackett-Luce likelihood of every permutation
that puts the interesting items first, in the teacher's order, above all uninteresting ones
(whose order among themselves does not matter):

    L_RRD(s) = - sum_{k=1..K} log( exp(y_{pi_k}) / (sum_{l>=k} exp(y_{pi_l}) + sum_{j in U} exp(y_j)) )

with y the student's raw scores (no temperature). Computed stably: the denominators are the
reversed cumulative log-sum-exp of the list, log-added to the log-sum-exp over U. The batch
loss is the mean over instances; the student adds `rrd_weight` times it. The K items are the
teacher's top-K themselves (RRD sampled them from a longer list with rank-discounted
probabilities; later work found that taking the top-K directly works better).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from delrec.config import at_least, between, check_fields
from delrec.distill.rd import MAX_SAMPLED, items_mask, sample_excluding


@dataclass
class RRDConfig:
    topk: int = field(default=10, metadata={"help": "K: how many of the teacher's top items are the ordered "
                                            "'interesting' list.", "range": at_least(1)})
    num_uninteresting: int = field(
        default=50, metadata={"help": "L: items sampled per instance, uniformly from those outside the teacher's "
                              "top-K.", "range": between(1, MAX_SAMPLED)}
    )
    rrd_weight: float = field(
        default=0.1, metadata={"help": "Weight of the RRD term added to the student's own loss.", "range": at_least(0)}
    )

    def __post_init__(self):
        check_fields(self)


def sample_uninteresting(teacher_items: torch.Tensor, num_items: int, count: int) -> torch.Tensor:
    """[B, L]: items drawn uniformly, with replacement, from those not in each row's teacher list."""
    return sample_excluding(items_mask(teacher_items, num_items), count)


def rrd_loss(listed: torch.Tensor, uninteresting: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of L_RRD(s): `listed` [B, K] the student's scores of the teacher's list (best
    first) and `uninteresting` [B, L] of the sampled items, both with gradient."""
    tail = torch.logcumsumexp(listed.flip(1), dim=1).flip(1)  # log sum_{l >= k} exp(y_{pi_l})
    rest = torch.logsumexp(uninteresting, dim=1, keepdim=True)  # log sum_{j in U} exp(y_j)
    return (torch.logaddexp(tail, rest) - listed).sum(1).mean()
