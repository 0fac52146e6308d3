"""Student training: an SR model trained by `train_sr` plus a forward-distillation term.

    from delrec.distill.dllm2rec import DLLM2RecConfig
    from delrec.distill.student import train_student
    from delrec.sr import SASRecConfig, TrainConfig
    result = train_student("runs/games", SASRecConfig(hidden_size=32), TrainConfig(epochs=20),
                           ["runs/teacher-llm", "runs/teacher-sasrec"], "dllm2rec", DLLM2RecConfig(),
                           "runs/student", embedding_distillation=True)

The student is any trainable SR model (SASRec, GRU4Rec, Caser) with its own loss (the
trainer's `loss`: CE by default, BCE as in DLLM2Rec's code), the same trainer, selection on
validation only, checkpoints, resume and `metrics.json` as `delrec sr train`. On each batch the
method adds its term (`extra_loss`), computed from each training instance's state after its
history (`last_states`), the student's item table and the teacher's rows for the batch's instance
ids: the scores of the items a loss needs carry the gradient (`StudentBatch.scores_of`), the
scores over all items, needed only by weights (the student's current top-K, its ranks), carry none:

    dllm2rec  lambda_d * L_d       importance-aware ranking distillation (delrec.distill.dllm2rec)
    rd        rd_weight * L_RD     position-weighted ranking distillation (delrec.distill.rd)
    rrd       rrd_weight * L_RRD   listwise relaxed ranking distillation (delrec.distill.rrd)
    hetcomp   hetcomp_weight * L   HetComp: the teachers' training trajectories as a per-instance easy-to-hard
                                   curriculum, set-wise then list-wise (delrec.distill.hetcomp)
    none      nothing              the student alone (the baseline every gain is measured against)

HetComp keeps per-instance state (each instance's curriculum stage), so its term is its own `nn.Module` extra loss
(`Method.loss`) built from the teachers as loaded, not from their combination: it merges the teachers' lists at
each instance's stages itself. Its state is checkpointed with the run; metrics.json's "distillation" entry gets
a "curriculum" summary (the share of instances at each stage when training stopped).

A latent method (`latent`, `LatentChoice`: de, ftd or htd; delrec.distill.de, delrec.distill.topology) adds a
term on the teacher's REPRESENTATIONS beside the ranking method's, each with its own weight (DE + RRD, the
paper's method, is `method="rrd", latent="de"`; `method="none"` with a latent method distils the space
alone):

    de        de_weight * L_DE     distillation experts (DE-RRD's latent half)
    ftd       ftd_weight * L_FTD   full topology distillation
    htd       htd_weight * (L_ent + L_grp) + assignment_weight * L_GA   hierarchical topology distillation

Its entities are the batch's users (each instance's state after its history beside the teacher's
`user_states` row; instances the teacher has no state for are left out) and the batch's items (its
targets and, when the teachers have rankings, the items of their lists; the student's item vectors beside
the teacher's item embeddings). With several teachers the latent term reads the FIRST `--teacher`'s
representations: one model's space (experts regress into it, topologies are cosines within it; a
concatenation of two models' spaces is a space neither has); a first teacher without the representations
the term needs is refused, naming it. The latent module (experts, selectors, group assigners) is an
`nn.Module` extra loss: `train_sr` trains its parameters with the student's optimiser and checkpoints them
for resume, but saves only the SR model, so the student folder stays a plain SR model folder
(`delrec serve`); the teacher's tensors are non-persistent buffers, never trained, never saved.

A teacher of a subset of the training instances (an LLM on a budget) adds its term on the instances
it has a row for and nothing on the others, which train on the student's own loss alone: the term
is the method's mean over those instances times their share of the batch, so each covered instance
weighs what it would weigh with a teacher of every instance.

`embedding_distillation` (any method, `none` included) adds DLLM2Rec's collaborative embedding
distillation through the item-embedding seam (delrec.distill.embedding); a teacher of item
embeddings alone (`delrec teacher export --mode embeddings`) serves it with `--method none`. Several teacher
folders are combined into one with `delrec.distill.ensemble.combine_teachers` (cut to the
method's K) before training. The run's settings recorded in the checkpoint include the method,
its configuration and a digest of each teacher's contents, so resuming an OUT with other
teachers or weights is refused.
metrics.json is `delrec sr train`'s plus a "distillation" entry describing the same.

Under `accelerate launch` (several processes, `delrec.sr.trainer`, "Several processes") the ranking methods'
`DistillationLoss` is `per_instance`: each process computes it on its own rows; the latent module and HetComp
are computed by every process on the whole batch from the gathered states, so the experts train alike and the
curriculum state stays the same in every process. The main process alone writes metrics.json and promotes the
weight search's choice.

The weights are chosen on validation (`weight_search`, default 0, 0.5 and 1 times the papers' weights:
the method's, the latent method's and ed_weight, all scaled together): one student per scale in
OUT/weight_search/scale-S, the best valid NDCG@10 copied into OUT, the search recorded in metrics.json
("distillation" / "weight_search"). Scale 0 is the student alone, so a teacher that does not help on
validation is not used; `weight_search: [1]` is the papers' fixed weights in one run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from delrec.config import above, at_least, check_fields
from delrec.data.dataset import PreparedDataset
from delrec.distill.de import DEConfig, DistillationExperts, temperature
from delrec.distill.dllm2rec import DLLM2RecConfig, dllm2rec_loss, dllm2rec_weights
from delrec.distill.embedding import install_collaborative_embedding, standardized
from delrec.distill.ensemble import combine_teachers
from delrec.distill.hetcomp import HetCompConfig, HetCompLoss, check_trajectories
from delrec.distill.rd import RDConfig, items_mask, rd_loss, rd_weights, sample_excluding
from delrec.distill.rrd import RRDConfig, rrd_loss, sample_uninteresting
from delrec.distill.teacher_folder import EMBEDDINGS_FILE, RANKINGS_FILE, USER_STATES_FILE, Teacher, load_teacher
from delrec.distill.topology import FTDConfig, HTDConfig, ftd_loss, htd_topology_loss
from delrec.device import launch_position
from delrec.errors import DelrecError
from delrec.io import write_json
from delrec.sr.base import SequentialRecommender, model_class_for_config
from delrec.sr.trainer import SELECTION_METRIC, TrainBatch, TrainConfig, TrainResult, train_sr


@dataclass
class StudentConfig:
    method: Literal["dllm2rec", "rd", "rrd", "hetcomp", "none"] = field(
        default="dllm2rec",
        metadata={"help": "Distillation loss: dllm2rec (importance-aware ranking distillation), rd, rrd, hetcomp (a "
                  "curriculum of the teachers' training trajectories: teachers exported with --trajectory), or none "
                  "(the student alone)."},
    )
    teacher: list[str] = field(
        default_factory=list,
        metadata={"help": "Teacher folder(s) from `delrec teacher export`; repeat --teacher (or list them) to "
                  "combine several teachers."},
    )
    embedding_distillation: bool = field(
        default=False,
        metadata={"help": "Collaborative embedding distillation: item vectors e_i = b_i + ed_weight * (W z_i + c), "
                  "z_i the teacher's item embeddings."},
    )
    ed_weight: float = field(
        default=0.2, metadata={"help": "alpha of the embedding distillation (official code 0.2; paper 0.2-0.3).",
                               "range": above(0)}
    )
    weight_search: list[float] = field(
        default_factory=lambda: list(DEFAULT_WEIGHT_SEARCH),
        metadata={"help": "Scales of the distillation weights (the method's weight and ed_weight) tried, one student "
                  "each; the one with the best valid NDCG@10 is kept (0: the student alone, so a weak teacher cannot "
                  "make it worse; ties go to the smaller scale). 1 alone: the papers' fixed weights, one run.",
                  "range": at_least(0.0)},
    )

    def __post_init__(self):
        check_fields(self)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.weight_search:
            raise ValueError("weight_search needs at least one scale (1: the papers' fixed weights)")


@dataclass
class LatentChoice:
    """The latent method, an option of `delrec student train` beside `StudentConfig.method` (its own dataclass:
    a `delrec run` students section does not take it yet, and refuses the key rather than ignore it)."""

    latent: Literal["none", "de", "ftd", "htd"] = field(
        default="none",
        metadata={"help": "Latent distillation of the teacher's representation space, added to --method's ranking "
                  "term: de (distillation experts; --method rrd --latent de is DE-RRD), ftd (full topology), htd "
                  "(hierarchical topology), or none. Reads the first --teacher's item embeddings and user states."},
    )

    def __post_init__(self):
        if self.latent not in LATENTS:
            raise ValueError(f"latent must be one of {', '.join(LATENTS)}, got {self.latent!r}")


# --- the methods: config class and the term added to each batch's loss ---------------------------


@dataclass
class StudentBatch:
    """What a method's term sees of one batch: the student's states and item table (with gradient),
    the teacher's rows for the batch's instances, their targets and history items."""

    states: torch.Tensor  # [B, d] each instance's state after its history
    table: torch.Tensor  # [N, d] the student's item vectors
    items: torch.Tensor  # [B, K] the teacher's items, best first
    confidences: torch.Tensor  # [B, K] Teacher.confidences() over the K
    targets: torch.Tensor  # [B]
    history: torch.Tensor  # [B, N] bool: the instance's history items

    def scores_of(self, items: torch.Tensor) -> torch.Tensor:
        """[B, M] the student's scores of `items` [B, M], with gradient (only these rows get one)."""
        return torch.einsum("bd,bmd->bm", self.states, self.table[items])

    def all_scores(self) -> torch.Tensor:
        """[B, N] the student's scores over all items, without gradient (for the weights)."""
        with torch.no_grad():
            return self.states @ self.table.T


