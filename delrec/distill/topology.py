"""Topology distillation (Kang et al., KDD 2021, arXiv 2106.08700): FTD and HTD.

The student keeps the relational structure of the teacher's representation space: which entities (the
batch's users, i.e. training sequences, and items) are close to which. With rho(x, y) = cos(x, y) =
x.y / (|x| |y|):

FTD, full topology distillation (for a student close to the teacher's capacity). Over the batch's E
entities, users and items together, teacher representations t_i and student representations s_i:

    L_FTD = (1 / E^2) sum_{i, j} (rho(t_i, t_j) - rho(s_i, s_j))^2

No projector: cosines compare within each space, so the widths may differ, and the loss is invariant to
the scale of either side. The official code sums over the pairs (with lambda_TD = 1e-3 beside a BPR loss
summed over a batch of 1024); delrec takes the mean over the E^2 ordered pairs (the i = j terms are 0), so
`ftd_weight` does not depend on the batch size (the code's balance at its batch size corresponds to a
weight of about lambda_TD * E^2 / B, roughly 4 to 8; the default 1 is a round number for the weight search).

HTD, hierarchical topology distillation (for a large capacity gap): the entities are split into K groups
and the student keeps the topology between groups and inside each group, not between every pair.

- Group assignment, learned with a DE-style loss (`delrec.distill.de.DistillationExperts` with K experts,
  one per group): alpha = softmax(W t), z the Gumbel-softmax of alpha at the annealed temperature, and
  L_GA = mean_e || t_e - sum_k z_ek f_k(s_e) ||^2 (users and items each with their own assigner, as the
  official code; the teacher side standardised as in DE). Entity e belongs to group g_e = argmax_k
  alpha_ek (no gradient); users and items never share a group (users 0..K-1, items K..2K-1).
- Entity level, inside each group:
      L_ent = (1 / sum_g n_g^2) sum_{i, j: g_i = g_j} (rho(t_i, t_j) - rho(s_i, s_j))^2
- Group level, `group_level: prototypes` (default; the issue's and the paper's "topology between group
  prototypes"): with P_g = the mean of a group's members (teacher side P^t_g over t, student side P^s_g
  over s, with gradient) over the G groups present in the batch,
      L_grp = (1 / G^2) sum_{g, h} (rho(P^t_g, P^t_h) - rho(P^s_g, P^s_h))^2
  `group_level: entities` (the official notebook's choice, "Group(P, e)"): prototypes against entities,
      L_grp = (1 / (G E)) sum_{g, j} (rho(P^t_g, t_j) - rho(P^s_g, s_j))^2
- L_HTD = htd_weight * (L_ent + L_grp) + assignment_weight * L_GA. The official code weighs
  lambda_TD * (a TD + (1 - a) GA) with a = 0.5 on SUMS: its TD sums E^2 pairs, its GA E entities, so at its
  batch of about 2000 entities the GA sum weighs about 1/E per unit of mean topology. delrec's terms are
  means; L_GA is a DE loss, so it takes DE's weight for that same quantity (0.01, `assignment_weight`),
  and `htd_weight` weighs the topology means as `ftd_weight` does FTD's. The temperature anneals as DE's
  (the official run_HTD anneals 1 -> 1e-10 per epoch; delrec per batch). K = 30 (the notebook's).

Departures from the official code: means instead of sums (above); prototypes keep their gradient (the code
computes them under no_grad, which leaves its (P, P) term without any gradient); pairs inside a group are
chosen by the group mask (the code keeps the entries whose masked teacher cosine is above 0, which also
drops same-group pairs with a negative teacher cosine).

Teacher representations enter FTD's and HTD's cosines as they are (a cosine needs no common scale); the
users' and items' must then live in one space (an SR teacher's states and item table, an LLM's prompt and
title states at one layer): `delrec.distill.student` checks their widths match for `entities: both`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from delrec.config import above, at_least, between, check_fields
from delrec.distill.de import check_entities, check_schedule

GROUP_LEVELS = ("prototypes", "entities")


@dataclass
class FTDConfig:
    ftd_weight: float = field(
        default=1.0, metadata={"help": "Weight of the FTD term (the mean over the batch's entity pairs of the "
                               "squared cosine differences) added to the student's loss.", "range": at_least(0)}
    )
    entities: Literal["both", "users", "items"] = field(
        default="both",
        metadata={"help": "Which entities form the topology: both users and items (the paper), users (needs the "
                  "teacher's user states: `delrec teacher export --user_states`) or items (item embeddings)."},
    )

    def __post_init__(self):
        check_fields(self)
        check_entities(self.entities)


@dataclass
class HTDConfig:
    num_groups: int = field(
        default=30, metadata={"help": "K: groups per kind of entity (users, items); the official notebook's 30.",
                              "range": between(1, 1024)}
    )
    htd_weight: float = field(
        default=1.0, metadata={"help": "Weight of the HTD topology (entity level + group level, means of squared "
                               "cosine differences) added to the student's loss.", "range": at_least(0)}
    )
    assignment_weight: float = field(
        default=0.01, metadata={"help": "Weight of the group-assignment loss (a DE loss over the K groups' "
                                "experts; DE's 0.01).", "range": at_least(0)}
    )
    group_level: Literal["prototypes", "entities"] = field(
        default="prototypes",
        metadata={"help": "Group-level topology: between group prototypes (the paper), or prototypes against "
                  "entities (the official notebook's choice)."},
    )
    tau_start: float = field(
        default=1.0, metadata={"help": "Gumbel-softmax temperature of the group assignment at the first batch.",
                               "range": above(0)}
    )
    tau_end: float = field(
        default=1e-10, metadata={"help": "Its temperature at the last batch, reached exponentially (as DE).",
                                 "range": above(0)}
    )
    entities: Literal["both", "users", "items"] = field(
        default="both",
        metadata={"help": "Which entities are grouped: both users and items (the paper), users (needs the teacher's "
                  "user states: `delrec teacher export --user_states`) or items."},
    )

    def __post_init__(self):
        check_fields(self)
        check_schedule(self.tau_start, self.tau_end)
        check_entities(self.entities)
        if self.group_level not in GROUP_LEVELS:
            raise ValueError(f"group_level must be one of {', '.join(GROUP_LEVELS)}, got {self.group_level!r}")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """[A, B] rho(a_i, b_j) (b = a by default); a zero vector has cosine 0 with everything."""
    a = F.normalize(a, dim=-1)
    return a @ (a if b is None else F.normalize(b, dim=-1)).T


def ftd_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(1 / E^2) sum_{i,j} (rho(t_i, t_j) - rho(s_i, s_j))^2 over the rows of `teacher` [E, d_t] and `student`
    [E, d_s]; 0 for no entity."""
    if teacher.shape[0] == 0:
        return student.sum() * 0.0
    return (cosine_matrix(teacher) - cosine_matrix(student)).pow(2).mean()


