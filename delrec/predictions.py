"""The SR predictions file: JSON lines `{"id", "items", "scores"}` (+ `prefix_length`, `prefix_items`)
and a sidecar `FILE.meta.json`. `delrec sr predict` writes it; the LLM stages and `delrec prompts`
read it. It lives below both so that neither has to import the other.

With `--user_states`, a third file `FILE.states.safetensors` holds what the SR model knows about each
history of the split as numbers: `states` [rows, d], its representation of instance i's history (SASRec:
the last position's final hidden state), and `item_table` [N, d], its output item embeddings, so that its
score of item j for instance i is `states[i] @ item_table[j]` (every delrec SR model scores so, except
the popularity baseline, which has no states). The LLM side reads the SR model's view of a user, or its
order over any candidate set, from this file alone (`read_user_states`), never from SR code.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError, where
from delrec.headers import FieldRule, Header, check_dataset, check_split, positive_int
from delrec.io import read_json, read_jsonl

if TYPE_CHECKING:
    import torch

PREDICTIONS_KIND = "delrec-predictions"
USER_STATES_FORMAT = "delrec-user-states"
PREDICTIONS_VERSION = 1
SIDECAR = Header("delrec predictions sidecar", "kind", PREDICTIONS_KIND, PREDICTIONS_VERSION,
                 "re-run `delrec sr predict`", version_label="predictions format version",
                 fields={"topk": FieldRule(positive_int, "a positive integer"),
                         "rows": FieldRule(lambda v: isinstance(v, int) and v >= 0, "a row count")})
# How prompts and reports name the SR model that made the predictions (its `model_type`).
DISPLAY_NAMES = {"pop": "Popularity", "sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser"}


def display_name(model_type: str) -> str:
    return DISPLAY_NAMES.get(model_type, model_type)


def prefix_length(history: Sequence[int]) -> int:
    """k of DELRec's Temporal Analysis example: the first half of the history (rounded down)."""
    return len(history) // 2


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def user_states_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".states.safetensors")


def is_predictions_file(path: str | Path) -> bool:
    """Whether `path` is a predictions file delrec wrote (its sidecar names it by checksum): safe to replace."""
    path, side = Path(path), meta_path(path)
    try:
        meta = read_json(side)
        return meta.get("kind") == PREDICTIONS_KIND and hashlib.sha256(path.read_bytes()).hexdigest() == meta.get("sha256")
    except (DelrecError, OSError, AttributeError):
        return False


@dataclass
class Predictions:
    """A validated predictions file: row i belongs to `dataset.instances(split)[i]`."""

    meta: dict
    items: list[list[int]]
    scores: list[list[float]]
    prefix_items: list[list[int]] | None = None  # with prefix predictions: the top-K after history[:k]

    def __len__(self) -> int:
        return len(self.items)


def read_predictions(path: str | Path, dataset: PreparedDataset, split: str) -> Predictions:
    """Read and validate a predictions file for `dataset`'s `split`; `DelrecError` on any mismatch."""
    path = Path(path)
    side = meta_path(path)
    if not path.is_file():
        raise DelrecError(f"{path}: predictions file not found; write one with `delrec sr predict`")
    meta = _sidecar(path, dataset, split, "`delrec sr predict`")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise DelrecError(f"{path}: content does not match its {side.name} (edited, or from another run); "
                          "re-run `delrec sr predict`")
    expected = len(dataset.instances(split))
    topk = meta.get("topk")
    n = dataset.num_items
    with_prefix = bool(meta.get("prefix_predictions"))
    instances = dataset.instances(split)
    items, scores, prefix_items = [], [], []
    for line_no, row in read_jsonl(path):
        if row.get("id") != len(items):
            raise DelrecError(f"{where(path, line_no, 'id')}: expected id {len(items)} (rows follow the {split} instances)")
        row_items, row_scores = row.get("items"), row.get("scores")
        if not isinstance(row_items, list) or not isinstance(row_scores, list) or len(row_items) != len(row_scores):
            raise DelrecError(f"{where(path, line_no, 'items')}: expected lists 'items' and 'scores' of equal length")
        if len(row_items) > topk:
            raise DelrecError(f"{where(path, line_no, 'items')}: {len(row_items)} items, more than topk {topk}")
        for item in row_items:
            if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < n:
                raise DelrecError(f"{where(path, line_no, 'items')}: item id {item!r} is not in the catalogue (0..{n - 1})")
        if len(set(row_items)) != len(row_items):  # a ranking names each item once
            twice = next(item for i, item in enumerate(row_items) if item in row_items[:i])
            raise DelrecError(f"{where(path, line_no, 'items')}: item id {twice} is ranked twice; a ranking names "
                              "each item once (re-run `delrec sr predict`)")
        for score in row_scores:  # JSON readers take NaN and Infinity; no order, no prompt can use them
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise DelrecError(f"{where(path, line_no, 'scores')}: score {json.dumps(score)} is not a finite "
                                  "number; re-run `delrec sr predict`, which refuses a model whose scores are NaN "
                                  "or inf")
        if with_prefix:
            prefix_items.append(_checked_prefix(row, instances, len(items), topk, n, path, line_no))
        items.append(row_items)
        scores.append(row_scores)
    if len(items) != expected or len(items) != meta.get("rows"):
        raise DelrecError(f"{path}: {len(items)} rows for {expected} {split} instances (the sidecar says {meta.get('rows')})")
    return Predictions(meta, items, scores, prefix_items if with_prefix else None)