def _dllm2rec_term(config: DLLM2RecConfig, batch: StudentBatch) -> torch.Tensor:
    weights = dllm2rec_weights(batch.all_scores(), batch.items, batch.confidences, config, batch.targets, batch.history)
    negatives = None
    if config.negative_term:  # one negative per instance: neither its target nor in its history
        drawn = sample_excluding(batch.history | items_mask(batch.targets[:, None], batch.history.shape[1]), 1)
        negatives = batch.scores_of(drawn)[:, 0]
    return config.lambda_d * dllm2rec_loss(batch.scores_of(batch.items), weights, negatives)


def _rd_term(config: RDConfig, batch: StudentBatch) -> torch.Tensor:
    scores = batch.all_scores() if config.dynamic_weight else None
    weights = rd_weights(batch.items, config, scores, batch.history, batch.states.dtype)
    negatives = None
    if config.rd_negatives:
        negatives = batch.scores_of(sample_uninteresting(batch.items, batch.history.shape[1], config.rd_negatives))
    return config.rd_weight * rd_loss(batch.scores_of(batch.items), weights, negatives)


def _rrd_term(config: RRDConfig, batch: StudentBatch) -> torch.Tensor:
    drawn = sample_uninteresting(batch.items, batch.history.shape[1], config.num_uninteresting)
    return config.rrd_weight * rrd_loss(batch.scores_of(batch.items), batch.scores_of(drawn))


