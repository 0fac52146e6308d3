"""The teacher folder: what forward distillation reads, whoever wrote it.

A teacher folder holds, for training instances of one prepared dataset (all of them, or a
subset: an LLM teacher on a budget), the teacher's top-K items over the whole catalogue with a
score or a distance each, and/or an item embedding matrix (a teacher of item knowledge alone has
no rankings). `delrec teacher export` writes it from an SR model or an LLM; any external system
can write the same files (safetensors + JSON) and the students read them unchanged.

    OUT/teacher.json                  {"format": "delrec-teacher", "format_version": 1,
                                       "dataset_fingerprint", "split": "train", "num_instances"
                                       (rows; 0 without rankings), "num_train_instances",
                                       "num_items", "topk" and "score_kind": "score" | "distance"
                                       (null without rankings), "embedding_dim" (null without
                                       embeddings),
                                       "source": {"kind": "sr" | "llm-grounding" | "llm-rerank" |
                                                  "llm-embeddings" | "ensemble" | anything, ...},
                                       "seconds", "instances_per_second" (null when unknown)}
    OUT/rankings.safetensors          (optional) instance_ids int64 [R]: train instance ids,
                                          strictly increasing: every train instance, or a subset
                                      items int64 [R, K]: item ids in [0, N), best first, no repeats
                                      scores float32 [R, K]: "score": higher is better (non-increasing
                                          along a row); "distance": lower is better (non-decreasing)
    OUT/item_embeddings.safetensors   (optional) embeddings float32 [N, D]: z_i, one row per item
    OUT/user_states.safetensors       (optional) instance_ids int64 [R']: train instance ids, strictly
                                          increasing (the rankings' ids exactly when both files exist)
                                      states float32 [R', D']: the teacher's representation of each
                                          instance (user / sequence): an SR model's state after the
                                          history, an LLM's hidden state of the prompt; teacher.json
                                          says "user_state_dim": D' (null or absent without the file)
A folder holds rankings or item embeddings (or both); user states only beside one of them. Students
distil the ranking term on the instances that have a row and train on the others with their own loss
alone; the latent methods (delrec.distill.de, delrec.distill.topology) read the item embeddings and
the user states; `--method hetcomp` reads the trajectory. Folders written before user states or trajectories
existed have no such file and load unchanged (`Teacher.user_states` / `Teacher.trajectory` None); readers that
predate the trajectory ignore it and distil the final rankings.

`load_teacher` checks all of it against the dataset (fingerprint, split, row ids, item range,
top-K size, finite scores, order, embedding rows), so a teacher for another dataset, a truncated
file or NaN scores fail with one line naming the file, instead of training a student on
misaligned rows. This module needs torch and safetensors only: students train without the LLM
stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.headers import Header, check_dataset, check_split
from delrec.io import is_occupied, replace_directory, safetensors_bytes, staged_directory, write_json

FORMAT = "delrec-teacher"
FORMAT_VERSION = 1
SPLIT = "train"
SCORE_KINDS = ("score", "distance")
INFO_FILE = "teacher.json"
RANKINGS_FILE = "rankings.safetensors"
EMBEDDINGS_FILE = "item_embeddings.safetensors"
USER_STATES_FILE = "user_states.safetensors"
TRAJECTORY_FILE = "trajectory.safetensors"
HEADER = Header("teacher description", "format", FORMAT, FORMAT_VERSION, "re-export the teacher",
                version_label="teacher format version")


@dataclass(frozen=True)
class Trajectory:
    """A teacher's rankings at C checkpoints of its training, oldest first, rows keyed like its rankings; the
    final model's rankings are the teacher's `items` / `scores`, not one of the C."""

    epochs: tuple[int, ...]  # [C] the checkpoints' epochs, strictly increasing
    items: torch.LongTensor  # [C, R, K], best first
    scores: torch.FloatTensor  # [C, R, K], the teacher's score_kind

    def __len__(self) -> int:
        return len(self.epochs)


@dataclass
class Teacher:
    """A validated teacher: row r of `items`/`scores` belongs to train instance `instance_ids[r]`;
    without rankings (an item-embedding teacher) those three are None."""

    folder: Path | None  # None: built in memory (e.g. `combine_teachers`)
    info: dict  # teacher.json
    instance_ids: torch.LongTensor | None  # [R]
    items: torch.LongTensor | None  # [R, K], best first
    scores: torch.FloatTensor | None  # [R, K]
    score_kind: str | None  # "score": higher is better; "distance": lower is better
    embeddings: torch.FloatTensor | None = None  # [N, D]
    embedding_blocks: tuple[int, ...] = ()  # several teachers' matrices side by side: their widths
    user_state_ids: torch.LongTensor | None = None  # [R'] train instance ids of `user_states`' rows
    user_states: torch.FloatTensor | None = None  # [R', D'] the teacher's representation of each instance
    trajectory: Trajectory | None = None  # rankings at earlier checkpoints, rows as `instance_ids`
    _row_index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def has_rankings(self) -> bool:
        return self.items is not None

    @property
    def topk(self) -> int | None:
        return None if self.items is None else int(self.items.shape[1])

    def confidences(self) -> torch.Tensor:
        """[R, K] softmax over each row's K of the scores (of the negated distances): the official
        DLLM2Rec code's confidence, and the distribution the ensemble mixes."""
        return torch.softmax(self.scores if self.score_kind == "score" else -self.scores, dim=-1)

    def rows(self, instance_ids: torch.Tensor, missing_ok: bool = False) -> torch.Tensor:
        """[B] row of each train instance id (on the ids' device); an absent id is -1 with `missing_ok`
        (a teacher of a subset), else a `DelrecError`."""
        device = instance_ids.device
        if device not in self._row_index:
            index = torch.full((int(self.instance_ids.max()) + 1,), -1, dtype=torch.long)
            index[self.instance_ids] = torch.arange(len(self.instance_ids))
            self._row_index[device] = index.to(device)
        index = self._row_index[device]
        ids = instance_ids.long()
        inside = (ids >= 0) & (ids < len(index))
        rows = torch.where(inside, index[ids.clamp(0, len(index) - 1)], -1)
        if not missing_ok and bool((rows < 0).any()):
            missing = ids[rows < 0][:3].tolist()
            raise DelrecError(
                f"{self.folder or 'teacher'}: no row for train instance id(s) {missing}; the teacher was written "
                "for another dataset or split"
            )
        return rows