def _checked_prefix(row: dict, instances, index: int, topk: int, n: int, path: Path, line_no: int) -> list[int]:
    if index >= len(instances):
        return []  # the row count check reports the mismatch
    expected = prefix_length(instances[index].history)
    if row.get("prefix_length") != expected:
        raise DelrecError(f"{where(path, line_no, 'prefix_length')}: expected {expected} (half the history), "
                          f"got {row.get('prefix_length')!r}")
    prefix = row.get("prefix_items")
    if not isinstance(prefix, list) or len(prefix) > topk or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in prefix
    ) or len(set(prefix)) != len(prefix):
        raise DelrecError(f"{where(path, line_no, 'prefix_items')}: expected at most {topk} distinct item ids in "
                          f"0..{n - 1}")
    return prefix


@dataclass
class UserStates:
    """The SR model's representation of each history of a split (row i: instance i) and its output item table."""

    states: torch.Tensor  # [rows, d] float32
    item_table: torch.Tensor  # [N, d] float32
    model_type: str
    sha256: str  # of the states file: what a cache or a trained folder records

    @property
    def dim(self) -> int:
        return self.states.shape[1]

    def item_table_digest(self) -> str:
        """SHA-256 of the item table's float32 bytes: which SR model's scores these are, whichever split."""
        return hashlib.sha256(self.item_table.contiguous().numpy().tobytes()).hexdigest()

    def scores(self, rows: Sequence[int], items: Sequence[Sequence[int]]) -> torch.Tensor:
        """The SR model's scores [len(rows), M] of `items[k]` (M items each) for instance `rows[k]`."""
        import torch

        vectors = self.item_table[torch.tensor(items, dtype=torch.long)]  # [R, M, d]
        return torch.einsum("rd,rmd->rm", self.states[torch.tensor(rows, dtype=torch.long)], vectors)


def _sidecar(path: Path, dataset: PreparedDataset, split: str, command: str) -> dict:
    """The sidecar of predictions file `path`, checked to be of `dataset`'s `split`."""
    side = meta_path(path)
    if not side.is_file():
        raise DelrecError(f"{path}: no {side.name} beside it, so it is not a delrec predictions file; write one with "
                          f"{command}")
    meta = SIDECAR.read(side)
    check_dataset(meta, path, dataset, "predictions were made", f"re-run `delrec sr predict --data {dataset.path}`")
    check_split(meta, path, split, "holds predictions")
    return meta


def read_user_states(path: str | Path, dataset: PreparedDataset, split: str) -> UserStates:
    """The user states written with the predictions file `path` (`delrec sr predict --user_states`), checked against
    its sidecar (checksum, shapes) and `dataset`'s `split`; `DelrecError` on any mismatch."""
    from safetensors import SafetensorError, safe_open

    from delrec.tensors import first_nonfinite

    path = Path(path)
    side = meta_path(path)
    meta = _sidecar(path, dataset, split, "`delrec sr predict --user_states`")
    recorded = meta.get("user_states")
    again = f"re-run `delrec sr predict --split {split} --user_states`"
    if not isinstance(recorded, dict):
        raise DelrecError(f"{path}: written without user states, which this needs (the SR model's representation of "
                          f"each history); {again}")
    states_file = user_states_path(path)
    if not states_file.is_file():
        raise DelrecError(f"{states_file}: user-states file not found beside {path.name}; {again}")
    if hashlib.sha256(states_file.read_bytes()).hexdigest() != recorded.get("sha256"):
        raise DelrecError(f"{states_file}: content does not match {side.name} (edited, or from another run); {again}")
    try:
        with safe_open(str(states_file), framework="pt") as handle:
            info = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in ("states", "item_table") if key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise DelrecError(f"{states_file}: not a readable safetensors file ({exc}); {again}") from None
    if info.get("format") != USER_STATES_FORMAT or len(tensors) != 2:
        raise DelrecError(f"{states_file}: not a delrec user-states file (format '{USER_STATES_FORMAT}' with tensors "
                          f"states and item_table); {again}")
    states, table = tensors["states"], tensors["item_table"]
    rows = len(dataset.instances(split))
    if (states.ndim != 2 or table.ndim != 2 or states.shape[0] != rows or table.shape[0] != dataset.num_items
            or states.shape[1] != table.shape[1] or not states.is_floating_point() or not table.is_floating_point()):
        raise DelrecError(f"{states_file}: states {list(states.shape)} and item_table {list(table.shape)}, expected "
                          f"[{rows}, d] and [{dataset.num_items}, d] floating-point tensors for the {split} split; "
                          f"{again}")
    bad = first_nonfinite([("states", states), ("item_table", table)])
    if bad:
        raise DelrecError(f"{states_file}: {bad[0]} holds {bad[1]} NaN or inf values; {again}")
    return UserStates(states.float(), table.float(), str((meta.get("model") or {}).get("model_type")),
                      recorded["sha256"])


def sr_order(states: UserStates, row: int, candidates: Sequence[int]) -> list[int]:
    """`candidates` in the SR model's order for instance `row`, best first (ties: the earlier candidate first)."""
    scores = states.scores([row], [list(candidates)])[0].tolist()
    return [candidates[j] for j in sorted(range(len(candidates)), key=lambda j: (-scores[j], j))]