def group_prototypes(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean of `x`'s rows in each group present [G, d], the present group ids [G], ascending)."""
    present, members = torch.unique(groups, return_inverse=True)
    one_hot = F.one_hot(members, len(present)).to(x.dtype)  # [E, G]
    return (one_hot.T @ x) / one_hot.sum(0)[:, None], present


def htd_entity_loss(teacher: torch.Tensor, student: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(1 / sum_g n_g^2) sum over the ordered pairs (i, j) of one group of (rho(t_i, t_j) - rho(s_i, s_j))^2."""
    if teacher.shape[0] == 0:
        return student.sum() * 0.0
    same = (groups[:, None] == groups[None, :]).to(student.dtype)
    squared = (cosine_matrix(teacher) - cosine_matrix(student)).pow(2)
    return (squared * same).sum() / same.sum()


def htd_group_loss(teacher: torch.Tensor, student: torch.Tensor, groups: torch.Tensor,
                   level: str = "prototypes") -> torch.Tensor:
    """The group-level topology: between the G prototypes present ((1 / G^2) sum_{g,h}), or (`entities`) between
    each prototype and each entity ((1 / (G E)) sum_{g,j})."""
    if teacher.shape[0] == 0:
        return student.sum() * 0.0
    proto_t, _ = group_prototypes(teacher, groups)
    proto_s, _ = group_prototypes(student, groups)
    if level == "prototypes":
        return (cosine_matrix(proto_t) - cosine_matrix(proto_s)).pow(2).mean()
    if level == "entities":
        return (cosine_matrix(proto_t, teacher) - cosine_matrix(proto_s, student)).pow(2).mean()
    raise ValueError(f"group_level must be one of {', '.join(GROUP_LEVELS)}, got {level!r}")


def htd_topology_loss(teacher: torch.Tensor, student: torch.Tensor, groups: torch.Tensor,
                      level: str = "prototypes") -> torch.Tensor:
    """L_ent + L_grp (module docstring)."""
    return htd_entity_loss(teacher, student, groups) + htd_group_loss(teacher, student, groups, level)