@dataclass(frozen=True)
class Method:
    config_class: type
    term: Callable[[Any, StudentBatch], torch.Tensor] | None  # the weighted loss term of one batch
    weight: str  # the config field that weighs the term (scaled by `weight_search`)
    # a method with state of its own builds the trainer's extra loss itself from the teachers as loaded (an
    # nn.Module: checkpointed), instead of `DistillationLoss` over their combination and `term`
    loss: Callable[[list[Teacher], Any], Any] | None = None
    uses_trajectory: bool = False  # reads the teachers' trajectories (part of the run's settings then)


METHODS: dict[str, Method | None] = {
    "dllm2rec": Method(DLLM2RecConfig, _dllm2rec_term, "lambda_d"),
    "rd": Method(RDConfig, _rd_term, "rd_weight"),
    "rrd": Method(RRDConfig, _rrd_term, "rrd_weight"),
    "hetcomp": Method(HetCompConfig, None, "hetcomp_weight", HetCompLoss, uses_trajectory=True),
    "none": None,
}
DEFAULT_WEIGHT_SEARCH = (0.0, 0.5, 1.0)
SEARCH_DIR = "weight_search"  # OUT/weight_search/scale-S: one student per scale; OUT holds the chosen one


LATENTS: dict[str, tuple[type, tuple[str, ...]] | None] = {  # config class, the fields weighing its terms
    "de": (DEConfig, ("de_weight",)),
    "ftd": (FTDConfig, ("ftd_weight",)),
    "htd": (HTDConfig, ("htd_weight", "assignment_weight")),
    "none": None,
}


