"""GRU4Rec (Hidasi et al., ICLR 2016; the sequential variant with full-softmax training):

    x_t = dropout(E[i_t])
    g_t = GRU(x_1..x_t)                      gru_size units, num_layers layers
    h_t = Linear(g_t)                        back to the item-embedding size d
    score(i) = h_T . E[i]                    item table tied with the input embedding

A GRU's state depends on every input it has seen, padding included, so the left-padded batch is
rotated to right padding for the GRU (real items first, from a zero initial state) and the
outputs are rotated back: each state depends on real items only, whatever the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from delrec.config import DROPOUT, HISTORY_LENGTH, WIDTH, between, check_fields
from delrec.sr.base import ItemEmbedding, SequentialRecommender, register


@dataclass
class GRU4RecConfig:
    hidden_size: int = field(
        default=64, metadata={"help": "Item embedding size d (and size of the output state).", "range": WIDTH}
    )
    gru_size: int = field(default=128, metadata={"help": "Units of each GRU layer.", "range": WIDTH})
    num_layers: int = field(default=1, metadata={"help": "Number of stacked GRU layers.", "range": between(1, 1024)})
    dropout: float = field(
        default=0.2, metadata={"help": "Dropout on the input embeddings and between GRU layers.", "range": DROPOUT}
    )
    max_length: int = field(
        default=50, metadata={"help": "Longest history read (older items are dropped).", "range": HISTORY_LENGTH}
    )

    def __post_init__(self):
        check_fields(self)


@register
class GRU4Rec(SequentialRecommender):
    model_type = "gru4rec"
    config_class = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig, num_items: int, dataset_fingerprint: str | None = None):
        super().__init__(config, num_items, dataset_fingerprint)
        self.item_embedding = ItemEmbedding(num_items, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.hidden_size,
            config.gru_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.output = nn.Linear(config.gru_size, config.hidden_size)
        # PyTorch's default Linear init; item vectors of norm ~1 so that the GRU sees signal from
        # the start (N(0, 0.02) vectors learn far slower here); the usual GRU init.
        self._init_item_embedding(config.hidden_size ** -0.5)
        for name, weight in self.gru.named_parameters():
            if "weight_hh" in name:
                nn.init.orthogonal_(weight)
            elif "weight_ih" in name:
                nn.init.xavier_uniform_(weight)
            else:
                nn.init.zeros_(weight)

    def sequence_states(self, seqs: torch.Tensor) -> torch.Tensor:
        batch, length = seqs.shape
        pads = (seqs == self.pad_id).sum(1, keepdim=True)  # left padding per row
        columns = torch.arange(length, device=seqs.device)[None]
        to_right = (columns + pads) % length  # right-padded[:, j] = left-padded[:, (j + pads) % T]
        to_left = (columns - pads) % length
        x = self.embedding_dropout(self.embed_items(seqs.gather(1, to_right)))
        states, _ = self.gru(x)
        states = states.gather(1, to_left[..., None].expand(-1, -1, states.shape[-1]))
        return self.output(states)