def teacher_info(
    dataset_fingerprint: str,
    num_items: int,
    num_instances: int,
    topk: int | None,
    score_kind: str | None,
    embedding_dim: int | None,
    source: dict | None,
    seconds: float | None,
    num_train_instances: int | None = None,
    user_state_dim: int | None = None,
    trajectory: Sequence[int] | None = None,
) -> dict:
    """The teacher.json body (also the `info` of an in-memory teacher); `trajectory`: the checkpoints' epochs."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset_fingerprint": dataset_fingerprint,
        "split": SPLIT,
        "num_instances": num_instances,
        "num_train_instances": num_train_instances,
        "num_items": num_items,
        "topk": topk,
        "score_kind": score_kind,
        "embedding_dim": embedding_dim,
        "user_state_dim": user_state_dim,
        "trajectory": None if trajectory is None else [int(e) for e in trajectory],
        "source": source or {"kind": "unknown"},
        "seconds": None if seconds is None else round(seconds, 3),
        "instances_per_second": round(num_instances / seconds, 3) if seconds and num_instances else None,
    }


def check_teacher_out(out: Path) -> None:
    """A teacher folder replaces an existing teacher folder only; anything else there is refused."""
    if is_occupied(out) and not (out / INFO_FILE).is_file():
        raise DelrecError(f"{out} already exists and is not a teacher folder (no {INFO_FILE}); choose another --out")


def write_teacher(
    out: str | Path,
    dataset: PreparedDataset,
    instance_ids: torch.Tensor | None,
    items: torch.Tensor | None,
    scores: torch.Tensor | None,
    score_kind: str | None,
    embeddings: torch.Tensor | None = None,
    source: dict | None = None,
    seconds: float | None = None,
    user_states: torch.Tensor | None = None,
    user_state_ids: torch.Tensor | None = None,
    trajectory: Trajectory | None = None,
) -> Path:
    """Check the arrays against `dataset` and write the teacher folder `out` (built aside, then moved in).

    `instance_ids`, `items`, `scores` and `score_kind` are all None for a teacher of item embeddings
    alone. `user_states` [R', D']: each instance's representation, rows for `user_state_ids` (default: the
    rankings' `instance_ids`). `trajectory`: the rankings at earlier checkpoints (rows as `instance_ids`, the same
    K and score kind). An existing teacher folder at `out` is replaced; any other non-empty folder is refused.
    """
    out = Path(out)
    check_teacher_out(out)
    ranked = items is not None
    if not ranked and embeddings is None:
        raise ValueError("a teacher needs rankings, item embeddings, or both")
    if ranked:
        instance_ids = instance_ids.detach().cpu().long().contiguous()
        items = items.detach().cpu().long().contiguous()
        scores = scores.detach().cpu().float().contiguous()
    if embeddings is not None:
        embeddings = embeddings.detach().cpu().float().contiguous()
    if user_states is not None:
        if user_state_ids is None:
            if not ranked:
                raise ValueError("user states without rankings need their user_state_ids")
            user_state_ids = instance_ids
        user_state_ids = user_state_ids.detach().cpu().long().contiguous()
        user_states = user_states.detach().cpu().float().contiguous()
    if trajectory is not None:
        if not ranked:
            raise ValueError("a trajectory needs the final rankings beside it")
        trajectory = Trajectory(tuple(trajectory.epochs), trajectory.items.detach().cpu().long().contiguous(),
                                trajectory.scores.detach().cpu().float().contiguous())
    label = f"teacher for {out}" + (f" from {source['model']}" if source and source.get("model") else "")
    if ranked:
        _check_rankings(dataset, instance_ids, items, scores, score_kind, label)
    _check_embeddings(dataset, embeddings, label)
    _check_user_states(dataset, user_state_ids, user_states, instance_ids if ranked else None, label)
    if trajectory is not None:
        _check_trajectory(dataset, instance_ids, items, score_kind, instance_ids, trajectory, label)
    info = teacher_info(dataset.fingerprint, dataset.num_items, len(instance_ids) if ranked else 0,
                        items.shape[1] if ranked else None, score_kind if ranked else None,
                        None if embeddings is None else int(embeddings.shape[1]), source, seconds,
                        len(dataset.instances(SPLIT)),
                        None if user_states is None else int(user_states.shape[1]),
                        None if trajectory is None else trajectory.epochs)
    with staged_directory(out) as tmp:
        if ranked:
            (tmp / RANKINGS_FILE).write_bytes(safetensors_bytes(
                {"instance_ids": instance_ids, "items": items, "scores": scores},
                metadata={"format": FORMAT, "score_kind": score_kind}))
        if embeddings is not None:
            (tmp / EMBEDDINGS_FILE).write_bytes(safetensors_bytes({"embeddings": embeddings},
                                                                  metadata={"format": FORMAT}))
        if user_states is not None:
            (tmp / USER_STATES_FILE).write_bytes(safetensors_bytes(
                {"instance_ids": user_state_ids, "states": user_states}, metadata={"format": FORMAT}))
        if trajectory is not None:
            (tmp / TRAJECTORY_FILE).write_bytes(safetensors_bytes(
                {"instance_ids": instance_ids, "items": trajectory.items, "scores": trajectory.scores},
                metadata={"format": FORMAT, "score_kind": score_kind}))
        write_json(tmp / INFO_FILE, info)
        replace_directory(tmp, out)
    return out


def load_teacher(folder: str | Path, dataset: PreparedDataset, min_topk: int | None = None) -> Teacher:
    """Read and validate the teacher folder `folder` for `dataset`'s train split.

    `min_topk`: the K the caller's loss needs; a teacher with a shorter list is refused.
    """
    folder = Path(folder)
    export = "write one with `delrec teacher export`"
    if not folder.is_dir():
        raise DelrecError(f"teacher folder not found: {folder}; {export}")
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise DelrecError(f"{folder}: not a teacher folder (no {INFO_FILE}); {export}")
    info = HEADER.read(info_path)
    check_dataset(info, info_path, dataset, "teacher was made", f"re-export it with --data {dataset.path}")
    check_split(info, info_path, SPLIT, "teacher", "students distil from the train split; re-export it")
    rankings_path, embeddings_path = folder / RANKINGS_FILE, folder / EMBEDDINGS_FILE
    instance_ids = items = scores = score_kind = embeddings = None
    if rankings_path.is_file():
        score_kind = info.get("score_kind")
        if score_kind not in SCORE_KINDS:
            raise DelrecError(f"{info_path}: field 'score_kind' is {score_kind!r}, expected one of "
                              f"{', '.join(SCORE_KINDS)}")
        tensors = _read_tensors(rankings_path, ("instance_ids", "items", "scores"))
        instance_ids, items, scores = (tensors[k] for k in ("instance_ids", "items", "scores"))
    elif info.get("topk") is not None:
        raise DelrecError(f"{folder}: teacher folder is missing {RANKINGS_FILE} ({INFO_FILE} says topk "
                          f"{info['topk']}); re-export the teacher")
    if embeddings_path.is_file():
        embeddings = _read_tensors(embeddings_path, ("embeddings",))["embeddings"]
    elif info.get("embedding_dim") is not None:
        raise DelrecError(f"{folder}: teacher folder is missing {EMBEDDINGS_FILE} ({INFO_FILE} says embedding_dim "
                          f"{info['embedding_dim']}); re-export the teacher")
    if items is None and embeddings is None:
        raise DelrecError(f"{folder}: teacher folder has neither {RANKINGS_FILE} nor {EMBEDDINGS_FILE}; re-export "
                          "the teacher")
    states_path = folder / USER_STATES_FILE
    state_ids = user_states = None
    if states_path.is_file():
        tensors = _read_tensors(states_path, ("instance_ids", "states"))
        state_ids, user_states = tensors["instance_ids"], tensors["states"]
    elif info.get("user_state_dim") is not None:
        raise DelrecError(f"{folder}: teacher folder is missing {USER_STATES_FILE} ({INFO_FILE} says user_state_dim "
                          f"{info['user_state_dim']}); re-export the teacher")
    trajectory_path = folder / TRAJECTORY_FILE
    path_ids = path_items = path_scores = None
    if trajectory_path.is_file():
        if items is None:
            raise DelrecError(f"{trajectory_path}: a trajectory beside no {RANKINGS_FILE} (it holds the earlier "
                              "checkpoints, the rankings the final model); re-export the teacher")
        tensors = _read_tensors(trajectory_path, ("instance_ids", "items", "scores"))
        path_ids, path_items, path_scores = (tensors[k] for k in ("instance_ids", "items", "scores"))
    elif info.get("trajectory") is not None:
        raise DelrecError(f"{folder}: teacher folder is missing {TRAJECTORY_FILE} ({INFO_FILE} says trajectory "
                          f"{info['trajectory']!r}); re-export the teacher")
    for name, tensor, kind, file in (
            ("instance_ids", instance_ids, "integer", rankings_path), ("items", items, "integer", rankings_path),
            ("scores", scores, "float", rankings_path), ("embeddings", embeddings, "float", embeddings_path),
            ("instance_ids", state_ids, "integer", states_path), ("states", user_states, "float", states_path),
            ("instance_ids", path_ids, "integer", trajectory_path), ("items", path_items, "integer", trajectory_path),
            ("scores", path_scores, "float", trajectory_path)):
        if tensor is not None and (tensor.dtype.is_floating_point != (kind == "float") or tensor.dtype == torch.bool):
            raise DelrecError(f"{file}: tensor '{name}' has dtype {tensor.dtype}, expected {kind}")
    if items is not None:
        instance_ids, items, scores = instance_ids.long(), items.long(), scores.float()
        _check_rankings(dataset, instance_ids, items, scores, score_kind, str(rankings_path))
    embeddings = None if embeddings is None else embeddings.float()
    _check_embeddings(dataset, embeddings, str(embeddings_path))
    if user_states is not None:
        state_ids, user_states = state_ids.long(), user_states.float()
        _check_user_states(dataset, state_ids, user_states, instance_ids, str(states_path))
    trajectory = None
    if path_items is not None:
        epochs = info.get("trajectory")
        if not isinstance(epochs, list) or not all(type(e) is int for e in epochs):
            raise DelrecError(f"{info_path}: field 'trajectory' is {epochs!r}, expected the checkpoints' epochs (a list "
                              f"of integers, one per checkpoint of {TRAJECTORY_FILE})")
        trajectory = Trajectory(tuple(epochs), path_items.long(), path_scores.float())
        _check_trajectory(dataset, instance_ids, items, score_kind, path_ids.long(), trajectory, str(trajectory_path))
    for key, value in (("num_instances", 0 if items is None else len(instance_ids)),
                       ("topk", None if items is None else items.shape[1]),
                       ("embedding_dim", None if embeddings is None else embeddings.shape[1]),
                       ("user_state_dim", None if user_states is None else user_states.shape[1])):
        if info.get(key) != value:
            raise DelrecError(f"{info_path}: field '{key}' is {info.get(key)!r} but the files hold {value}; "
                              "the folder was edited or mixed up")
    teacher = Teacher(folder, info, instance_ids, items, scores, score_kind, embeddings,
                      user_state_ids=state_ids, user_states=user_states, trajectory=trajectory)
    check_topk(teacher, min_topk)
    return teacher


def check_topk(teacher: Teacher, min_topk: int | None) -> None:
    """Refuse a teacher whose lists are shorter than the `min_topk` a loss needs (none: no ranking loss)."""
    if min_topk is not None and teacher.has_rankings and teacher.topk < min_topk:
        raise DelrecError(
            f"{teacher.folder or 'teacher'}: the loss needs K={min_topk}, the teacher has {teacher.topk}; "
            f"re-export with --topk {min_topk}"
        )


def _read_tensors(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DelrecError(f"{path}: not a readable safetensors file ({exc})") from None
    missing = [name for name in names if name not in tensors]
    if missing:
        raise DelrecError(f"{path}: no tensor {', '.join(repr(m) for m in missing)} (it holds "
                          f"{', '.join(sorted(tensors)) or 'nothing'}); see delrec.distill.teacher_folder for the format")
    return tensors


def _check_rankings(
    dataset: PreparedDataset,
    instance_ids: torch.Tensor,
    items: torch.Tensor,
    scores: torch.Tensor,
    score_kind: str,
    rankings: str,
) -> None:
    """Every check of the rankings that needs the arrays; messages name `rankings`."""
    if score_kind not in SCORE_KINDS:
        raise DelrecError(f"{rankings}: score kind {score_kind!r}, expected one of {', '.join(SCORE_KINDS)}")
    train = dataset.instances(SPLIT)
    if instance_ids.dim() != 1 or items.dim() != 2 or tuple(scores.shape) != tuple(items.shape):
        raise DelrecError(
            f"{rankings}: expected instance_ids [R], items [R, K] and scores [R, K], got shapes "
            f"{list(instance_ids.shape)}, {list(items.shape)}, {list(scores.shape)}"
        )
    if len(instance_ids) != items.shape[0] or not 1 <= len(instance_ids) <= len(train):
        raise DelrecError(
            f"{rankings}: {items.shape[0]} rows for {len(instance_ids)} instance ids, but {dataset.path} has "
            f"{len(train)} train instances; the teacher was written for another dataset or split"
        )
    known = torch.tensor([inst.id for inst in train], dtype=torch.long)
    unordered = instance_ids.diff() <= 0
    if bool(unordered.any()):
        row = int(unordered.nonzero()[0, 0]) + 1
        raise DelrecError(f"{rankings}: row {row} holds instance id {int(instance_ids[row])} after "
                          f"{int(instance_ids[row - 1])}; instance ids must be strictly increasing (dataset order)")
    unknown = ~torch.isin(instance_ids, known)
    if bool(unknown.any()):
        row = int(unknown.nonzero()[0, 0])
        raise DelrecError(f"{rankings}: row {row} holds instance id {int(instance_ids[row])}, which is not a train "
                          f"instance of {dataset.path}; the teacher was written for another dataset or split")
    n, k = dataset.num_items, items.shape[1]
    if not 1 <= k <= n:
        raise DelrecError(f"{rankings}: top-K of {k} items, expected between 1 and the catalogue size {n}")
    outside = (items < 0) | (items >= n)
    if bool(outside.any()):
        row = int(outside.any(1).nonzero()[0, 0])
        raise DelrecError(f"{rankings}: row {row} holds item id {int(items[row][outside[row]][0])}, outside the "
                          f"catalogue 0..{n - 1} of {dataset.path}; the teacher was written for another dataset")
    repeated = (items.sort(dim=1).values.diff(dim=1) == 0).any(1)
    if bool(repeated.any()):
        raise DelrecError(f"{rankings}: row {int(repeated.nonzero()[0, 0])} lists an item twice; a top-K list holds "
                          "K distinct items")
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise DelrecError(f"{rankings}: {int(bad.sum())} NaN/inf scores (first in row {row}, train instance "
                          f"{int(instance_ids[row])}); fix or re-export the teacher")
    steps = scores.diff(dim=1)
    unordered = (steps > 0 if score_kind == "score" else steps < 0).any(1)
    if bool(unordered.any()):
        better = "highest" if score_kind == "score" else "lowest"
        raise DelrecError(f"{rankings}: row {int(unordered.nonzero()[0, 0])} is not sorted best first "
                          f"({score_kind}s: {better} first)")


def _check_embeddings(dataset: PreparedDataset, embeddings: torch.Tensor | None, embeddings_file: str) -> None:
    if embeddings is None:
        return
    n = dataset.num_items
    if embeddings.dim() != 2 or embeddings.shape[0] != n:
        raise DelrecError(f"{embeddings_file}: embedding matrix of shape {list(embeddings.shape)}, expected "
                          f"[{n}, D]: one row per item of {dataset.path}")
    if not bool(torch.isfinite(embeddings).all()):
        raise DelrecError(f"{embeddings_file}: NaN/inf values in the embedding matrix; re-export the teacher")


def _check_user_states(dataset: PreparedDataset, ids: torch.Tensor | None, states: torch.Tensor | None,
                       ranked_ids: torch.Tensor | None, states_file: str) -> None:
    """The user states' checks: one finite row per listed train instance, ids strictly increasing and, beside
    rankings, exactly the rankings' ids (the same rows in the same order)."""
    if states is None:
        return
    train = dataset.instances(SPLIT)
    if ids.dim() != 1 or states.dim() != 2 or states.shape[0] != len(ids) or states.shape[1] < 1:
        raise DelrecError(f"{states_file}: expected instance_ids [R] and states [R, D], got shapes {list(ids.shape)} "
                          f"and {list(states.shape)}")
    if not 1 <= len(ids) <= len(train):
        raise DelrecError(f"{states_file}: {len(ids)} user states, but {dataset.path} has {len(train)} train "
                          "instances; the teacher was written for another dataset or split")
    if ranked_ids is not None and not torch.equal(ids, ranked_ids):
        if len(ids) != len(ranked_ids):
            where_ = f"{len(ids)} rows for the rankings' {len(ranked_ids)}"
        else:
            row = int((ids != ranked_ids).nonzero()[0, 0])
            where_ = f"row {row} holds instance id {int(ids[row])}, the rankings' row {int(ranked_ids[row])}"
        raise DelrecError(f"{states_file}: the user states are not keyed like {RANKINGS_FILE} ({where_}); the files "
                          "were mixed up, re-export the teacher")
    unordered = ids.diff() <= 0
    if bool(unordered.any()):
        row = int(unordered.nonzero()[0, 0]) + 1
        raise DelrecError(f"{states_file}: row {row} holds instance id {int(ids[row])} after {int(ids[row - 1])}; "
                          "instance ids must be strictly increasing (dataset order)")
    unknown = ~torch.isin(ids, torch.tensor([inst.id for inst in train], dtype=torch.long))
    if bool(unknown.any()):
        row = int(unknown.nonzero()[0, 0])
        raise DelrecError(f"{states_file}: row {row} holds instance id {int(ids[row])}, which is not a train instance "
                          f"of {dataset.path}; the teacher was written for another dataset or split")
    bad = ~torch.isfinite(states)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise DelrecError(f"{states_file}: {int(bad.sum())} NaN/inf values in the user states (first in row {row}, "
                          f"train instance {int(ids[row])}); re-export the teacher")