def latent_config_class(latent: str) -> type | None:
    """The config dataclass of latent method `latent` (None for `none`); `DelrecError` for an unknown name."""
    if latent not in LATENTS:
        raise DelrecError(f"unknown latent method '{latent}'; expected one of: {', '.join(LATENTS)}")
    entry = LATENTS[latent]
    return None if entry is None else entry[0]


def method_config_class(method: str) -> type | None:
    """The config dataclass of `method` (None for `none`); `DelrecError` for an unknown name."""
    if method not in METHODS:
        raise DelrecError(f"unknown distillation method '{method}'; expected one of: {', '.join(METHODS)}")
    entry = METHODS[method]
    return None if entry is None else entry.config_class


class DistillationLoss:
    """The trainer's `extra_loss`: the method's term on the batch's instances that have a teacher row.

    `per_instance`: the term is a mean over the batch's instances of a term of each instance alone (its state, the
    item table, its teacher row), so several processes each compute it on their own rows (`delrec.sr.trainer`)."""

    per_instance = True

    def __init__(self, teacher: Teacher, method: Method, config: Any):
        k = config.topk
        kept = dataclasses.replace(teacher, items=teacher.items[:, :k], scores=teacher.scores[:, :k])
        self.teacher = teacher
        self.items = kept.items.contiguous()
        self.confidences = kept.confidences()  # softmax over the K kept (the code's over its K)
        self.method, self.config = method, config

    def __call__(self, model: SequentialRecommender, batch: TrainBatch, last_states: torch.Tensor) -> torch.Tensor:
        device = last_states.device
        if self.items.device != device:
            self.items, self.confidences = self.items.to(device), self.confidences.to(device)
        rows = self.teacher.rows(batch.ids, missing_ok=True)
        covered = rows >= 0
        if not bool(covered.any()):
            return last_states.sum() * 0.0  # no teacher row in this batch: the student's own loss alone
        rows = rows[covered]
        view = StudentBatch(last_states[covered], model.item_embeddings(), self.items[rows], self.confidences[rows],
                            batch.labels[covered, -1],
                            items_mask(batch.inputs[covered], model.num_items))  # pad ids (= N) dropped
        return self.method.term(self.config, view) * (len(rows) / len(covered))


