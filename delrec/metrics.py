"""Ranking metrics for both evaluation protocols (docs/methods.md#evaluation-protocols; ties: #metrics-and-ties).

Full ranking: scores [B, N] over the whole catalogue; the items already in each history are
excluded (pass `exclude`, e.g. from `history_mask`; callers exclude by default). Candidate
ranking: scores [B, C] over the fixed candidate set, the target given as its index in the
candidate list, nothing excluded. Only one item is relevant per instance, so NDCG's ideal DCG
is 1 and NDCG@K = 1/log2(rank+1) when rank <= K.

Ties. A score matrix does not say which of several equally scored items comes first, so a tie
is resolved by the EXPECTED value of each metric under uniformly random tie-breaking, computed
exactly (not sampled). With g = the number of items scoring strictly higher than the target and
t = the number of other items tied with it, the target's rank is uniform on g+1 .. g+1+t, and

    HR@K   = share of those ranks that are <= K
    NDCG@K = mean over those ranks r of [r <= K] / log2(r + 1)
    MRR@K  = mean over those ranks r of [r <= K] / r

so a constant scorer gets chance-level scores (HR@1 = 1/N), never perfect ones, and the result
does not depend on the order of the items in the score matrix. The means are evaluated with
cumulative sums of a discount table, so nothing loops over items or ranks.

Exclusion. Excluded items are neither greater than nor tied with the target: they take no rank.
The target itself is never excluded, even when the mask marks it: an item that is in the
history and comes again as the target stays rankable.

Scores. -inf ranks lowest (it ties with other -inf scores), +inf highest. NaN has no place in
an order and raises ValueError.

Empty input. A mean over zero instances is undefined: `RankingMetrics.compute()` and the
convenience functions raise ValueError when nothing was scored (check `count` first where an
empty split is legitimate).

This module depends on torch, numpy and the standard library only, so any part of the project
(or an outside script) can use it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

METRIC_NAMES = ("hr", "ndcg", "mrr")
DEFAULT_KS = (1, 5, 10, 20)
CANDIDATE_KS = (1, 5)
CANDIDATE_KEYS = ("hr@1", "hr@5", "ndcg@5")  # the headline of candidate ranking, in every table


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"cut-offs K must be positive integers, got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if not metrics or unknown:
        raise ValueError(f"metrics must be a non-empty subset of {METRIC_NAMES}, got {metrics!r}")
    return tuple(m for m in METRIC_NAMES if m in metrics)


@lru_cache(maxsize=None)
def _cumulative_gains(metric: str, kmax: int) -> torch.Tensor:
    """cum[m] = sum of the metric's gain over ranks 1..m, for m = 0..kmax (float64, CPU)."""
    ranks = torch.arange(1, kmax + 1, dtype=torch.float64)
    gains = {"hr": torch.ones_like(ranks), "ndcg": 1.0 / torch.log2(ranks + 1.0), "mrr": 1.0 / ranks}[metric]
    return torch.cat([torch.zeros(1, dtype=torch.float64), gains.cumsum(0)])


