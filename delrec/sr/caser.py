"""Caser (Tang & Wang, WSDM 2018): convolutions over the embeddings of the last L items.

For the window W = E[i_{t-L+1} .. i_t] (L x d; missing items are zero rows):

    horizontal: for each height h in 1..L (min_height..L), num_horizontal filters of size h x d slide down W;
                o_h = max over the L-h+1 offsets of relu(conv)    -> heights * num_horizontal
    vertical:   num_vertical filters of size L x 1: o_v[f, :] = sum_l w[f, l] * W[l, :]   -> num_vertical * d
    z_t = relu(Linear(dropout([o_v, o_h])))                                              -> d
    score(i) = z_T . E[i]     (tied item table; the paper's user embedding is left out: histories
                               are anonymous here, and rows data has no users)

All positions at once (so one causal trainer serves Caser too): the sequence is left-padded with
L-1 zero rows, each height-h conv runs ONCE over the whole sequence (Conv1d, kernel h) and a
sliding max-pool of width L-h+1 gives every window's max; the vertical filters are one Conv1d of
kernel L applied to each embedding dimension. Cost O(T * L * d * filters), no [B, T, L, d] copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from delrec.config import DROPOUT, HISTORY_LENGTH, WIDTH, between, check_fields
from delrec.sr.base import ItemEmbedding, SequentialRecommender, register

MAX_WINDOW = 1024  # L builds one convolution per height 1..L: a larger window is all weights and no signal


@dataclass
class CaserConfig:
    hidden_size: int = field(default=64, metadata={"help": "Item embedding size d.", "range": WIDTH})
    window: int = field(
        default=5, metadata={"help": "L: how many recent items the convolutions see (one filter height per item; "
                             "the paper uses up to 10).", "range": between(1, MAX_WINDOW)}
    )
    num_horizontal: int = field(default=16, metadata={"help": "Horizontal filters per height.", "range": WIDTH})
    min_height: int = field(
        default=1, metadata={"help": "Smallest horizontal filter height: heights min_height..L (the paper and its "
                             "code: 1).", "range": between(1, MAX_WINDOW)}
    )
    num_vertical: int = field(default=4, metadata={"help": "Vertical filters.", "range": WIDTH})
    dropout: float = field(
        default=0.5, metadata={"help": "Dropout before the fully connected layer.", "range": DROPOUT}
    )
    max_length: int = field(
        default=50, metadata={"help": "Longest training sequence (every position of it is a training example).",
                              "range": HISTORY_LENGTH}
    )

    def __post_init__(self):
        check_fields(self)
        if self.min_height > self.window:
            raise ValueError(f"min_height must be in 1..window ({self.window}), got {self.min_height}")


@register
class Caser(SequentialRecommender):
    model_type = "caser"
    config_class = CaserConfig

    def __init__(self, config: CaserConfig, num_items: int, dataset_fingerprint: str | None = None):
        super().__init__(config, num_items, dataset_fingerprint)
        d, window = config.hidden_size, config.window
        self.item_embedding = ItemEmbedding(num_items, d)
        self.heights = list(range(config.min_height, window + 1))
        self.horizontal = nn.ModuleList(nn.Conv1d(d, config.num_horizontal, h) for h in self.heights)
        self.vertical = nn.Conv1d(1, config.num_vertical, window)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.num_vertical * d + config.num_horizontal * len(self.heights), d)
        # PyTorch's default conv/Linear init and item vectors of norm ~1 (N(0, 0.02) learns far slower).
        self._init_item_embedding(config.hidden_size ** -0.5)

    @property
    def context_length(self) -> int:
        return self.config.window

    def sequence_states(self, seqs: torch.Tensor) -> torch.Tensor:
        batch, length = seqs.shape
        window = self.config.window
        x = self.embed_items(seqs) * (seqs != self.pad_id)[..., None]  # pads are zero rows whatever the seam
        x = F.pad(x, (0, 0, window - 1, 0)).transpose(1, 2)  # [B, d, T+L-1]
        pooled = []
        for height, conv in zip(self.heights, self.horizontal):
            out = torch.relu(conv(x))  # [B, n_h, T+L-height]
            pooled.append(F.max_pool1d(out, kernel_size=window - height + 1, stride=1))  # [B, n_h, T]
        horizontal = torch.cat(pooled, dim=1).transpose(1, 2)  # [B, T, heights*n_h]
        d = x.shape[1]
        vertical = self.vertical(x.reshape(batch * d, 1, -1))  # [B*d, n_v, T]
        vertical = vertical.view(batch, d, -1, length).permute(0, 3, 2, 1).reshape(batch, length, -1)  # [B, T, n_v*d]
        return torch.relu(self.fc(self.dropout(torch.cat([vertical, horizontal], dim=-1))))
