"""DLLM2Rec's collaborative embedding distillation, through the SR models' item-embedding seam.

Every item vector of the student becomes

    e_i = b_i + alpha * (W z_i + c)

z_i the teacher's embedding of item i (frozen, a buffer), W and c a learnable linear projector
from the teacher's space to the student's, b_i the student's own item embedding (the
"collaborative offset", learnable), alpha = `ed_weight`. No alignment loss: the projector learns
from the student's loss alone. The student ties input and output embeddings, so e_i is used both
to read histories and to score items (the official code adds the projection to the inputs only,
with an untied output layer).

Two choices the paper leaves open, so that `ed_weight` means the same for any teacher: each feature
of z is centred and scaled to unit variance over the items (entries then have RMS 1, whatever the
scale of a 4096-dimensional LLM state vs a 64-dimensional SR embedding; per feature because LLM
hidden states carry a few "massive" dimensions hundreds of times larger than the rest, which a
single scale would leave to dominate every item's vector; a constant feature becomes 0), and W, c
get `nn.Linear`'s default initialisation, as in the official code, so the student starts from a
random projection of the teacher's item geometry plus its own initial b.

Several teachers' matrices side by side (`delrec.distill.ensemble`: a 64-wide SR table beside a
640-wide LLM state) are one z with `blocks`, their widths. After the per-feature standardisation,
block t is scaled by sqrt(D / (T * D_t)), so each teacher's features carry the same total variance
(D / T per item), whatever its width; otherwise the widest teacher would hold almost all of the
projection at initialisation and move it most per optimiser step.

`install_collaborative_embedding(model, z, alpha)` is a `train_sr(..., model_hook=...)`; after
training, `model.bake_item_embedding()` (the trainer calls it) stores the final e_i as a plain
`ItemEmbedding`, so the saved student needs no teacher file to serve. The teacher matrix is a
non-persistent buffer: checkpoints stay small, and a resumed run rebuilds it from the same
teacher folder (the run's settings record the teacher's identity).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from delrec.sr.base import ItemEmbedding, SequentialRecommender


class CollaborativeEmbedding(nn.Module):
    """An item-embedding module (see `delrec.sr.base`, "The item-embedding seam") holding the
    student's `ItemEmbedding` (b), a `Linear` projector (W, c) and the teacher matrix z."""

    def __init__(self, base: ItemEmbedding, teacher_embeddings: torch.Tensor, alpha: float,
                 blocks: tuple[int, ...] = ()):
        super().__init__()
        num_items, dim = base.num_embeddings - 1, base.embedding_dim
        if teacher_embeddings.dim() != 2 or teacher_embeddings.shape[0] != num_items:
            raise ValueError(f"teacher embeddings must be [{num_items}, D], got {list(teacher_embeddings.shape)}")
        z = teacher_embeddings.detach().to(device=base.weight.device, dtype=base.weight.dtype)
        self.base = base
        self.projector = nn.Linear(z.shape[1], dim).to(device=base.weight.device, dtype=base.weight.dtype)
        self.register_buffer("teacher", standardized(z, blocks), persistent=False)
        self.alpha = alpha
        self.pad_id = num_items

    def table(self) -> torch.Tensor:
        """[N, d] the item vectors e_i = b_i + alpha * (W z_i + c)."""
        return self.base.table() + self.alpha * self.projector(self.teacher)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """e_ids (= `table()[ids]`), zero for the pad id; projects only the rows looked up."""
        real = ids != self.pad_id
        projected = self.projector(self.teacher[ids.clamp(max=self.pad_id - 1)])
        return self.base(ids) + self.alpha * projected * real.unsqueeze(-1)


def standardized(z: torch.Tensor, blocks: tuple[int, ...] = ()) -> torch.Tensor:
    """Each column centred and scaled to unit variance over the rows (a constant column becomes 0); with
    `blocks` (column widths summing to z's), block t then scaled by sqrt(D / (T * D_t)) (module docstring)."""
    centred = z - z.mean(0, keepdim=True)
    std = centred.pow(2).mean(0, keepdim=True).sqrt()
    unit = torch.where(std > 0, centred / std.clamp(min=torch.finfo(z.dtype).tiny), torch.zeros_like(centred))
    if len(blocks) < 2:
        return unit
    if sum(blocks) != z.shape[1] or min(blocks) < 1:
        raise ValueError(f"embedding blocks {list(blocks)} do not split {z.shape[1]} columns")
    scales = torch.cat([torch.full((width,), math.sqrt(z.shape[1] / (len(blocks) * width))) for width in blocks])
    return unit * scales.to(unit)


def install_collaborative_embedding(model: SequentialRecommender, teacher_embeddings: torch.Tensor, alpha: float,
                                    blocks: tuple[int, ...] = ()) -> None:
    """Replace `model.item_embedding` by a `CollaborativeEmbedding` around it (a `model_hook`)."""
    model.item_embedding = CollaborativeEmbedding(model.item_embedding, teacher_embeddings, alpha, blocks)
