"""DLLM2Rec's importance-aware ranking distillation (Cui et al., RecSys 2024).

For one training instance s with the student's scores y(s, i) over all N items and the teacher's
top-K list O_T = (pi_1, ..., pi_K), best first:

    L_d(s) = - sum_{k=1..K} w_{s,k} * log sigma(y(s, pi_k))
    w_{s,k} = (gp * wp_k + gc * wc_{s,k} + go * wo_{s,k}) / sum_{k'} (same),   sum_k w_{s,k} = 1

- position      wp_k = exp(-k / beta) / sum_{k'} exp(-k' / beta)                   (k = 1..K)
- confidence    `confidence: code` (default, the official code): wc_{s,k} = softmax over the K
                listed items of -distance(s, pi_k) (of +score for a teacher that writes scores),
                i.e. `Teacher.confidences()`: the items the teacher placed closest count more.
                `confidence: paper`: the paper rates the teacher's confidence in the instance by
                how far its generated text lands from the ground-truth item. We read that
                distance off the teacher's list: d*_s = the distance of the instance's target if
                the teacher listed it, else the largest distance in the list (the target is
                further than anything listed), and map it to
                    c_s = exp(-(d*_s - d_{s,min})) = conf_s(target) / max_k conf_s(k)   in (0, 1]
                (1 when the target is the teacher's closest item; for a score teacher, d = -score).
                Because w is normalised per instance, a per-instance factor cannot change how much
                an instance counts in total; c_s decides instead how far the instance's weight is
                spread over the whole list: wc_{s,k} = c_s / K for every k, so a confident
                teacher's list is trusted throughout, while for an unsure one the position and
                consistency terms (the top of the list, the items the student agrees with) take
                over. The row sums to c_s <= 1, where the code's rows sum to 1, so the gammas keep
                their scale.
- consistency   wo_{s,k} = 1 if pi_k is among the student's CURRENT top-K (recomputed every
                batch from the scores, without gradient; the instance's history items are not
                rankable, as in evaluation), else 1e-8.

The batch loss is the mean of L_d(s) over the batch; the student adds `lambda_d` * L_d to its own
loss. `negative_term: true` reproduces the official code's extra term inside L_d, per instance
-log sigma(1 - y(s, j)) with j a sampled negative (uniform over the items that are neither the
target nor in the history; the code reuses its BCE negative). The code adds it once per listed
item weighted by w_{s,k}, which sums to exactly this one term. Note sigma(1 - y), not
1 - sigma(y): a quirk, kept switchable, off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from delrec.config import above, at_least, check_fields
from delrec.distill.rd import position_weights, rd_loss, student_topk

CONSISTENCY_FLOOR = 1e-8  # the weight of a teacher item the student does not rank in its top-K


@dataclass
class DLLM2RecConfig:
    topk: int = field(default=10, metadata={"help": "K: how many of the teacher's top items are distilled (the "
                                            "teacher must have at least K).", "range": at_least(1)})
    beta: float = field(
        default=1.0, metadata={"help": "Position temperature: wp_k ∝ exp(-k / beta).", "range": above(0)}
    )
    gamma_position: float = field(
        default=0.3, metadata={"help": "gamma_p: share of the position weight.", "range": at_least(0)}
    )
    gamma_confidence: float = field(
        default=0.5, metadata={"help": "gamma_c: share of the teacher-confidence weight.", "range": at_least(0)}
    )
    gamma_consistency: float = field(
        default=0.1, metadata={"help": "gamma_o: share of the student-teacher consistency weight.",
                               "range": at_least(0)}
    )
    lambda_d: float = field(
        default=0.8, metadata={"help": "Weight of L_d added to the student's own loss (official code: 0.8).",
                               "range": at_least(0)}
    )
    confidence: Literal["code", "paper"] = field(
        default="code",
        metadata={"help": "code: softmax over the list of -distance; paper: per-instance confidence from the "
                  "ground-truth item's distance (see delrec/distill/dllm2rec.py)."},
    )
    negative_term: bool = field(
        default=False, metadata={"help": "Add the official code's extra -log sigma(1 - y_neg) term inside L_d (a quirk)."}
    )

    def __post_init__(self):
        check_fields(self)
        gammas = (self.gamma_position, self.gamma_confidence, self.gamma_consistency)
        if not sum(gammas) > 0:
            raise ValueError(f"the gammas (gamma_position, gamma_confidence, gamma_consistency) must not all be 0, "
                             f"got {gammas}")
        if self.confidence not in ("code", "paper"):
            raise ValueError(f"confidence must be 'code' or 'paper', got {self.confidence!r}")


def consistency_weights(
    scores: torch.Tensor, teacher_items: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, K]: 1 where the teacher's item is in the student's current top-K, else 1e-8 (no gradient)."""
    top = student_topk(scores, teacher_items.shape[1], exclude)
    agree = (teacher_items[:, :, None] == top[:, None, :]).any(-1)
    return agree.to(scores.dtype).clamp(min=CONSISTENCY_FLOOR)


def paper_confidence(confidences: torch.Tensor, teacher_items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] c_s = conf(target) / max conf, with the least confident listed item standing in for a
    target the teacher did not list (= exp(-(d*_s - d_min)) for a distance teacher)."""
    listed = teacher_items == targets[:, None]
    found = listed.any(1)
    at_target = (confidences * listed).sum(1)
    picked = torch.where(found, at_target, confidences.min(1).values)
    return picked / confidences.max(1).values


def importance_weights(
    position: torch.Tensor, confidence: torch.Tensor, consistency: torch.Tensor, config: DLLM2RecConfig
) -> torch.Tensor:
    """[B, K]: gp * wp + gc * wc + go * wo, normalised to sum 1 over k."""
    combined = config.gamma_position * position + config.gamma_confidence * confidence + config.gamma_consistency * consistency
    return combined / combined.sum(1, keepdim=True)


def dllm2rec_weights(
    scores: torch.Tensor,
    teacher_items: torch.Tensor,
    confidences: torch.Tensor,
    config: DLLM2RecConfig,
    targets: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, K] the importance weights w_{s,k} (no gradient: they only scale the loss terms).

    `scores` [B, N] the student's scores, `teacher_items` [B, K] best first, `confidences` [B, K]
    (`Teacher.confidences()` rows), `targets` [B] (needed for `confidence: paper`), `exclude`
    [B, N] items the student's top-K may not hold (the history).
    """
    with torch.no_grad():
        k = teacher_items.shape[1]
        position = position_weights(k, config.beta, scores.device, scores.dtype).expand(teacher_items.shape[0], k)
        if config.confidence == "code":
            confidence = confidences.to(scores.dtype)
        else:
            if targets is None:
                raise ValueError("confidence 'paper' needs the instances' targets")
            confidence = (paper_confidence(confidences.to(scores.dtype), teacher_items, targets) / k)[:, None].expand(-1, k)
        return importance_weights(position, confidence, consistency_weights(scores, teacher_items, exclude), config)


def dllm2rec_loss(listed: torch.Tensor, weights: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """L_d: mean over the batch of -sum_k w_k log sigma(y(s, pi_k)) [- log sigma(1 - y(s, neg))].

    `listed` [B, K] the student's scores of the teacher's items (with gradient), `weights` [B, K],
    `negatives` [B] the student's scores of one sampled negative per instance, or None.
    """
    loss = rd_loss(listed, weights)  # the same weighted sum as RD, with other weights
    if negatives is not None:
        loss = loss + F.softplus(negatives - 1.0).mean()
    return loss
