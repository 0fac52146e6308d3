"""HetComp (Kang et al., WWW 2023, "Distillation from Heterogeneous Models for Top-K Recommendation",
arXiv 2303.01130): the teachers' training trajectories as an easy-to-hard curriculum per user.

A teacher's ranking at an early checkpoint of its training is easier for a small student to follow than
its final one; HetComp distils the checkpoints in order and moves each user (here: each training
instance) on to the next one when the student is ready for it. Teacher folders carry the trajectory in
`trajectory.safetensors` (delrec.distill.teacher_folder; `delrec teacher export --trajectory` from an SR
model trained with `--snapshot_epochs`): teacher t has stages 0..S_t-1, its C_t checkpoints oldest first
and then its final rankings (S_t = C_t + 1; a teacher without a trajectory has its final stage alone).

Per instance u and teacher t the loss keeps a stage v_{u,t} (0 at the start), a reference discrepancy
r_{u,t} and a visit count. Notation: pi^{t,s}_u teacher t's top-K list of u at stage s, sigma_u the
student's current top-K (its scores over all items, history excluded, no gradient).

Discrepancy (the official code's `get_NDCG_u`: 1 - NDCG of the student's top-K with the teacher's
top-K as the relevant set, gains by the student's position j = 0..K-1):

    D(sigma, pi) = 1 - sum_j w_j [sigma_j in pi] / sum_j w_j,   w_j = (2^{exp(-j/10)} - 1) / log2(j + 2)

Dynamic knowledge construction (DKC), checked when an instance is visited (once per epoch) after
n >= `dkc_start` completed epochs, every `dkc_every` epochs, with the threshold
theta(n) = alpha * alpha_decay^{floor(n / dkc_every)}:

    first check (n = dkc_start):  r_{u,t} = D(sigma_u, pi^{t, v+1}_u)                   (no move)
    later checks:                  d = D(sigma_u, pi^{t, v+1}_u)  (the NEXT stage's list)
                                   move iff d = 0  or  r_{u,t} / d > theta(n)  or  r_{u,t} / d < 1
                                   on a move: v <- v + 1, r_{u,t} = D(sigma_u, pi^{t, v+1}_u) (the new next)
    (stage indices clamp at S_t - 1; a teacher at its final stage, or without a row for u, never moves)

i.e. u moves on when its discrepancy to the next, harder list has fallen by more than the factor theta
since the reference (the student is ready for it), or has grown (following the current list no longer
brings it closer); theta decays below 1 after enough checks, so every instance reaches the final rankings
eventually. This is the rule of the authors' code (released with the submission,
github.com/hetcompsubmission/hetcompsubmission: `DKC` and `get_NDCG_u` in main.py, `get_KD_loss` in
Models/HetComp.py; the paper's text was not at hand, so where the two may differ this follows the code):
alpha 1.05, decay 0.995, a check every p = 10 epochs from epoch 10, for an MF student trained up to 1000
epochs. delrec's SR students train tens of epochs with early stopping, so the defaults check every epoch from
the first (`dkc_every` 1, `dkc_start` 1), which puts the threshold below 1 after about 10 epochs. The code
checks at the end of an epoch on its evaluation of all users; delrec checks an instance in its batch, with
the student as it stands at that step.

Target: teacher t's list at its own stage v_{u,t}; several teachers' lists are merged per instance by a
reciprocal-rank sum, F(i) = sum_t 1/rank_t(i) over the teachers with a row for u (0 outside a list), the
target being the K items of largest F (ties: lower item id; `delrec.distill.ensemble`'s fusion). With one
teacher the target is its list. The code sums precomputed per-teacher importance matrices over all items
(its Eq. 8); the reciprocal rank is delrec's simplification, and differs from `combine_teachers`'
confidence/consistency weights (those read the final lists only).

Adaptive knowledge transfer: with y the student's scores, pi_1..pi_K the target, and R_u the items neither in
the target nor in u's history (the code leaves the user's observed items out too),

    before the final stage (set-wise: the target's items above the rest, in any order)
        L_set(u)  = - sum_k log( exp(y_{pi_k}) / (exp(y_{pi_k}) + sum_{j in R_u} exp(y_j)) )
    at the final stage of every teacher (list-wise, the target's order too: RRD's Plackett-Luce,
    `delrec.distill.rrd.rrd_loss`, with ALL of R_u as the uninteresting items)
        L_list(u) = - sum_k log( exp(y_{pi_k}) / (sum_{l >= k} exp(y_{pi_l}) + sum_{j in R_u} exp(y_j)) )

and the student adds hetcomp_weight x the mean over the batch's instances (a teacher of a subset: times the
covered share, as the other methods). `adaptive_transfer: false` uses L_list at every stage. The code
switches all users to its list-wise loss at once, when (nearly) all reached the final stage, and that loss
weighs the head of the list again (its first K/2 and K/10); delrec switches each instance when it gets
there and uses the plain list-wise loss. Its student trains on the distillation loss alone; delrec's keeps
its own loss beside it.

The per-instance state (stage, reference, visits) is made of buffers of this `nn.Module` extra loss, so the
trainer checkpoints it and a resumed run continues the curriculum where it stopped; the teachers' lists are
non-persistent buffers, never saved. The student folder stays a plain SR model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from delrec.config import above, at_least, check_fields
from delrec.distill.ensemble import fuse_lists
from delrec.distill.rd import items_mask
from delrec.distill.rrd import rrd_loss
from delrec.distill.teacher_folder import TRAJECTORY_FILE, Teacher
from delrec.errors import DelrecError

GAIN_TAU = 10.0  # the discrepancy's gains 2^{exp(-j / 10)} - 1, as the code


@dataclass
class HetCompConfig:
    topk: int = field(default=10, metadata={"help": "K: the length of the target list at every stage (the teachers "
                                            "must have at least K).", "range": at_least(1)})
    hetcomp_weight: float = field(
        default=0.1, metadata={"help": "Weight of the HetComp term added to the student's own loss.",
                               "range": at_least(0)}
    )
    alpha: float = field(
        default=1.05, metadata={"help": "DKC threshold: an instance moves to the next checkpoint when its discrepancy "
                                "to it fell by more than this factor since the reference (the code's 1.05).",
                                "range": above(0)}
    )
    alpha_decay: float = field(
        default=0.995, metadata={"help": "The threshold is alpha * alpha_decay^(epochs / dkc_every); below 1, every "
                                 "instance reaches the final rankings eventually (the code's 0.995).",
                                 "range": above(0, 1)}
    )
    dkc_start: int = field(
        default=1, metadata={"help": "Epochs the student trains before the first DKC check, which only records the "
                             "reference discrepancies (the code: 10).", "range": at_least(1)}
    )
    dkc_every: int = field(
        default=1, metadata={"help": "Epochs between DKC checks (the code's p: 10).", "range": at_least(1)}
    )
    adaptive_transfer: bool = field(
        default=True, metadata={"help": "Set-wise loss (the target's items above the rest) before an instance's "
                                "final stage, list-wise (RRD) at it; false: list-wise throughout."}
    )

    def __post_init__(self):
        check_fields(self)


def check_trajectories(teachers: list[Teacher]) -> None:
    """Refuse, in one line naming the folders, teachers none of which carries a trajectory."""
    if not any(t.trajectory is not None for t in teachers):
        names = ", ".join(str(t.folder or "teacher") for t in teachers)
        raise DelrecError(f"--method hetcomp distils a teacher's training trajectory, but {names} hold none (no "
                          f"{TRAJECTORY_FILE}); export an SR teacher with `delrec teacher export --trajectory` from a "
                          "model trained with `delrec sr train --snapshot_epochs E1 E2 ...`")


def discrepancy(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B] D(sigma, pi) = 1 - sum_j w_j [sigma_j in pi] / sum_j w_j for the student's top-K `student` [B, K] (best
    first) and the teacher's list `teacher` [B, K'] (negative ids match nothing); `weights` [K] the w_j."""
    hits = (student[:, :, None] == teacher[:, None, :]).any(-1).to(weights.dtype)
    return 1.0 - (hits * weights).sum(1) / weights.sum()


