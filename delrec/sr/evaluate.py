"""Batched evaluation of SR models (both protocols) and the predictions file.

Full ranking: `score_all` over the split in batches; metrics from `delrec.metrics.RankingMetrics`
with each instance's history items excluded (default; `exclude_history=False` keeps them).
Candidate ranking: `score_items` on the dataset's fixed candidate sets (`dataset.candidates`),
nothing excluded; HR@1, HR@5, NDCG@5.
Scores that are NaN or inf (weights that overflow) are refused, naming the model folder, before
anything is ranked, written or served.

Predictions file (JSON lines, one row per instance of a split, in instance order):

    {"id": 0, "items": [top-K item ids, best first], "scores": [their scores]}

plus a sidecar `FILE.meta.json` = {"kind": "delrec-predictions", "format_version", "dataset_fingerprint",
"split", "topk", "exclude_history", "prefix_predictions", "rows", "sha256" (of FILE), "model":
{"model_type", "path"}}. With history exclusion a row can hold fewer than K items when the history
leaves fewer than K items to rank. `read_predictions` checks the pair against a dataset
(fingerprint, split, row count, ids, item range, finite scores, checksum) before DELRec prompts or a
distillation use it.

With `prefix_predictions` (DELRec's Temporal Analysis needs the SR model's prediction for the
first part of the same history, the one-shot example), each row also holds "prefix_length" =
k = len(history) // 2 and "prefix_items" = the top-K after `history[:k]` (its items excluded
under history exclusion; empty when k = 0).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.io import atomic_write, safetensors_bytes, write_json
from delrec.metrics import (CANDIDATE_KEYS, DEFAULT_KS, RankingMetrics, exclude_history_, history_mask, instance_metrics,
                            target_rank_counts)
from delrec.predictions import (PREDICTIONS_KIND, PREDICTIONS_VERSION, USER_STATES_FORMAT, meta_path, prefix_length,
                                user_states_path)
from delrec.sr.base import SequentialRecommender, pad_histories

CANDIDATE_KS = (1, 5)
EVAL_BATCH_SIZE = 1024
EVALUATION_FILE = "evaluation.json"  # what `sr evaluate` writes: a training run's metrics.json is never replaced


def _model_device(model: torch.nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class _EvalMode:
    """Context: model in eval mode and no autograd; restores the previous mode. A model already in
    eval mode (a loaded one) is left alone: switching walks every submodule, twice per call, which
    is a fifth of the cost of ranking one user."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        if self.was_training:
            self.model.eval()
        self.no_grad = torch.inference_mode()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        if self.was_training:
            self.model.train()


def _histories(model: SequentialRecommender, histories: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    return pad_histories(histories, model.pad_id, model.context_length).to(device)


def length_sorted_batches(histories: Sequence[Sequence[int]], batch_size: int, context: int) -> list[torch.Tensor]:
    """Row indices in batches of histories of similar (truncated) length: little padding to
    encode. Deterministic, so every caller scores each instance in the same batch. A batch size below 1
    is refused: it would make no batches, and every caller would return or write rows it never scored."""
    if batch_size < 1:
        raise DelrecError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(histories)), key=lambda i: min(len(histories[i]), context))
    return [torch.tensor(order[i:i + batch_size], dtype=torch.long) for i in range(0, len(order), batch_size)]


def check_finite_scores(model: SequentialRecommender, scores: torch.Tensor) -> None:
    """Refuse NaN or inf scores (finite weights can still overflow): they have no order, so ranking, writing
    or serving them would give arbitrary lists and invalid JSON. The sum is the fast test (one pass, no
    [B, N] mask; many times cheaper): any NaN or inf makes it non-finite, and only then are the scores counted
    (a sum that merely overflowed finds none)."""
    if bool(torch.isfinite(scores.sum(dtype=torch.float32))):
        return
    bad = ~torch.isfinite(scores)
    count = int(bad.sum())
    if count:
        name = f"{model.folder}: the SR model" if model.folder is not None else "the SR model"
        raise DelrecError(f"{name} gave {count} NaN/inf score(s) for {int(bad.any(1).sum())} of {len(scores)} "
                          "histories in a batch (its weights are broken or overflow); train the model again, e.g. "
                          "with a lower --lr")


