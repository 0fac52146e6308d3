"""Conventional sequential recommenders (SASRec, GRU4Rec, Caser, popularity): torch only.

    from delrec.sr import SASRecConfig, TrainConfig, train_sr, load_model
    result = train_sr("data/games", SASRecConfig(), TrainConfig(epochs=20), "runs/sasrec")
    model = load_model("runs/sasrec")            # config.json + model.safetensors
    scores = model.score_all(histories)          # [B, N]

Layering: this package imports torch, numpy, safetensors, tqdm and delrec.{data, metrics, errors,
io, config} only, never the LLM stack, so a student model trains and serves with torch alone.
"""

from delrec.sr.base import (
    MODELS,
    ItemEmbedding,
    SequentialRecommender,
    build_model,
    load_model,
    model_class,
    pad_histories,
)

# Model modules register themselves on import; this order is the order users see them listed in.
from delrec.sr.sasrec import SASRec, SASRecConfig  # noqa: I001
from delrec.sr.gru4rec import GRU4Rec, GRU4RecConfig
from delrec.sr.caser import Caser, CaserConfig
from delrec.sr.pop import Pop, PopConfig
from delrec.sr.evaluate import evaluate_candidates, evaluate_full, evaluate_model, predict, write_predictions
from delrec.sr.trainer import TrainBatch, TrainConfig, TrainResult, train_sr

__all__ = [
    "MODELS", "ItemEmbedding", "SequentialRecommender", "build_model", "load_model", "model_class", "pad_histories",
    "SASRec", "SASRecConfig", "GRU4Rec", "GRU4RecConfig", "Caser", "CaserConfig", "Pop", "PopConfig",
    "TrainConfig", "TrainBatch", "TrainResult", "train_sr",
    "evaluate_full", "evaluate_candidates", "evaluate_model", "predict", "write_predictions",
]