def position_weights(k: int) -> torch.Tensor:
    """[K] w_j = (2^{exp(-j / 10)} - 1) / log2(j + 2), j = 0..K-1."""
    j = torch.arange(k, dtype=torch.float64)
    return ((2.0 ** torch.exp(-j / GAIN_TAU) - 1.0) / torch.log2(j + 2.0)).float()


def set_loss(listed: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of L_set(u): `listed` [B, K] the student's scores of the target, `rest` [B, M] of the
    rest (excluded entries at the dtype's lowest value)."""
    others = torch.logsumexp(rest, dim=1, keepdim=True)
    return (torch.logaddexp(listed, others) - listed).sum(1).mean()


class HetCompLoss(nn.Module):
    """The trainer's `extra_loss` for `--method hetcomp` (module docstring): the curriculum state of every instance
    the teachers rank, and the set-wise / list-wise term on each batch."""

    def __init__(self, teachers: list[Teacher], config: HetCompConfig):
        super().__init__()
        check_trajectories(teachers)
        ranked = [t for t in teachers if t.has_rankings]
        k = config.topk
        self.config = config
        ids = torch.unique(torch.cat([t.instance_ids for t in ranked]))  # sorted: the instances of any teacher
        stages = [1 + (0 if t.trajectory is None else len(t.trajectory)) for t in ranked]
        count, most = len(ranked), max(stages)
        # teacher t's list of each instance at each stage; past its last stage, its final list; without a row,
        # distinct negative ids (they match nothing and carry no mass)
        lists = (-1 - torch.arange(count * k)).reshape(count, 1, 1, k).repeat(1, most, len(ids), 1)
        present = torch.zeros(len(ids), count, dtype=torch.bool)
        for j, teacher in enumerate(ranked):
            rows = torch.searchsorted(ids, teacher.instance_ids)
            path = [] if teacher.trajectory is None else list(teacher.trajectory.items[:, :, :k])
            path.append(teacher.items[:, :k])
            for stage in range(most):
                lists[j, stage, rows] = path[min(stage, len(path) - 1)]
            present[rows, j] = True
        last = torch.tensor(stages) - 1
        index = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        self.register_buffer("index", index, persistent=False)  # instance id -> row (-1: no teacher ranks it)
        self.register_buffer("lists", lists, persistent=False)  # [T, S, U, K]
        self.register_buffer("present", present, persistent=False)  # [U, T]
        self.register_buffer("last_stage", last, persistent=False)  # [T]
        self.register_buffer("weights", position_weights(k), persistent=False)  # [K] the discrepancy's w_j
        self.register_buffer("rank_mass", 1.0 / torch.arange(1, k + 1, dtype=torch.float32), persistent=False)
        # the curriculum, checkpointed: a teacher without a row for an instance is at its last stage there
        self.register_buffer("stage", torch.where(present.T, 0, last[:, None]))  # [T, U]
        self.register_buffer("reference", torch.zeros(count, len(ids)))  # [T, U]
        self.register_buffer("visits", torch.zeros(len(ids), dtype=torch.long))  # [U] epochs seen

    def forward(self, model, batch, last_states: torch.Tensor) -> torch.Tensor:
        ids = batch.ids.long().to(self.index.device)
        inside = (ids >= 0) & (ids < len(self.index))
        rows = torch.where(inside, self.index[ids.clamp(0, len(self.index) - 1)], -1)
        covered = rows >= 0
        if not bool(covered.any()):
            return last_states.sum() * 0.0  # no instance a teacher ranks: the student's own loss alone
        rows = rows[covered]
        table = model.item_embeddings()
        scores = last_states[covered] @ table.T  # [B, N], with gradient
        history = items_mask(batch.inputs[covered], table.shape[0])  # pad ids (= N) dropped
        self.visit(rows, scores.detach(), history)
        targets = self.targets(rows)
        listwise = self.at_final(rows) if self.config.adaptive_transfer else torch.ones_like(rows, dtype=torch.bool)
        loss = self.loss(scores, targets, history, listwise)
        return self.config.hetcomp_weight * loss * (len(rows) / len(covered))

    @torch.no_grad()
    def visit(self, rows: torch.Tensor, scores: torch.Tensor, history: torch.Tensor) -> None:
        """Count the visit of each row's instance and run DKC on those whose check is due (module docstring)."""
        config = self.config
        self.visits[rows] += 1
        done = self.visits[rows] - 1  # epochs this instance was trained on before this one
        due = (done >= config.dkc_start) & ((done - config.dkc_start) % config.dkc_every == 0)
        if not bool(due.any()):
            return
        rows, done = rows[due], done[due]
        top = scores[due].masked_fill(history[due], float("-inf")).topk(self.weights.shape[0], dim=1).indices
        first = done == config.dkc_start
        checks = torch.div(done, config.dkc_every, rounding_mode="floor").double()
        threshold = config.alpha * config.alpha_decay ** checks
        for t in range(self.lists.shape[0]):
            stage, last = self.stage[t, rows], self.last_stage[t]
            active = self.present[rows, t] & (stage < last)
            ahead = self.discrepancy_to(top, t, (stage + 1).clamp(max=last), rows)
            reference = self.reference[t, rows]
            move = active & ~first & ((ahead == 0) | (reference.double() > threshold * ahead.double()) |
                                      (reference < ahead))
            stage = stage + move.long()
            further = self.discrepancy_to(top, t, (stage + 1).clamp(max=last), rows)
            self.reference[t, rows] = torch.where(first, ahead, torch.where(move, further, reference))
            self.stage[t, rows] = stage

    def discrepancy_to(self, top: torch.Tensor, teacher: int, stages: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return discrepancy(top, self.lists[teacher, stages, rows], self.weights)

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, K] each row's target: the teachers' lists at their current stages, merged by reciprocal rank."""
        stage = self.stage[:, rows]  # [T, B]
        teachers = torch.arange(stage.shape[0], device=stage.device)[:, None].expand_as(stage)
        lists = self.lists[teachers, stage, rows[None, :].expand_as(stage)].transpose(0, 1)  # [B, T, K]
        if lists.shape[1] == 1:
            return lists[:, 0]
        mass = self.rank_mass.expand(lists.shape) * self.present[rows][:, :, None]
        items, _ = fuse_lists(lists, mass, torch.ones(lists.shape[:2], device=lists.device), lists.shape[2])
        return items

    def at_final(self, rows: torch.Tensor) -> torch.Tensor:
        """[B] bool: every teacher at its final stage for the row."""
        return (self.stage[:, rows] >= self.last_stage[:, None]).all(0)

    @staticmethod
    def loss(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor,
             listwise: torch.Tensor) -> torch.Tensor:
        """Mean over the rows of L_list (rows `listwise`) or L_set (the others)."""
        listed = scores.gather(1, targets)
        rest = scores.masked_fill(history | items_mask(targets, scores.shape[1]), torch.finfo(scores.dtype).min)
        total = scores.new_zeros(())
        count = int(listwise.sum())
        if count:
            total = total + rrd_loss(listed[listwise], rest[listwise]) * count
        if count < len(listed):
            total = total + set_loss(listed[~listwise], rest[~listwise]) * (len(listed) - count)
        return total / len(listed)

    def summary(self) -> dict:
        """Where the curriculum stands: per teacher, its stages and the share of its instances at each."""
        teachers = []
        for t in range(self.lists.shape[0]):
            rows = self.present[:, t]
            stage = self.stage[t, rows]
            last = int(self.last_stage[t])
            teachers.append({"stages": last + 1, "share_at_stage": [
                round(float((stage == s).float().mean()), 6) for s in range(last + 1)]})
        every = torch.arange(len(self.visits), device=self.visits.device)
        return {"teachers": teachers, "instances": len(every),
                "share_at_final": round(float(self.at_final(every).float().mean()), 6)}