class LatentDistillation(nn.Module):
    """The trainer's `extra_loss` with a latent method: the ranking method's term (`ranking`, or None) plus the
    latent term on the batch's users and items (module docstring), weighed by the config's weight fields.

    `user_ids` [R] / `user_states` [R, D'] and `item_embeddings` [N, D] are the teacher's (None where the
    config's `entities` do not use them); `lists` a teacher with rankings whose lists add their items to the
    batch's items (None: the targets alone). The experts / assigners are built under `seed` (the trainer
    seeds after this is built), so a run is reproducible."""

    def __init__(self, name: str, config: Any, student_dim: int, user_ids: torch.Tensor | None,
                 user_states: torch.Tensor | None, item_embeddings: torch.Tensor | None,
                 lists: Teacher | None = None, ranking: DistillationLoss | HetCompLoss | None = None, seed: int = 0):
        super().__init__()
        self.name, self.config, self.ranking = name, config, ranking
        self.uses_users = config.entities in ("both", "users")
        self.uses_items = config.entities in ("both", "items")
        standardize, raw = name in ("de", "htd"), name in ("ftd", "htd")  # experts regress; topologies are cosines
        if self.uses_users:
            self.register_buffer("user_index", _row_index(user_ids), persistent=False)
            self.register_buffer("user_raw", user_states.float() if raw else None, persistent=False)
            self.register_buffer("user_std", standardized(user_states.float()) if standardize else None,
                                 persistent=False)
        if self.uses_items:
            self.register_buffer("item_raw", item_embeddings.float() if raw else None, persistent=False)
            self.register_buffer("item_std", standardized(item_embeddings.float()) if standardize else None,
                                 persistent=False)
        self.register_buffer("list_index", None if lists is None else _row_index(lists.instance_ids), persistent=False)
        self.register_buffer("list_items", None if lists is None else lists.items, persistent=False)
        self.users = self.items = None
        if standardize:
            count = config.num_experts if name == "de" else config.num_groups
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if self.uses_users:
                    self.users = DistillationExperts(student_dim, user_states.shape[1], count)
                if self.uses_items:
                    self.items = DistillationExperts(student_dim, item_embeddings.shape[1], count)

    def forward(self, model: SequentialRecommender, batch: TrainBatch, last_states: torch.Tensor) -> torch.Tensor:
        total = last_states.sum() * 0.0
        if self.ranking is not None:
            total = total + self.ranking(model, batch, last_states)
        return total + self.latent_term(model, batch, last_states)

    def latent_term(self, model: SequentialRecommender, batch: TrainBatch, last_states: torch.Tensor) -> torch.Tensor:
        """de_weight L_DE, ftd_weight L_FTD or htd_weight (L_ent + L_grp) + assignment_weight L_GA of one batch."""
        users = items = None
        share = 1.0
        if self.uses_users:
            rows = _lookup(self.user_index, batch.ids)
            covered = rows >= 0
            share = float(covered.sum()) / max(len(covered), 1)
            users = (last_states[covered], rows[covered])
        if self.uses_items:
            listed = [batch.labels[:, -1]]
            if self.list_index is not None:
                rows = _lookup(self.list_index, batch.ids)
                listed.append(self.list_items[rows[rows >= 0]].reshape(-1))
            ids = torch.unique(torch.cat(listed))
            items = (model.item_embeddings()[ids], ids)
        tau = None if self.name == "ftd" else temperature(batch.progress, self.config.tau_start, self.config.tau_end)
        zero = last_states.sum() * 0.0
        if self.name == "de":
            loss = zero
            if users is not None and len(users[1]):
                loss = loss + share * self.users(users[0], self.user_std[users[1]], tau)
            if items is not None:
                loss = loss + self.items(items[0], self.item_std[items[1]], tau)
            return self.config.de_weight * loss
        student = torch.cat([x[0] for x in (users, items) if x is not None])
        teacher = torch.cat([t[x[1]] for t, x in ((getattr(self, "user_raw", None), users),
                                                  (getattr(self, "item_raw", None), items)) if x is not None])
        if self.name == "ftd":
            return self.config.ftd_weight * ftd_loss(teacher, student)
        assignment, groups = zero, []  # htd
        for offset, (part, assigner, standard) in enumerate(((users, self.users, getattr(self, "user_std", None)),
                                                             (items, self.items, getattr(self, "item_std", None)))):
            if part is None:
                continue
            t = standard[part[1]]
            if len(part[1]):
                assignment = assignment + (share if offset == 0 else 1.0) * assigner(part[0], t, tau)
            with torch.no_grad():
                groups.append(assigner.selection(t).argmax(-1) + offset * self.config.num_groups)
        topology = htd_topology_loss(teacher, student, torch.cat(groups), self.config.group_level)
        return self.config.htd_weight * topology + self.config.assignment_weight * assignment


def _row_index(ids: torch.Tensor) -> torch.Tensor:
    """[max id + 1]: the row of each instance id, -1 for ids without one."""
    index = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    index[ids] = torch.arange(len(ids))
    return index


