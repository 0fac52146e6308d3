"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item sequence.

    x_t   = E[i_t] * sqrt(d) + P[t]          item + learned position (t counted from the first real item)
    x     = dropout(x)
    block: x = x + drop(attn(LN(x)))         pre-LN, causal, pads masked out as keys
           x = x + drop(ffn(LN(x)))          ffn: Linear(d, inner) -> GELU -> dropout -> Linear(inner, d)
    h     = LN(x)                            state at every position
    score(i) = h_T . E[i]                    item table tied with the input embedding

Positions count from the first real item, so the state at position t of a training sequence is
exactly `encode` of the prefix ending at t (causal training = prefix evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from delrec.config import DROPOUT, HISTORY_LENGTH, WIDTH, between, check_fields
from delrec.sr.base import ItemEmbedding, SequentialRecommender, register


@dataclass
class SASRecConfig:
    hidden_size: int = field(default=64, metadata={"help": "Item embedding and hidden size d.", "range": WIDTH})
    num_layers: int = field(default=2, metadata={"help": "Number of self-attention blocks.", "range": between(1, 1024)})
    num_heads: int = field(
        default=2, metadata={"help": "Attention heads per block (must divide hidden_size).", "range": WIDTH}
    )
    inner_size: int = field(
        default=256, metadata={"help": "Hidden size of the feed-forward layer in each block.", "range": WIDTH}
    )
    dropout: float = field(
        default=0.2, metadata={"help": "Dropout on embeddings, attention weights and block outputs.", "range": DROPOUT}
    )
    max_length: int = field(
        default=50, metadata={"help": "Longest history read (number of position embeddings).", "range": HISTORY_LENGTH}
    )

    def __post_init__(self):
        check_fields(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")


class Block(nn.Module):
    """Pre-LN transformer block with causal multi-head attention (torch's fused SDPA)."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.inner_size), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.inner_size, d)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, T, d] -> [B, T, d]; with `last_only`, [B, 1, d]: the last position's output alone
        (its query attends to every key; the other queries and their FFN rows are never computed)."""
        batch, _, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        if last_only:
            x, q = x[:, -1:], q[:, -1:]
        q, k, v = (t.view(batch, -1, self.num_heads, d // self.num_heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(batch, -1, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


@register
class SASRec(SequentialRecommender):
    model_type = "sasrec"
    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig, num_items: int, dataset_fingerprint: str | None = None):
        super().__init__(config, num_items, dataset_fingerprint)
        d = config.hidden_size
        self.item_embedding = ItemEmbedding(num_items, d)
        self.position_embedding = nn.Embedding(config.max_length, d)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.scale = math.sqrt(d)
        self._init_weights()

    def _embed(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block input [B, T, d], real-item mask [B, T])."""
        if seqs.shape[1] > self.config.max_length:
            raise ValueError(f"SASRec reads at most {self.config.max_length} items, got sequences of {seqs.shape[1]}")
        real = seqs != self.pad_id
        positions = (real.cumsum(1) - 1).clamp(min=0)
        x = self.embed_items(seqs) * self.scale + self.position_embedding(positions)
        return self.embedding_dropout(x), real

    @staticmethod
    def _causal_mask(real: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T]: query t attends to real keys <= t, and always to itself (so pad rows never
        see an all-masked row, which would give NaN); pads never influence real positions."""
        length = real.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=real.device)
        return ((causal & real[:, None, :]) | eye)[:, None]

    def sequence_states(self, seqs: torch.Tensor) -> torch.Tensor:
        x, real = self._embed(seqs)
        attn_mask = self._causal_mask(real)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.final_norm(x)

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """The last state alone: the last block computes one query row per history (its FFN and
        projection run on 1 row instead of T), which is most of the cost of serving one user."""
        x, real = self._embed(histories[:, -self.context_length:])
        *earlier, last = self.blocks
        if earlier:
            attn_mask = self._causal_mask(real)
            for block in earlier:
                x = block(x, attn_mask)
        last_query = real.clone()
        last_query[:, -1] = True  # an all-pad (empty) history attends to its own position, as above
        return self.final_norm(last(x, last_query[:, None, None, :], last_only=True))[:, -1]
