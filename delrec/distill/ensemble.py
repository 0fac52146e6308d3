"""Several teachers -> one teacher, weighted per instance by confidence and consistency.

docs/methods.md#several-teachers asks for a per-instance weighting of each teacher by how sure its
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

Teachers of a subset of the instances (an LLM on a budget) take part where they have a row: the
combined teacher covers the union of their instances, and on an instance a teacher without a row
gets weight 0 and is left out of the others' consistency. Teachers of item embeddings alone add
their matrix and nothing else.

Item embeddings: the teachers' matrices (those that have one) are concatenated feature-wise, so a
linear projector of the combined z_i equals the sum of one projector per teacher; their widths travel
as `embedding_blocks`, so that the student weighs each teacher's block equally
(`delrec.distill.embedding`). teacher.json's
`source` records, per teacher, its mean weight, confidence and consistency over the instances it
has a row for.
"""

from __future__ import annotations

import math
import time

import torch

from delrec.distill.teacher_folder import Teacher, check_topk, teacher_info
from delrec.errors import DelrecError

EPSILON = 1e-8
ROWS_PER_CHUNK = 4096  # bounds the [rows, T*k, T*k] comparison tensors


def combine_teachers(teachers: list[Teacher], topk: int) -> Teacher:
    """One in-memory teacher (folder None) merging `teachers` per instance (see the module docstring)."""
    started = time.perf_counter()
    _check_same_dataset(teachers)
    if topk < 1:
        raise DelrecError(f"combining teachers needs topk >= 1, got {topk}")
    ranked = [t for t in teachers if t.has_rankings]
    for teacher in ranked:
        check_topk(teacher, topk)
    embeddings = [t.embeddings for t in teachers if t.embeddings is not None]
    combined_embeddings = torch.cat(embeddings, dim=1) if embeddings else None
    ids = items = scores = None
    stats: dict[int, dict] = {}
    if ranked:
        ids, lists, probs, present = _aligned(ranked, topk)
        items, scores, weights, confidence, consistency = [], [], [], [], []
        for start in range(0, lists.shape[0], ROWS_PER_CHUNK):
            chunk = slice(start, start + ROWS_PER_CHUNK)
            c, o = _confidence(probs[chunk]), _consistency(lists[chunk], present[chunk])
            w = (c + o + EPSILON) * present[chunk]
            w = w / w.sum(dim=1, keepdim=True)
            top_items, top_scores = fuse_lists(lists[chunk], probs[chunk], w, topk)
            items.append(top_items)
            scores.append(top_scores)
            weights.append(w)
            confidence.append(c)
            consistency.append(o)
        items, scores = torch.cat(items), torch.cat(scores)
        weights, confidence, consistency = (torch.cat(x) for x in (weights, confidence, consistency))
        for j, teacher in enumerate(ranked):
            rows = present[:, j]
            stats[id(teacher)] = {key: round(float(value[rows, j].mean()), 6) for key, value in (
                ("mean_weight", weights), ("mean_confidence", confidence), ("mean_consistency", consistency))}
            stats[id(teacher)]["instances"] = int(rows.sum())
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
                **stats.get(id(t), {}),
            }
            for t in teachers
        ],
    }
    first = teachers[0]
    info = teacher_info(
        first.info["dataset_fingerprint"], first.info["num_items"], 0 if ids is None else len(ids),
        topk if ranked else None, "score" if ranked else None,
        None if combined_embeddings is None else int(combined_embeddings.shape[1]), source,
        time.perf_counter() - started, first.info.get("num_train_instances"),
    )
    return Teacher(None, info, ids, items, scores, "score" if ranked else None, combined_embeddings,
                   tuple(int(e.shape[1]) for e in embeddings))


def _check_same_dataset(teachers: list[Teacher]) -> None:
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


def _aligned(teachers: list[Teacher], k: int):
    """The union of the teachers' instance ids [U], and per teacher on those rows: its first k items
    [U, T, k], their distribution [U, T, k] and whether it has the row [U, T]. A missing row holds
    distinct negative ids (they match nothing) with mass 0."""
    ids = torch.unique(torch.cat([t.instance_ids for t in teachers]))  # sorted
    count = len(teachers)
    lists = -1 - torch.arange(count * k).reshape(1, count, k).repeat(len(ids), 1, 1)
    probs = torch.zeros(len(ids), count, k)
    present = torch.zeros(len(ids), count, dtype=torch.bool)
    for j, teacher in enumerate(teachers):
        rows = torch.searchsorted(ids, teacher.instance_ids)
        lists[rows, j] = teacher.items[:, :k]
        probs[rows, j] = _top_distribution(teacher, k)
        present[rows, j] = True
    return ids, lists, probs, present


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


def _consistency(lists: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[b, T] mean share of a teacher's top-k found in each other PRESENT teacher's top-k (1 when it is alone)."""
    b, teachers, k = lists.shape
    if teachers == 1:
        return torch.ones(b, 1)
    same = lists[:, :, None, :, None] == lists[:, None, :, None, :]  # [b, T, T, k, k]
    overlap = same.any(-1).sum(-1).float() / k  # [b, T, T]; the diagonal is 1 (items are distinct)
    others = present[:, None, :] & ~torch.eye(teachers, dtype=torch.bool)  # [b, T, T]
    count = others.sum(-1)
    mean = (overlap * others).sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.ones_like(mean))


def fuse_lists(lists: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor, k: int):
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
