"""Several teachers -> one teacher, weighted per instance by confidence and consistency.

METHODS.md ("Several teachers") asks for a per-instance weighting of each teacher by how sure its
ranking is and how much it agrees with the others; the papers' formulas are not available, so
this is ours. For one training instance s, teachers t = 1..T, each cut to its first k = `topk`
items L_t and p_t = softmax over those k of its scores (of its negated distances), i.e. the
teacher's own `Teacher.confidences()` renormalised over its top k:

    confidence   c_t = 1 - H(p_t) / log k               in [0, 1]: 1 = all mass on one item,
                                                        0 = flat (c_t = 1 when k = 1)
    consistency  o_t = mean over u != t of |L_t ∩ L_u| / k    in [0, 1] (o_t = 1 when T = 1)
    weight       w_t = (c_t + o_t + ε) / Σ_u (c_u + o_u + ε),   ε = 1e-8 (all zero: equal weights)
    fused mass   F(i) = Σ_t w_t · p_t(i)                p_t(i) = 0 when i is not in L_t

The combined top-k is the k items of the union with the largest F (ties: lower item id first),
with score log F (kind "score"), so the combined teacher's `confidences()` is the weighted
mixture of the teachers' distributions renormalised over its top k, which is what DLLM2Rec's
confidence weight then reads. A teacher that is unsure (flat p_t) and agrees with nobody gets a
weight near 0; confidence and consistency are added, not multiplied, so a confident teacher that
alone finds an item still contributes. Scores enter only through p_t, so confidences are
comparable across teachers only as far as their score scales are (an SR model's logits, an LLM's
log-likelihoods, L2 distances): calibrate by the teachers' own temperature if one dominates.

Item embeddings: the teachers' matrices (those that have one) are concatenated feature-wise, so a
linear projector of the combined z_i equals the sum of one projector per teacher. teacher.json's
`source` records, per teacher, its mean weight, confidence and consistency over the instances.
"""

from __future__ import annotations

import math
import time

import torch

from delrec.distill.teacher import Teacher, check_topk, teacher_info
from delrec.errors import DelrecError

EPSILON = 1e-8
ROWS_PER_CHUNK = 4096  # bounds the [rows, T*k, T*k] comparison tensors


def combine_teachers(teachers: list[Teacher], topk: int) -> Teacher:
    """One in-memory teacher (folder None) merging `teachers` per instance (see the module docstring)."""
    started = time.perf_counter()
    _check_same_instances(teachers)
    if topk < 1:
        raise DelrecError(f"combining teachers needs topk >= 1, got {topk}")
    for teacher in teachers:
        check_topk(teacher, topk)
    lists = torch.stack([t.items[:, :topk] for t in teachers], dim=1)  # [R, T, k]
    probs = torch.stack([_top_distribution(t, topk) for t in teachers], dim=1)  # [R, T, k]
    items, scores, weights, confidence, consistency = [], [], [], [], []
    for start in range(0, lists.shape[0], ROWS_PER_CHUNK):
        chunk = slice(start, start + ROWS_PER_CHUNK)
        c, o = _confidence(probs[chunk]), _consistency(lists[chunk])
        w = c + o + EPSILON
        w = w / w.sum(dim=1, keepdim=True)
        top_items, top_scores = _fuse(lists[chunk], probs[chunk], w, topk)
        items.append(top_items)
        scores.append(top_scores)
        weights.append(w)
        confidence.append(c)
        consistency.append(o)
    weights, confidence, consistency = (torch.cat(x) for x in (weights, confidence, consistency))
    embeddings = [t.embeddings for t in teachers if t.embeddings is not None]
    source = {
        "kind": "ensemble",
        "rule": "w = (1 - H(p)/log k) + mean top-k overlap, normalised per instance; score = log sum_t w_t p_t",
        "teachers": [
            {
                "folder": None if t.folder is None else str(t.folder),
                "kind": (t.info.get("source") or {}).get("kind"),
                "topk": t.topk,
                "score_kind": t.score_kind,
                "embedding_dim": None if t.embeddings is None else int(t.embeddings.shape[1]),
                "mean_weight": round(float(weights[:, j].mean()), 6),
                "mean_confidence": round(float(confidence[:, j].mean()), 6),
                "mean_consistency": round(float(consistency[:, j].mean()), 6),
            }
            for j, t in enumerate(teachers)
        ],
    }
    first = teachers[0]
    combined_embeddings = torch.cat(embeddings, dim=1) if embeddings else None
    info = teacher_info(
        first.info["dataset_fingerprint"], first.info["num_items"], len(first.instance_ids), topk, "score",
        None if combined_embeddings is None else int(combined_embeddings.shape[1]), source,
        time.perf_counter() - started,
    )
    return Teacher(None, info, first.instance_ids.clone(), torch.cat(items), torch.cat(scores), "score",
                   combined_embeddings)


