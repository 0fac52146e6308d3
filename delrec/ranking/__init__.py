"""Generation-based ranking of fixed candidate sets with an LLM, on the transformers or vLLM backend.

    from delrec.ranking import RankArguments, ReadoutConfig, rank
    metrics = rank(RankArguments(model="runs/stage2", data="data/games", out="runs/rank"),
                   ReadoutConfig(readout="score"))

Modules: `models` (which model folder, how to prompt it), `requests` (prompts with history
truncation), `base` (backend interface, read-outs, metrics, rankings file), `trie` (candidate
prefix tree), `hf` (transformers backend), `runner` (the end-to-end run behind `delrec rank`), `shards` (the
work split over the processes of an `accelerate launch`, resume).
The vLLM backend (`vllm`) is imported only when chosen.
"""

from delrec.ranking.base import BACKENDS, Backend, ReadoutConfig, backend_module, match_title
from delrec.ranking.models import ModelSpec, describe_model
from delrec.ranking.requests import RankingRequest, build_requests
from delrec.ranking.runner import METRICS_FILE, RANKINGS_FILE, RankArguments, rank

__all__ = [
    "BACKENDS", "Backend", "METRICS_FILE", "ModelSpec", "RANKINGS_FILE", "RankArguments", "RankingRequest",
    "ReadoutConfig", "backend_module", "build_requests", "describe_model", "match_title", "rank",
]