def _lookup(index: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B] the rows of `ids` in `index` (-1: none)."""
    ids = ids.long().to(index.device)
    inside = (ids >= 0) & (ids < len(index))
    return torch.where(inside, index[ids.clamp(0, len(index) - 1)], -1)


# --- teachers -----------------------------------------------------------------------------------


def teacher_digest(teacher: Teacher, with_embeddings: bool, with_user_states: bool = False,
                   with_trajectory: bool = False) -> str:
    """A digest of what a student learns from a teacher (its lists, scores and, if used, embeddings, user
    states and trajectory)."""
    digest = hashlib.sha256()
    tensors = [t for t in (teacher.instance_ids, teacher.items, teacher.scores) if t is not None]
    if with_embeddings and teacher.embeddings is not None:
        tensors.append(teacher.embeddings)
    if with_user_states and teacher.user_states is not None:
        tensors += [teacher.user_state_ids, teacher.user_states]
    if with_trajectory and teacher.trajectory is not None:
        tensors += [teacher.trajectory.items, teacher.trajectory.scores]
        digest.update(str(teacher.trajectory.epochs).encode())
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(str(teacher.score_kind).encode())
    return digest.hexdigest()[:16]


def combined_teacher(teachers: list[Teacher], topk: int | None) -> Teacher:
    """One teacher: the only one, or the per-instance combination of several, cut to their first
    `topk` items (default: the shortest list), see `delrec.distill.ensemble`."""
    if len(teachers) == 1:
        return teachers[0]
    lengths = [t.topk for t in teachers if t.has_rankings]
    return combine_teachers(teachers, topk or (min(lengths) if lengths else 1))


# --- training -----------------------------------------------------------------------------------


def train_student(
    dataset: PreparedDataset | str | Path,
    model_config: Any,
    train_config: TrainConfig | None = None,
    teachers: Sequence[str | Path] = (),
    method: str = "dllm2rec",
    method_config: Any = None,
    out: str | Path = "runs/student",
    embedding_distillation: bool = False,
    ed_weight: float = 0.2,
    weight_search: Sequence[float] = DEFAULT_WEIGHT_SEARCH,
    latent: str = "none",
    latent_config: Any = None,
) -> TrainResult:
    """Train (or resume) a student in OUT; see the module docstring. `method_config` defaults to
    the method's config class with its defaults, `latent_config` to the latent method's; `weight_search` as
    `StudentConfig.weight_search`."""
    config_class = method_config_class(method)
    if method_config is None and config_class is not None:
        method_config = config_class()
    if config_class is not None and type(method_config) is not config_class:
        raise TypeError(f"method '{method}' takes a {config_class.__name__}, got {type(method_config).__name__}")
    latent_class = latent_config_class(latent)
    if latent_config is None and latent_class is not None:
        latent_config = latent_class()
    if latent_class is not None and type(latent_config) is not latent_class:
        raise TypeError(f"latent '{latent}' takes a {latent_class.__name__}, got {type(latent_config).__name__}")
    if not model_class_for_config(model_config).trainable:
        raise DelrecError(f"a student must be a trainable SR model (sasrec, gru4rec, caser), got "
                          f"'{model_class_for_config(model_config).model_type}'")
    if not isinstance(dataset, PreparedDataset):
        dataset = PreparedDataset.load(dataset)
    teachers = [str(t) for t in teachers]
    if config_class is not None and not teachers:
        raise DelrecError(f"--method {method} distils a teacher: give one with --teacher DIR (from `delrec teacher export`)")
    if embedding_distillation and not teachers:
        raise DelrecError("--embedding_distillation needs a teacher with item embeddings: give one with --teacher DIR")
    if latent_class is not None and not teachers:
        raise DelrecError(f"--latent {latent} distils a teacher's representations: give one with --teacher DIR (from "
                          "`delrec teacher export`)")
    if teachers and config_class is None and not embedding_distillation and latent_class is None:
        raise DelrecError("--method none trains the student alone but --teacher was given; drop --teacher, or add "
                          "--embedding_distillation to use only the teacher's item embeddings")

    min_topk = None if method_config is None else method_config.topk
    loaded = [load_teacher(folder, dataset, min_topk) for folder in teachers]
    teacher = combined_teacher(loaded, min_topk) if loaded else None
    if config_class is not None and not teacher.has_rankings:
        names = ", ".join(str(t.folder) for t in loaded)
        raise DelrecError(f"--method {method} distils rankings, but {names} hold item embeddings only (no "
                          f"{RANKINGS_FILE}); use --method none --embedding_distillation true, or add a teacher "
                          "with rankings")
    if method == "hetcomp":
        check_trajectories(loaded)
    samples_outside_list = method == "rrd" or (method == "rd" and method_config.rd_negatives > 0)
    if samples_outside_list and dataset.num_items <= min_topk:
        raise DelrecError(f"--method {method} samples items outside the teacher's top-{min_topk}, but {dataset.path} "
                          f"has only {dataset.num_items} items; lower --topk")
    if embedding_distillation and teacher.embeddings is None:
        raise DelrecError(f"{teachers[0] if len(teachers) == 1 else 'the combined teachers'}: no item embeddings "
                          f"(item_embeddings.safetensors); re-export the teacher with embeddings or drop "
                          f"--embedding_distillation")

    if latent_class is not None:
        check_latent_teacher(loaded[0], latent, latent_config, teachers[0])

    scales = sorted({float(scale) for scale in weight_search}) if teachers else [1.0]
    if any(scale < 0 or not math.isfinite(scale) for scale in scales) or not scales:
        raise DelrecError(f"--weight_search {' '.join(map(str, weight_search))}: expected one or more scales >= 0")

    def train_at(scale: float, folder: Path) -> TrainResult:
        """One student with the distillation weights times `scale` (0: the student alone, no teacher term)."""
        scaled_method = METHODS[method] if scale > 0 and config_class is not None else None
        scaled_config = (None if scaled_method is None else dataclasses.replace(
            method_config, **{scaled_method.weight: getattr(method_config, scaled_method.weight) * scale}))
        with_embeddings = embedding_distillation and scale > 0
        scaled_latent = None if latent_class is None or scale == 0 else dataclasses.replace(
            latent_config, **{name: getattr(latent_config, name) * scale for name in LATENTS[latent][1]})
        trajectories = scaled_method is not None and scaled_method.uses_trajectory
        settings = {  # what the checkpoint's configuration check compares (folders may move)
            "method": method if scale > 0 else "none",
            "method_config": None if scaled_config is None else dataclasses.asdict(scaled_config),
            "embedding_distillation": with_embeddings,
            "ed_weight": ed_weight * scale if with_embeddings else None,
            "teachers": [{"digest": teacher_digest(t, embedding_distillation, with_trajectory=trajectories),
                          "topk": t.topk, "score_kind": t.score_kind,
                          "instances": 0 if t.instance_ids is None else len(t.instance_ids),
                          **({"trajectory": None if t.trajectory is None else list(t.trajectory.epochs)}
                             if trajectories else {})}
                         for t in loaded] if scale > 0 else [],
        }
        if scaled_latent is not None:  # only then: the settings of runs without a latent method stay as they were
            first = loaded[0]
            settings.update(latent=latent, latent_config=dataclasses.asdict(scaled_latent), latent_teacher={
                "digest": teacher_digest(first, scaled_latent.entities != "users", scaled_latent.entities != "items"),
                "user_state_dim": None if first.user_states is None else int(first.user_states.shape[1])})
        curriculum = None
        if scaled_method is None:
            extra_loss = None
        elif scaled_method.loss is not None:
            extra_loss = curriculum = scaled_method.loss(loaded, scaled_config)
        else:
            extra_loss = DistillationLoss(teacher, scaled_method, scaled_config)
        if scaled_latent is not None:
            extra_loss = LatentDistillation(
                latent, scaled_latent, model_config.hidden_size, loaded[0].user_state_ids, loaded[0].user_states,
                loaded[0].embeddings, teacher if teacher.has_rankings else None, extra_loss,
                (train_config or TrainConfig()).seed)
        model_hook = None
        if with_embeddings:
            model_hook = functools.partial(install_collaborative_embedding, teacher_embeddings=teacher.embeddings,
                                           alpha=ed_weight * scale, blocks=teacher.embedding_blocks)
        result = train_sr(dataset, model_config, train_config, folder, extra_loss=extra_loss, model_hook=model_hook,
                          extra_settings=settings)
        result.metrics["distillation"] = {**settings, "scale": scale, "teachers": [
            {**entry, "folder": str(t.folder), "source": t.info.get("source")}
            for entry, t in zip(settings["teachers"], loaded)]}
        if isinstance(curriculum, HetCompLoss):
            result.metrics["distillation"]["curriculum"] = curriculum.summary()
        if launch_position().main:  # under several processes, the main one writes (every one holds the same result)
            write_json(folder / "metrics.json", result.metrics)
        return result

    out = Path(out)
    if len(scales) == 1:
        return train_at(scales[0], out)
    results = {scale: train_at(scale, out / SEARCH_DIR / f"scale-{scale:g}") for scale in scales}
    valid = {scale: best_valid(result) for scale, result in results.items()}
    chosen = max(scales, key=lambda scale: (valid[scale], -scale))  # ties: the smaller scale
    result = results[chosen]
    result.metrics["distillation"]["weight_search"] = {
        "scales": scales, "chosen": chosen, "metric": SELECTION_METRIC,  # chosen on valid; test for the record
        "runs": [{"scale": scale, "valid": valid[scale], "test": results[scale].metrics["test"][SELECTION_METRIC],
                  "best_epoch": results[scale].best_epoch, "folder": f"{SEARCH_DIR}/scale-{scale:g}"}
                 for scale in scales],
        "why": ("the student alone had the best valid " + SELECTION_METRIC if chosen == 0 else
                f"scale {chosen:g} had the best valid {SELECTION_METRIC}, {valid[chosen] - valid[0.0]:+.4f} over the "
                "student alone" if 0.0 in valid else f"scale {chosen:g} had the best valid {SELECTION_METRIC}"),
    }
    if launch_position().main:
        promote(out / SEARCH_DIR / f"scale-{chosen:g}", out)
        write_json(out / "metrics.json", result.metrics)
    result.out = out
    return result


def check_latent_teacher(first: Teacher, latent: str, config: Any, folder: str) -> None:
    """Refuse, in one line naming the folder, a first teacher without the representations `config.entities` needs
    (or, for a topology of users and items together, whose user states and item embeddings differ in width)."""
    flags = f"--latent {latent} --entities {config.entities}"
    if config.entities != "items" and first.user_states is None:
        raise DelrecError(f"{folder}: {flags} needs the teacher's user states ({USER_STATES_FILE}), which this folder "
                          f"lacks; re-export it with `delrec teacher export ... --user_states` (an SR model, or an LLM "
                          f"with --mode grounding), or use --entities items")
    if config.entities != "users" and first.embeddings is None:
        raise DelrecError(f"{folder}: {flags} needs the teacher's item embeddings ({EMBEDDINGS_FILE}), which this "
                          f"folder lacks; re-export the teacher with item embeddings, or use --entities users")
    if latent in ("ftd", "htd") and config.entities == "both" and \
            first.user_states.shape[1] != first.embeddings.shape[1]:
        raise DelrecError(f"{folder}: {flags} puts users and items in one topology, but the teacher's user states "
                          f"are {first.user_states.shape[1]} wide and its item embeddings {first.embeddings.shape[1]} "
                          "(not one space); use --entities items or --entities users")


def best_valid(result: TrainResult) -> float:
    """The valid selection metric of the epoch a run kept."""
    return max(entry["valid"][SELECTION_METRIC] for entry in result.log)


def promote(chosen: Path, out: Path) -> None:
    """The chosen student's files (not its checkpoint) copied into OUT, each replaced atomically, so OUT is a plain
    student folder (`delrec serve OUT`) and the search's runs stay beside it to resume."""
    for source in sorted(chosen.iterdir()):
        if source.is_file():
            staging = out / f".{source.name}.tmp"
            shutil.copyfile(source, staging)
            os.replace(staging, out / source.name)
