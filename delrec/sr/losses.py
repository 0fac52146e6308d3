"""Next-item losses over the states of the positions that have a target.

Inputs are already restricted to real (non-pad) positions: `states` [P, d], `targets` [P] and the
item table [N, d]; so the full-softmax logits are [P, N] for the P real positions only, never
[B, T, N] (games: 16,859 items). Every loss is the MEAN over the P positions of a per-position
loss ell:

- **ce** (full-softmax cross-entropy; SASRec+ of Klenitskiy & Vasilev 2023; the default):
      ell = -s+ + log sum_{j=0..N-1} exp(s_j),            s_j = h . e_j,  s+ = s_target
- **bce** (SASRec's original loss) with k negatives drawn uniformly from the N-1 items that are
  not the target (so history items can be drawn):
      ell = -log sigma(s+) - sum_{m=1..k} log(1 - sigma(s-_m))
- **gbce** (Petrov & Macdonald, RecSys 2023, "gSASRec"): BCE whose positive probability is raised
  to the power beta, i.e. the positive logit is transformed so that sigma(s+') = sigma(s+)^beta:
      ell = -log(sigma(s+)^beta) - sum_m log(1 - sigma(s-_m))
          = beta * softplus(-s+) + sum_m softplus(s-_m)
      beta = alpha * (t * (1 - 1/alpha) + 1/alpha),   alpha = k / (N - 1)  (the sampling rate)
  t in [0, 1] is the calibration parameter (paper default 0.75): t = 0 gives beta = 1 (plain
  BCE), t = 1 gives beta = alpha (calibrated to the full softmax). The paper's experiments use
  k = 256 negatives; the official code averages over the (k+1) terms where we sum them, a
  constant factor.

All use -log sigma(x) = softplus(-x) and -log(1 - sigma(x)) = softplus(x), which are stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "bce", "gbce")


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's exponent beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha = k / (N - 1)."""
    if num_items < 2:
        raise ValueError("gBCE needs at least two items")
    alpha = num_negatives / (num_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def sample_negatives(
    targets: torch.Tensor, num_items: int, num_negatives: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LongTensor [P, k]: items drawn uniformly (with replacement) from the N-1 items != target."""
    draws = torch.randint(0, num_items - 1, (targets.shape[0], num_negatives), device=targets.device, generator=generator)
    return draws + (draws >= targets[:, None]).long()  # skip the target: a uniform draw over the others


CE_BLOCK_ELEMENTS = 2**26  # at most this many logits (256 MB in float32) exist at once in the CE


class _BlockedCrossEntropy(torch.autograd.Function):
    """Mean full-softmax CE over blocks of positions, never holding all [P, N] logits.

    Forward computes each block's logits once (one exp per logit) and keeps only each position's
    logsumexp; backward recomputes a block's softmax (grad of ell w.r.t. the logits = softmax -
    onehot). When all P positions fit in one block the softmax is kept instead, so nothing is
    computed twice. Peak extra memory: one [block, N] matrix.
    """

    @staticmethod
    def forward(ctx, states, item_table, targets, block):
        count = states.shape[0]
        lse = torch.empty(count, dtype=states.dtype, device=states.device)
        kept = None
        for start in range(0, count, block):
            logits = states[start:start + block] @ item_table.T
            peak = logits.amax(dim=1, keepdim=True)
            sums = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
            lse[start:start + block] = (peak + sums.log()).squeeze(1)
            if count <= block:
                kept = logits.div_(sums)  # the softmax, reused by backward
        positive = (states * item_table[targets]).sum(-1)
        ctx.block = block
        ctx.save_for_backward(states, item_table, targets, lse, kept if kept is not None else lse.new_empty(0))
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx, grad_output):
        states, item_table, targets, lse, kept = ctx.saved_tensors
        count, block = states.shape[0], ctx.block
        scale = grad_output / count
        grad_states = torch.empty_like(states)
        grad_table = torch.zeros_like(item_table)
        for start in range(0, count, block):
            rows = states[start:start + block]
            if kept.numel():
                probs = kept
            else:
                probs = (rows @ item_table.T).sub_(lse[start:start + block, None]).exp_()
            index = torch.arange(probs.shape[0], device=probs.device)
            probs[index, targets[start:start + block]] -= 1.0
            probs.mul_(scale)
            grad_states[start:start + block] = probs @ item_table
            grad_table.addmm_(probs.T, rows)
        return grad_states, grad_table, None, None


def cross_entropy_loss(
    states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor, block: int | None = None
) -> torch.Tensor:
    """Full-softmax CE: mean over positions of -s+ + logsumexp_j s_j.

    Computed `block` positions at a time (default: as many as fit in `CE_BLOCK_ELEMENTS` logits),
    so memory stays bounded on large catalogues; the value and gradients equal
    `F.cross_entropy(states @ item_table.T, targets)`.
    """
    if states.shape[0] == 0:
        return (states.sum() + item_table.sum()) * 0.0
    if block is None:
        block = max(1, CE_BLOCK_ELEMENTS // item_table.shape[0])
    return _BlockedCrossEntropy.apply(states, item_table, targets, block)


def _positive_negative_scores(states, targets, item_table, negatives):
    positive = (states * item_table[targets]).sum(-1)  # [P]
    negative = torch.einsum("pd,pkd->pk", states, item_table[negatives])  # [P, k]
    return positive, negative


def bce_loss(
    states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """BCE with sampled negatives: mean over positions of softplus(-s+) + sum_m softplus(s-_m)."""
    positive, negative = _positive_negative_scores(states, targets, item_table, negatives)
    return (F.softplus(-positive) + F.softplus(negative).sum(-1)).mean()


def gbce_loss(
    states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor, negatives: torch.Tensor, beta: float
) -> torch.Tensor:
    """gBCE: mean over positions of beta * softplus(-s+) + sum_m softplus(s-_m)."""
    positive, negative = _positive_negative_scores(states, targets, item_table, negatives)
    return (beta * F.softplus(-positive) + F.softplus(negative).sum(-1)).mean()


def next_item_loss(
    kind: str,
    states: torch.Tensor,
    targets: torch.Tensor,
    item_table: torch.Tensor,
    num_negatives: int = 1,
    gbce_t: float = 0.75,
    generator: torch.Generator | None = None,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss named `kind` ("ce", "bce" or "gbce"); for bce/gbce, `negatives` [P, k] are sampled here unless given
    (several processes draw them for the whole batch, as one process does, and each takes its own positions')."""
    if kind == "ce":
        return cross_entropy_loss(states, targets, item_table)
    num_items = item_table.shape[0]
    if negatives is None:
        negatives = sample_negatives(targets, num_items, num_negatives, generator)
    if kind == "bce":
        return bce_loss(states, targets, item_table, negatives)
    if kind == "gbce":
        return gbce_loss(states, targets, item_table, negatives, gbce_beta(num_negatives, num_items, gbce_t))
    raise ValueError(f"unknown loss '{kind}'; expected one of {', '.join(LOSSES)}")