def iter_full_scores(
    model: SequentialRecommender,
    histories: Sequence[Sequence[int]],
    batch_size: int = EVAL_BATCH_SIZE,
    exclude_history: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield (row indices, scores [b, N], exclude mask or None), batch by batch on the model's
    device; rows come in batches of similar history length, not in input order."""
    device = _model_device(model)
    with _EvalMode(model):
        for rows in length_sorted_batches(histories, batch_size, model.context_length):
            chunk = [histories[i] for i in rows.tolist()]
            scores = model.score_all(_histories(model, chunk, device))
            check_finite_scores(model, scores)
            mask = history_mask(chunk, model.num_items, device) if exclude_history else None
            yield rows, scores, mask


def evaluate_full(
    model: SequentialRecommender,
    instances,
    batch_size: int = EVAL_BATCH_SIZE,
    exclude_history: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """HR/NDCG/MRR@ks over all N items for a list of `Instance`s."""
    metrics = RankingMetrics(ks)
    histories = [inst.history for inst in instances]
    targets = torch.tensor([inst.target for inst in instances], dtype=torch.long)
    for rows, scores, mask in iter_full_scores(model, histories, batch_size, exclude_history):
        metrics.update(scores, targets[rows].to(scores.device), mask)
    return metrics.compute()


def per_instance_full(
    model: SequentialRecommender,
    instances,
    k: int,
    batch_size: int = EVAL_BATCH_SIZE,
    exclude_history: bool = True,
) -> dict[str, torch.Tensor]:
    """HR@k and NDCG@k of each instance (float64 [n], in `instances`' order), ranking all N items: the values
    `evaluate_full` averages, kept per instance for paired standard errors between two models on the same users."""
    histories = [inst.history for inst in instances]
    targets = torch.tensor([inst.target for inst in instances], dtype=torch.long)
    greater, ties = torch.zeros(len(instances), dtype=torch.long), torch.zeros(len(instances), dtype=torch.long)
    for rows, scores, mask in iter_full_scores(model, histories, batch_size, exclude_history):
        counts = target_rank_counts(scores, targets[rows].to(scores.device), mask)
        greater[rows], ties[rows] = counts[0].cpu(), counts[1].cpu()
    return instance_metrics(greater, ties, ks=(k,), metrics=("hr", "ndcg"))


def evaluate_candidates(
    model: SequentialRecommender, instances, candidates: Sequence[Sequence[int]], batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """HR@1, HR@5, NDCG@5 over the fixed candidate sets (the target is among them)."""
    device = _model_device(model)
    metrics = RankingMetrics(CANDIDATE_KS)
    with _EvalMode(model):
        for rows in length_sorted_batches([inst.history for inst in instances], batch_size, model.context_length):
            chunk = [instances[i] for i in rows.tolist()]
            lists = [candidates[i] for i in rows.tolist()]
            items = torch.tensor(lists, dtype=torch.long, device=device)
            target_index = torch.tensor([c.index(inst.target) for inst, c in zip(chunk, lists)], device=device)
            scores = model.score_items(_histories(model, [inst.history for inst in chunk], device), items)
            check_finite_scores(model, scores)
            metrics.update(scores, target_index)
    values = metrics.compute()
    return {key: values[key] for key in CANDIDATE_KEYS}


def evaluate_model(
    model: SequentialRecommender,
    dataset: PreparedDataset,
    batch_size: int = EVAL_BATCH_SIZE,
    exclude_history: bool = True,
    splits: Sequence[str] = ("valid", "test"),
    source: str | Path | None = None,
) -> dict:
    """The metrics.json body: full ranking on `splits` plus the candidate protocol."""
    check_compatible(model, dataset, source)
    result: dict = {"protocol": "full", "exclude_history": exclude_history, "dataset_fingerprint": dataset.fingerprint}
    for split in splits:
        result[split] = evaluate_full(model, dataset.instances(split), batch_size, exclude_history)
    candidates: dict = {"protocol": "candidates", "num_candidates": dataset.num_candidates}
    for split in splits:
        candidates[split] = evaluate_candidates(model, dataset.instances(split), dataset.candidates(split), batch_size)
    result["candidates"] = candidates
    return result


def check_compatible(model: SequentialRecommender, dataset: PreparedDataset, source: str | Path | None = None) -> None:
    """The model must score `dataset`'s items: the same catalogue size, and the dataset it was trained on (by
    content fingerprint: another dataset with as many items would be scored silently and wrongly)."""
    name = f"{source}: the SR model" if source is not None else "the SR model"
    if model.num_items != dataset.num_items:
        raise DelrecError(
            f"{name} scores {model.num_items} items but the dataset {dataset.path} has {dataset.num_items}; "
            "use the dataset the model was trained on"
        )
    if model.dataset_fingerprint not in (None, dataset.fingerprint):
        raise DelrecError(f"{name} was trained on dataset {model.dataset_fingerprint}, not on {dataset.path} "
                          f"(fingerprint {dataset.fingerprint}); use the dataset it was trained on")


# --- predictions ---------------------------------------------------------------------------------


def predict(
    model: SequentialRecommender,
    dataset: PreparedDataset,
    split: str,
    topk: int,
    exclude_history: bool = True,
    batch_size: int = EVAL_BATCH_SIZE,
    prefix_predictions: bool = False,
    source: str | Path | None = None,
) -> Iterator[dict]:
    """Yield one {"id", "items", "scores"} row per instance of `split`, in order (plus
    "prefix_length" and "prefix_items" with `prefix_predictions`)."""
    check_compatible(model, dataset, source)
    if not 1 <= topk <= model.num_items:
        raise DelrecError(f"--topk {topk} must be between 1 and the catalogue size ({model.num_items} items)")
    instances = dataset.instances(split)
    ranked = top_items(model, [inst.history for inst in instances], topk, exclude_history, batch_size)
    if prefix_predictions:
        prefixes = [inst.history[: prefix_length(inst.history)] for inst in instances]
        with_prefix = [i for i, prefix in enumerate(prefixes) if prefix]
        prefix_ranked = dict(zip(with_prefix, top_items(
            model, [prefixes[i] for i in with_prefix], topk, exclude_history, batch_size
        )))
    for index, (inst, kept) in enumerate(zip(instances, ranked)):
        row = {
            "id": inst.id,
            "items": [i for i, _ in kept],
            "scores": [float(f"{v:.9g}") for _, v in kept],  # 9 digits: float32 round-trips
        }
        if prefix_predictions:
            row["prefix_length"] = prefix_length(inst.history)
            row["prefix_items"] = [i for i, _ in prefix_ranked.get(index, [])]
        yield row



def top_k(model, histories: Sequence[Sequence[int]], k: int, exclude_history: bool, batch_size: int,
          progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """([R, k] items, [R, k] scores) over the whole catalogue, best first, rows in input order.

    Excluded (history) items score -inf; callers that need k real items per row check room first. Every
    row is scored (`length_sorted_batches` covers them all or refuses), so no `torch.empty` value is returned."""
    items = torch.empty(len(histories), k, dtype=torch.long)
    scores = torch.empty(len(histories), k)
    with tqdm(total=len(histories), desc="SR top-k", unit="inst", disable=not progress) as bar:
        for rows, batch, _ in iter_full_scores(model, histories, batch_size, exclude_history=False):
            if exclude_history:
                exclude_history_(batch, [histories[i] for i in rows.tolist()])
            values, top = batch.topk(k, dim=1)
            items[rows], scores[rows] = top.cpu(), values.float().cpu()
            bar.update(len(rows))
    return items, scores


def top_items(model, histories, topk: int, exclude_history: bool, batch_size: int) -> list[list[tuple[int, float]]]:
    """Per history, in input order: the top-K (item, score) pairs, excluded items dropped."""
    return ranked_pairs(*top_k(model, histories, topk, exclude_history, batch_size))


def ranked_pairs(items: torch.Tensor, scores: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per row of a `top_k` answer: its (item, score) pairs, excluded (-inf) items dropped."""
    return [[(i, v) for i, v in zip(row_items, row_values) if v != float("-inf")]
            for row_items, row_values in zip(items.tolist(), scores.tolist())]


def write_predictions(
    path: str | Path,
    model: SequentialRecommender,
    dataset: PreparedDataset,
    split: str,
    topk: int,
    exclude_history: bool = True,
    batch_size: int = EVAL_BATCH_SIZE,
    model_path: str | Path | None = None,
    prefix_predictions: bool = False,
    user_states: bool = False,
) -> dict:
    """Write the predictions file and its sidecar (each atomically), with `user_states` also the states file
    (`delrec.predictions`, "user states"); return the sidecar."""
    path = Path(path)
    digest = hashlib.sha256()
    count = 0
    with atomic_write(path) as handle:
        for row in predict(model, dataset, split, topk, exclude_history, batch_size, prefix_predictions, model_path):
            line = json.dumps(row, allow_nan=False) + "\n"  # scores are finite (`check_finite_scores`)
            handle.write(line)
            digest.update(line.encode("utf-8"))
            count += 1
    meta = {
        "kind": PREDICTIONS_KIND,
        "format_version": PREDICTIONS_VERSION,
        "dataset_fingerprint": dataset.fingerprint,
        "split": split,
        "topk": topk,
        "exclude_history": exclude_history,
        "prefix_predictions": prefix_predictions,
        "rows": count,
        "sha256": digest.hexdigest(),
        "model": {"model_type": model.model_type, "path": None if model_path is None else str(model_path)},
    }
    if user_states:
        data = user_states_bytes(model, [inst.history for inst in dataset.instances(split)], batch_size)
        with atomic_write(user_states_path(path), "wb") as handle:
            handle.write(data)
        meta["user_states"] = {"file": user_states_path(path).name, "sha256": hashlib.sha256(data).hexdigest(),
                               "dim": model.item_embeddings().shape[1]}
    write_json(meta_path(path), meta)
    return meta


def user_states_bytes(model: SequentialRecommender, histories: Sequence[Sequence[int]], batch_size: int) -> bytes:
    """The safetensors bytes of the model's state for each history (`encode`, rows in input order) and of its output
    item table: `score_all` is exactly their product, so the file carries the model's scores for any item."""
    device = _model_device(model)
    states = None
    with _EvalMode(model):
        table = model.item_embeddings().detach().float().cpu().contiguous()
        for rows in length_sorted_batches(histories, batch_size, model.context_length):
            encoded = model.encode(_histories(model, [histories[i] for i in rows.tolist()], device)).float().cpu()
            if states is None:
                states = torch.empty(len(histories), encoded.shape[1])
            states[rows] = encoded
    if states is None:
        states = torch.empty(0, table.shape[1])
    check_finite_scores(model, states)
    return safetensors_bytes({"states": states.contiguous(), "item_table": table},
                             metadata={"format": USER_STATES_FORMAT, "model_type": model.model_type})
