"""Popularity baseline: every user gets the same scores, the items' counts in the training data.

`fit(sequences)` counts the items of the training sequences the trainer would use (history +
target with `train_positions: all`, targets only with `last`; see `delrec.sr.trainer`). The score
is log(1 + count) (or the raw count); the ranking is the same either way. There is no training
loop; the counts are a buffer, saved and loaded like any other model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from delrec.config import HISTORY_LENGTH, check_fields
from delrec.sr.base import SequentialRecommender, register


@dataclass
class PopConfig:
    log_counts: bool = field(default=True, metadata={"help": "Score log(1 + count) instead of the raw count."})
    max_length: int = field(
        default=50, metadata={"help": "Longest history read (pop ignores histories).", "range": HISTORY_LENGTH}
    )

    def __post_init__(self):
        check_fields(self)


@register
class Pop(SequentialRecommender):
    model_type = "pop"
    config_class = PopConfig
    trainable = False

    def __init__(self, config: PopConfig, num_items: int, dataset_fingerprint: str | None = None):
        super().__init__(config, num_items, dataset_fingerprint)
        self.register_buffer("counts", torch.zeros(num_items))

    def fit(self, sequences: Iterable[Sequence[int]]) -> "Pop":
        flat = np.fromiter((item for seq in sequences for item in seq), dtype=np.int64)
        counts = np.bincount(flat, minlength=self.num_items).astype(np.float32)
        self.counts.copy_(torch.from_numpy(counts))
        return self

    def item_scores(self) -> torch.Tensor:
        return torch.log1p(self.counts) if self.config.log_counts else self.counts

    def item_embeddings(self) -> torch.Tensor:
        raise NotImplementedError("the popularity baseline has no item embeddings")

    def sequence_states(self, seqs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the popularity baseline has no user states")

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the popularity baseline has no user states")

    def score_all(self, histories: torch.Tensor) -> torch.Tensor:
        return self.item_scores()[None].expand(histories.shape[0], -1).clone()

    def score_items(self, histories: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.item_scores()[items]
