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

from delrec.metrics import history_mask
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


@torch.inference_mode()
def item_knn_hit_rate(embeddings: torch.Tensor, instances, k: int = 20, max_users: int = 2000, seed: int = 0,
                      batch_size: int = 1024) -> dict | None:
    """How much item knowledge a teacher's embeddings carry before a student trains on them.

    For each user (a seeded sample of at most `max_users` of `instances`, empty histories skipped),
    the k items nearest to the last history item (cosine between `standardized` rows, the space
    embedding distillation reads; history items excluded) are taken as a recommendation: the result
    is the share of users whose target is among them, beside `chance`, the same share for k items
    drawn at random from those not in the history. Cheap next to a student run, and it told Gemma's
    title states on games (40x chance) from those on Last.fm artist names (9x; benchmarks/RESULTS.md).
    None when no user has a history.
    """
    users = [inst for inst in instances if inst.history]
    if not users:
        return None
    if len(users) > max_users:
        rng = torch.Generator().manual_seed(seed)
        users = [users[i] for i in sorted(torch.randperm(len(users), generator=rng)[:max_users].tolist())]
    unit = nn.functional.normalize(standardized(embeddings.float()), dim=1)
    num_items = unit.shape[0]
    hits, chance = 0, 0.0
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        seen = history_mask([inst.history for inst in batch], num_items)
        targets = torch.tensor([inst.target for inst in batch])
        reachable = ~seen.gather(1, targets[:, None]).squeeze(1)  # a target in the history is never recommended
        left = (~seen).sum(1)
        chance += float((left.clamp(max=k) / left.clamp(min=1) * reachable).sum())  # a full history: 0, not NaN
        top = (unit[[inst.history[-1] for inst in batch]] @ unit.T).masked_fill(seen, -math.inf).topk(
            min(k, num_items), dim=1).indices
        hits += int(((top == targets[:, None]).any(1) & reachable).sum())
    return {"k": k, "users": len(users), "hit_rate": round(hits / len(users), 6),
            "chance": round(chance / len(users), 6)}