def target_rank_counts(
    scores: torch.Tensor, targets: torch.Tensor | Sequence[int], exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (number of counted items scoring above the target, number tied with it).

    `exclude[b, i]` removes item i from row b's ranking; the target is counted whatever the mask
    says. Both results are LongTensors [B] on the scores' device.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [batch, items] matrix, got shape {tuple(scores.shape)}")
    batch, num_items = scores.shape
    targets = torch.as_tensor(targets, dtype=torch.long, device=scores.device)
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape ({batch},) to match scores, got {tuple(targets.shape)}")
    if batch and (int(targets.min()) < 0 or int(targets.max()) >= num_items):
        raise ValueError(f"targets must be item indices in 0..{num_items - 1}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; a NaN score cannot be ranked (use -inf for 'never recommend')")
    if exclude is None:
        counted = torch.ones_like(scores, dtype=torch.bool)
    else:
        if exclude.shape != scores.shape or exclude.dtype != torch.bool:
            raise ValueError(
                f"exclude must be a bool tensor of shape {tuple(scores.shape)}, "
                f"got {exclude.dtype} {tuple(exclude.shape)}"
            )
        counted = ~exclude.to(scores.device)
    counted.scatter_(1, targets[:, None], False)  # the target is never compared with itself
    target_scores = scores.gather(1, targets[:, None])
    greater = ((scores > target_scores) & counted).sum(1)
    ties = ((scores == target_scores) & counted).sum(1)
    return greater, ties


def instance_metrics(
    greater: torch.Tensor | Sequence[int],
    ties: torch.Tensor | Sequence[int],
    ks: Iterable[int] = DEFAULT_KS,
    metrics: Iterable[str] = METRIC_NAMES,
) -> dict[str, torch.Tensor]:
    """Expected metric per instance (float64 [B], CPU) from `target_rank_counts`' output.

    Kept per instance so callers can also report spreads or paired tests, not only means.
    """
    ks = _check_ks(ks)
    metrics = _check_metrics(metrics)
    greater = torch.as_tensor(greater).detach().to("cpu", torch.long)
    ties = torch.as_tensor(ties).detach().to("cpu", torch.long)
    if greater.dim() != 1 or greater.shape != ties.shape:
        raise ValueError(
            f"greater and ties must be 1-D of equal length, got {tuple(greater.shape)} and {tuple(ties.shape)}"
        )
    if greater.numel() and (int(greater.min()) < 0 or int(ties.min()) < 0):
        raise ValueError("greater and ties are counts and cannot be negative")
    kmax = ks[-1]
    # The target's possible ranks are lo+1 .. hi; clamping at K keeps only those <= K.
    lo = greater.clamp(max=kmax)
    hi = (greater + ties + 1).clamp(max=kmax)
    spread = (ties + 1).to(torch.float64)
    out = {}
    for name in metrics:
        cum = _cumulative_gains(name, kmax)
        for k in ks:
            out[f"{name}@{k}"] = (cum[hi.clamp(max=k)] - cum[lo.clamp(max=k)]) / spread
    return out


def _history_index(histories: Sequence[Sequence[int]], num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) LongTensors of every history item, ids checked against the catalogue."""
    lengths = [len(h) for h in histories]
    flat = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=sum(lengths))
    if flat.size and (flat.min() < 0 or flat.max() >= num_items):
        raise ValueError(f"history item ids must be in 0..{num_items - 1}, found {flat.min()}..{flat.max()}")
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    return rows, torch.from_numpy(flat)


def history_mask(
    histories: Sequence[Sequence[int]], num_items: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool [B, num_items] marking each row's history items, for `exclude` in full ranking."""
    rows, items = _history_index(histories, num_items)
    mask = torch.zeros(len(histories), num_items, dtype=torch.bool, device=device)
    mask[rows.to(mask.device), items.to(mask.device)] = True
    return mask


def exclude_history_(scores: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """Set each row's history items to -inf in place (and return `scores`): the exclusion that a
    top-K list needs, without building and applying a [B, N] mask."""
    rows, items = _history_index(histories, scores.shape[-1])
    scores[rows.to(scores.device), items.to(scores.device)] = float("-inf")
    return scores


class RankingMetrics:
    """Accumulates mean HR/NDCG/MRR@K over batches; `compute()` gives {"hr@10": ..., ...}."""

    def __init__(self, ks: Iterable[int] = DEFAULT_KS, metrics: Iterable[str] = METRIC_NAMES):
        self.ks = _check_ks(ks)
        self.metrics = _check_metrics(metrics)
        self._sums = {f"{m}@{k}": 0.0 for m in self.metrics for k in self.ks}
        self._count = 0

    @property
    def count(self) -> int:
        """Number of instances scored so far."""
        return self._count

    def update(
        self, scores: torch.Tensor, targets: torch.Tensor | Sequence[int], exclude: torch.Tensor | None = None
    ) -> None:
        """Score one batch: full ranking (exclude = history mask) or candidates (no exclude)."""
        self.update_counts(*target_rank_counts(scores, targets, exclude))

    def update_counts(self, greater: torch.Tensor | Sequence[int], ties: torch.Tensor | Sequence[int]) -> None:
        """Add instances given their rank counts (e.g. computed elsewhere, or from ranked lists)."""
        values = instance_metrics(greater, ties, self.ks, self.metrics)
        for key, value in values.items():
            self._sums[key] += float(value.sum())
        self._count += len(next(iter(values.values())))

    def compute(self) -> dict[str, float]:
        """Means over all instances seen; ValueError when there were none."""
        if not self._count:
            raise ValueError("no instances were scored, so there are no metrics to compute (empty split?)")
        return {key: total / self._count for key, total in self._sums.items()}


def full_ranking_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    histories: Sequence[Sequence[int]] | None = None,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Metrics of one score matrix over all items; the `histories` items are excluded when given."""
    exclude = None if histories is None else history_mask(histories, scores.shape[-1], scores.device)
    metrics = RankingMetrics(ks)
    metrics.update(scores, targets, exclude)
    return metrics.compute()


def candidate_metrics(
    scores: torch.Tensor, target_index: torch.Tensor | Sequence[int], ks: Iterable[int] = CANDIDATE_KS
) -> dict[str, float]:
    """Metrics of scores [B, C] over fixed candidates; `target_index[b]` is the target's column."""
    metrics = RankingMetrics(ks)
    metrics.update(scores, target_index)
    return metrics.compute()


def metrics_from_ranked_lists(
    ranked: Sequence[Sequence[int]], targets: Sequence[int], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Metrics of top-K lists (e.g. read from a predictions file).

    The rank is the target's 1-based position (its first occurrence); a target absent from its
    list is a miss at every K, so a list shorter than K is fine.
    """
    if len(ranked) != len(targets):
        raise ValueError(f"got {len(ranked)} ranked lists for {len(targets)} targets")
    metrics = RankingMetrics(ks)
    kmax = metrics.ks[-1]
    greater = []
    for items, target in zip(ranked, targets):
        head = list(itertools.islice(items, kmax))
        # Absent (or beyond every cut-off): rank kmax + 1 scores zero everywhere.
        greater.append(head.index(target) if target in head else kmax)
    metrics.update_counts(torch.tensor(greater, dtype=torch.long), torch.zeros(len(greater), dtype=torch.long))
    return metrics.compute()


def generation_metrics(matched: Sequence[int | None], targets: Sequence[int]) -> dict[str, float]:
    """Free generation matched to candidates: HR@1 = correct / total (invalid outputs are misses),
    valid_ratio = share of outputs that matched exactly one candidate (LLaRA), and LLaRA's own
    "HR@1", correct / valid, named `hr@1_given_valid` (None when no output was valid) so that it
    is never mistaken for ours.

    `matched[i]` is the candidate the i-th output matched, or None when it matched none or several.
    """
    if len(matched) != len(targets):
        raise ValueError(f"got {len(matched)} outputs for {len(targets)} targets")
    if len(targets) == 0:
        raise ValueError("no outputs were scored, so there are no metrics to compute (empty split?)")
    valid = sum(m is not None for m in matched)
    correct = sum(m is not None and m == t for m, t in zip(matched, targets))
    return {"hr@1": correct / len(targets), "valid_ratio": valid / len(targets),
            "hr@1_given_valid": correct / valid if valid else None}


# --- significance: is a difference beyond the noise of its sample? ------------------------------------

NOISE_SE = 2.0  # a difference counts when it exceeds this many standard errors (about 95%)


def above_chance(rate: float, chance: float, n: int) -> tuple[bool, float]:
    """Whether a hit rate over n instances exceeds its chance level by more than the noise, and that margin
    (NOISE_SE binomial standard errors at the chance level)."""
    margin = NOISE_SE * math.sqrt(chance * (1 - chance) / n)
    return rate - chance > margin, margin


@dataclass
class Paired:
    """A paired difference a - b over the same instances: its mean, NOISE_SE standard errors of it (the margin, and
    the smallest difference the sample could tell from zero) and the verdict against that margin."""

    difference: float
    margin: float
    n: int

    @property
    def verdict(self) -> str:
        return "better" if self.difference > self.margin else "worse" if self.difference < -self.margin \
            else "within noise"


def paired_difference(a, b) -> Paired:
    """`Paired` of two equal-length sequences of per-instance values (same instances, same order)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("inf")
    return Paired(mean, NOISE_SE * sd / math.sqrt(n) if n else float("inf"), n)