def _check_trajectory(dataset: PreparedDataset, ranked_ids: torch.Tensor, ranked_items: torch.Tensor, score_kind: str,
                      ids: torch.Tensor, trajectory: Trajectory, trajectory_file: str) -> None:
    """The trajectory's checks: keyed exactly like the rankings, [C, R, K] with the rankings' K, C epochs strictly
    increasing, and each checkpoint's rows held to every check of the rankings (items in the catalogue and distinct,
    finite scores, best first)."""
    items, scores, epochs = trajectory.items, trajectory.scores, list(trajectory.epochs)
    if ids.dim() != 1 or items.dim() != 3 or tuple(scores.shape) != tuple(items.shape) or items.shape[0] < 1:
        raise DelrecError(f"{trajectory_file}: expected instance_ids [R], items [C, R, K] and scores [C, R, K] (C >= 1 "
                          f"checkpoints), got shapes {list(ids.shape)}, {list(items.shape)}, {list(scores.shape)}")
    if not torch.equal(ids, ranked_ids):
        if len(ids) != len(ranked_ids):
            where_ = f"{len(ids)} rows for the rankings' {len(ranked_ids)}"
        else:
            row = int((ids != ranked_ids).nonzero()[0, 0])
            where_ = f"row {row} holds instance id {int(ids[row])}, the rankings' row {int(ranked_ids[row])}"
        raise DelrecError(f"{trajectory_file}: the trajectory is not keyed like {RANKINGS_FILE} ({where_}); the files "
                          "were mixed up, re-export the teacher")
    if items.shape[1] != len(ids) or items.shape[2] != ranked_items.shape[1]:
        raise DelrecError(f"{trajectory_file}: checkpoint lists of shape {list(items.shape[1:])}, the rankings' "
                          f"{list(ranked_items.shape)}; every checkpoint ranks the same rows with the same K")
    if len(epochs) != items.shape[0]:
        raise DelrecError(f"{trajectory_file}: {items.shape[0]} checkpoints, but {INFO_FILE}'s 'trajectory' lists "
                          f"{len(epochs)} epochs {epochs}; the folder was edited or mixed up")
    if any(type(e) is not int or e < 0 for e in epochs) or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise DelrecError(f"{trajectory_file}: checkpoint epochs {epochs}, expected non-negative integers, strictly "
                          "increasing (oldest checkpoint first)")
    for c, epoch in enumerate(epochs):
        _check_rankings(dataset, ids, items[c], scores[c], score_kind,
                        f"{trajectory_file} checkpoint {c} (epoch {epoch})")