def _check_same_instances(teachers: list[Teacher]) -> None:
    if not teachers:
        raise DelrecError("combining teachers needs at least one teacher")
    first = teachers[0]
    for teacher in teachers[1:]:
        for key in ("dataset_fingerprint", "num_items", "split"):
            if teacher.info.get(key) != first.info.get(key):
                raise DelrecError(
                    f"{teacher.folder or 'teacher'}: {key} {teacher.info.get(key)!r} differs from "
                    f"{first.folder or 'the first teacher'}'s {first.info.get(key)!r}; combine teachers of one dataset"
                )
        if not torch.equal(teacher.instance_ids, first.instance_ids):
            raise DelrecError(f"{teacher.folder or 'teacher'}: its rows are other train instances than "
                              f"{first.folder or 'the first teacher'}'s; combine teachers of one dataset")


def _top_distribution(teacher: Teacher, k: int) -> torch.Tensor:
    """[R, k] softmax of the teacher's first k scores (negated distances)."""
    p = teacher.confidences()[:, :k]
    return p / p.sum(dim=1, keepdim=True)


def _confidence(probs: torch.Tensor) -> torch.Tensor:
    """[b, T] 1 - normalised entropy of each teacher's top-k distribution."""
    k = probs.shape[-1]
    if k == 1:
        return torch.ones(probs.shape[:2])
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return (1.0 - entropy / math.log(k)).clamp(0.0, 1.0)


def _consistency(lists: torch.Tensor) -> torch.Tensor:
    """[b, T] mean share of a teacher's top-k found in each other teacher's top-k."""
    b, teachers, k = lists.shape
    if teachers == 1:
        return torch.ones(b, 1)
    same = lists[:, :, None, :, None] == lists[:, None, :, None, :]  # [b, T, T, k, k]
    overlap = same.any(-1).sum(-1).float() / k  # [b, T, T]; the diagonal is 1 (items are distinct)
    return (overlap.sum(-1) - 1.0) / (teachers - 1)


def _fuse(lists: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor, k: int):
    """The k items with the largest weighted mass over the union of the lists, and log of that mass."""
    b = lists.shape[0]
    flat = lists.reshape(b, -1)  # [b, T*k]
    mass = (weights[:, :, None] * probs).reshape(b, -1)
    same = flat[:, :, None] == flat[:, None, :]  # [b, T*k, T*k]
    fused = (same * mass[:, None, :]).sum(-1)  # each entry: the total mass of its item
    repeat = (same & torch.ones_like(same[0]).tril(-1)).any(-1)  # an earlier entry holds the same item
    fused = fused.masked_fill(repeat, -1.0)
    by_item = flat.argsort(dim=1, stable=True)
    by_mass = (-fused.gather(1, by_item)).argsort(dim=1, stable=True)  # ties keep the lower item id first
    chosen = by_item.gather(1, by_mass)[:, :k]
    return flat.gather(1, chosen), fused.gather(1, chosen).clamp_min(torch.finfo(torch.float32).tiny).log()
