"""DE, Distillation Experts (Kang et al., CIKM 2020, "DE-RRD", arXiv 2012.04357): the latent half of DE-RRD.

The student learns to hold what the teacher's representation space knows, not only its rankings. M experts
E_m, each an MLP  d_s -> (d_s + d_t) // 2 -> d_t  with a ReLU (d_s // 2 hidden units when d_s = d_t, as the
official code), map the student's representation s of an entity into the teacher's space; a selector reads
the teacher's representation t of the same entity and picks ONE expert for it:

    alpha = softmax(W t + b)                                  [M]   the selection distribution
    z     = softmax((log(alpha + 1e-10) + g) / tau),   g_m ~ Gumbel(0, 1) i.i.d.    (Gumbel-softmax)
    L(e)  = || t_e - sum_m z_m E_m(s_e) ||^2                  the squared error summed over the d_t features

tau is annealed over the training from `tau_start` to `tau_end`, exponentially, as the official code does
(`T_annealing`: T(p) = T_0 (T_P / T_0)^(p / P), T_0 = 1, T_P = 1e-10, p the epoch, P the maximum epochs):

    tau(f) = tau_start * (tau_end / tau_start) ** f,      f in [0, 1] the fraction of the training done

delrec moves f per batch (f = 0 at the first batch of epoch 1, 1 at the last batch of the last configured
epoch), where the code moves it once per epoch; early stopping ends the schedule early, as in the code. At
tau -> 0 the softmax is a one-hot choice of argmax_m (log alpha_m + g_m): a hard choice of one expert, a
sample from alpha. The selection is soft while tau is large, so every expert and the selector get gradients.

Entities: the batch's users (each training instance's sequence: the student's state after the history, the
teacher's `user_states` row) and the batch's items (the student's item vectors, the teacher's item
embeddings), each with their own experts and selector (as the official code's user_experts and
item_experts). The batch loss is

    L_DE = mean_u L(u) + mean_i L(i)

(the code sums over the batch's unique users, plus half the sums over its unique positive and negative
items, beside a BPR loss that is also a sum over the batch; delrec's student loss is a mean, so L_DE takes
means, which keeps the code's lambda meaningful). The student adds `de_weight` * L_DE (official default
0.01, M = 30). The teacher's representations are standardised per feature over their rows before the
experts see them (`delrec.distill.embedding.standardized`): a squared error in raw units would let a few
"massive" features of an LLM's hidden states hold the whole loss, and the weight would mean something else
for every teacher. The experts and selectors are trained with the student's optimiser and dropped at
inference: the student folder holds the SR model alone.

`distillation_experts_loss` is the formula on given tensors (the tests check it by hand);
`DistillationExperts` is the module (experts + selector) of one kind of entity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from delrec.config import above, at_least, between, check_fields

ENTITIES = ("both", "users", "items")
SELECTION_EPSILON = 1e-10  # the official code's: log(alpha + eps) stays finite


@dataclass
class DEConfig:
    num_experts: int = field(
        default=30, metadata={"help": "M: distillation experts per kind of entity (users, items); official default 30.",
                              "range": between(1, 1024)}
    )
    de_weight: float = field(
        default=0.01, metadata={"help": "lambda_DE: weight of the DE term added to the student's loss (official 0.01).",
                                "range": at_least(0)}
    )
    tau_start: float = field(
        default=1.0, metadata={"help": "Gumbel-softmax temperature at the first batch (official 1).",
                               "range": above(0)}
    )
    tau_end: float = field(
        default=1e-10, metadata={"help": "Temperature at the last batch of the last epoch, reached exponentially "
                                 "(official 1e-10: a hard choice of one expert).", "range": above(0)}
    )
    entities: Literal["both", "users", "items"] = field(
        default="both",
        metadata={"help": "Which representations are distilled: both (the paper), users (needs the teacher's user "
                  "states: `delrec teacher export --user_states`) or items (its item embeddings alone)."},
    )

    def __post_init__(self):
        check_fields(self)
        check_schedule(self.tau_start, self.tau_end)
        check_entities(self.entities)


def check_schedule(tau_start: float, tau_end: float) -> None:
    if tau_end > tau_start:
        raise ValueError(f"tau_end ({tau_end:g}) must not exceed tau_start ({tau_start:g}): the temperature anneals down")


def check_entities(entities: str) -> None:
    if entities not in ENTITIES:
        raise ValueError(f"entities must be one of {', '.join(ENTITIES)}, got {entities!r}")


def temperature(progress: float, tau_start: float, tau_end: float) -> float:
    """tau(f) = tau_start * (tau_end / tau_start) ** f, f = `progress` clamped to [0, 1]."""
    progress = min(max(float(progress), 0.0), 1.0)
    return tau_start * math.exp(progress * math.log(tau_end / tau_start))


def gumbel_selection(alpha: torch.Tensor, tau: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """[E, M] z = softmax((log(alpha + 1e-10) + g) / tau): `alpha` [E, M] the selection distribution, `noise` g
    (default: drawn from Gumbel(0, 1) with the global RNG, which the trainer seeds and checkpoints)."""
    if noise is None:
        uniform = torch.rand_like(alpha).clamp(min=torch.finfo(alpha.dtype).tiny, max=1.0 - 1e-7)
        noise = -torch.log(-torch.log(uniform))
    return torch.softmax((torch.log(alpha + SELECTION_EPSILON) + noise) / tau, dim=-1)


def distillation_experts_loss(teacher: torch.Tensor, outputs: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """mean_e || t_e - sum_m z_em E_m(s_e) ||^2: `teacher` [E, d_t], `outputs` [E, M, d_t] each expert's image of
    each entity, `selection` [E, M] the z of each entity. 0 for no entity."""
    if teacher.shape[0] == 0:
        return outputs.sum() * 0.0
    mixed = (selection.unsqueeze(-1) * outputs).sum(1)
    return (teacher - mixed).pow(2).sum(-1).mean()


class DistillationExperts(nn.Module):
    """M experts (MLPs d_s -> hidden -> d_t, ReLU) and a selector (Linear d_t -> M, softmax) for one kind of
    entity. The experts' weights are stacked ([M, ...]), so all M run as two batched matrix products; each
    is initialised as an `nn.Linear` of its shape would be."""

    def __init__(self, student_dim: int, teacher_dim: int, num_experts: int):
        super().__init__()
        hidden = student_dim // 2 if student_dim == teacher_dim else (student_dim + teacher_dim) // 2
        hidden = max(hidden, 1)
        self.num_experts = num_experts
        self.w1 = nn.Parameter(_uniform((num_experts, student_dim, hidden), student_dim))
        self.b1 = nn.Parameter(_uniform((num_experts, hidden), student_dim))
        self.w2 = nn.Parameter(_uniform((num_experts, hidden, teacher_dim), hidden))
        self.b2 = nn.Parameter(_uniform((num_experts, teacher_dim), hidden))
        self.selector = nn.Linear(teacher_dim, num_experts)

    def expert_outputs(self, student: torch.Tensor) -> torch.Tensor:
        """[E, M, d_t]: E_m(s_e) for every entity e and expert m."""
        hidden = torch.relu(torch.einsum("ed,mdh->emh", student, self.w1) + self.b1)
        return torch.einsum("emh,mht->emt", hidden, self.w2) + self.b2

    def selection(self, teacher: torch.Tensor) -> torch.Tensor:
        """[E, M] alpha = softmax(W t + b)."""
        return torch.softmax(self.selector(teacher), dim=-1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, tau: float,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """The DE loss of these entities (`student` [E, d_s] with gradient, `teacher` [E, d_t] without)."""
        alpha = self.selection(teacher)
        z = gumbel_selection(alpha, tau, noise) if self.num_experts > 1 else torch.ones_like(alpha)
        return distillation_experts_loss(teacher, self.expert_outputs(student), z)


def _uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)
