"""The keys the pipeline adds to each section, beyond those of the command the section runs.

Each is a config dataclass like a command's (`metadata={"help": ...}`), so a section is validated
exactly as that command's `--config` file, and `delrec run --help` lists these keys from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from delrec.config import THREADS, SHARE, at_least, between, check_fields
from delrec.data.synthetic import MAX_ITEMS, MAX_USERS
from delrec.pipeline.layout import VARIANTS


@dataclass
class RunOptions:
    """Top-level keys of a pipeline config."""

    out: str | None = field(
        default=None, metadata={"help": "Run folder (default: runs/<config file name>); `--out` overrides it."}
    )
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads in every stage; 0: the process's (OMP_NUM_THREADS, else the "
                             "`delrec` command's one per free core).", "range": THREADS}
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class DataOptions:
    """Section `data` (plus every `PreprocessConfig` key: num_candidates, seed, max_history, kcore, ...)."""

    format: Literal["synthetic", "rows", "recbole", "movielens", "csv"] = field(
        default="synthetic", metadata={"help": "Input format, as `delrec data prepare --format`."}
    )
    input: str | None = field(
        default=None, metadata={"help": "Folder (or file) of the raw data, relative to the working directory."}
    )
    pad_id: int | None = field(
        default=None, metadata={"help": "rows: the padding id in `seq` (detected if omitted).",
                                "range": between(-(2**63), 2**63 - 1)}
    )
    title_columns: str | None = field(
        default=None, metadata={"help": "rows: column order of a tab-separated title file, 'id,title' or 'title,id'."}
    )
    move_article: bool = field(
        default=True, metadata={"help": "movielens: 'Matrix, The (1999)' -> 'The Matrix (1999)'."}
    )
    synthetic_users: int = field(
        default=600, metadata={"help": "synthetic: number of users.", "range": between(1, MAX_USERS)}
    )
    synthetic_items: int = field(
        default=200, metadata={"help": "synthetic: number of items.", "range": between(2, MAX_ITEMS)}
    )
    synthetic_min_length: int = field(
        default=6, metadata={"help": "synthetic: shortest user sequence.", "range": between(1, MAX_ITEMS)}
    )
    synthetic_max_length: int = field(
        default=30, metadata={"help": "synthetic: longest user sequence (at most synthetic_items: users never repeat "
                              "an item).", "range": between(1, MAX_ITEMS)}
    )
    synthetic_follow_prob: float = field(
        default=0.8, metadata={"help": "synthetic: how often a user follows the planted successor structure.",
                               "range": SHARE}
    )


@dataclass
class SRModelOptions:
    """One entry of section `sr`, a name -> options mapping (plus every `delrec sr train` key of that model and
    of `TrainConfig`); the name is the model's folder RUN/sr/NAME."""

    model: str = field(default="sasrec", metadata={"help": "sasrec, gru4rec, caser or pop."})


@dataclass
class PredictionsOptions:
    """Section `predictions`: the pattern source of DELRec."""

    model: str = field(default="sasrec", metadata={"help": "Name of the `sr` entry whose predictions feed stage 1."})
    topk: int = field(default=20, metadata={"help": "Ranked items written per instance.", "range": at_least(1)})
    keep_history: bool = field(default=False, metadata={"help": "Allow history items in the predictions."})
    batch_size: int = field(default=1024, metadata={"help": "Histories scored per batch.", "range": at_least(1)})

    def __post_init__(self):
        check_fields(self)


@dataclass
class LLMOptions:
    """Section `llm` (plus every `delrec llm build-tiny` key, and the loading keys of `ModelConfig`)."""

    model: str | None = field(
        default=None,
        metadata={"help": "A hub id or local model folder used as it is; a packaged model's name (gemma-3-270m: "
                  "`delrec llm import`) is imported into the run folder; default: build the tiny LLM."},
    )


@dataclass
class Stage2Options:
    """Section `stage2` (plus every `delrec llm finetune` key but data, out, stage1 and soft_prompt)."""

    variants: list[str] = field(
        default_factory=lambda: ["stage1", "none"],
        metadata={"help": "Runs to train: stage1 (the distilled soft prompt), none (plain template, the ablation), "
                  "random (an untrained soft prompt)."},
    )

    def __post_init__(self):
        _check_names("variants", self.variants, VARIANTS)


@dataclass
class RankOptions:
    """Section `rank` (plus every `delrec rank` key but model, data, out and backend; `hf:` / `vllm:` hold each
    backend's options)."""

    backends: list[str] = field(default_factory=lambda: ["hf"], metadata={"help": "hf and/or vllm (vllm ranks the "
                                "`delrec export` of each variant)."})
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "vllm: dtype of the merged export."}
    )

    def __post_init__(self):
        _check_names("backends", self.backends, ("hf", "vllm"))


@dataclass
class StudentsOptions:
    """Section `students` (plus the student model's and `TrainConfig` keys, shared by every run; `runs:` maps a
    name to `method`, `teacher` (teacher names), `embedding_distillation`, `ed_weight` and the method's keys)."""

    model: str = field(default="sasrec", metadata={"help": "Student architecture: sasrec, gru4rec or caser."})


@dataclass
class LatencyOptions:
    """Section `latency`: top-K over the whole catalogue for N users, student vs LLM teacher."""

    users: int = field(
        default=200, metadata={"help": "Test users the student ranks (fewer if the split is smaller).",
                               "range": at_least(1)}
    )
    topk: int = field(default=20, metadata={"help": "K of the top-K lists.", "range": at_least(1)})
    repeats: int = field(
        default=5, metadata={"help": "Timed repetitions of the student; the median is reported.", "range": at_least(1)}
    )
    student: str | None = field(
        default=None, metadata={"help": "The `students.runs` entry to time (default: the first one)."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "The LLM teacher whose export time is compared (default: the first LLM one)."}
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class ReportOptions:
    """Section `report`."""

    full_k: int = field(default=20, metadata={"help": "K of the full-ranking columns (HR@K, NDCG@K): 10 or 20."})

    def __post_init__(self):
        if self.full_k not in (1, 5, 10, 20):
            raise ValueError(f"full_k must be 1, 5, 10 or 20 (the cut-offs metrics.json holds), got {self.full_k}")


def _check_names(key: str, values: list[str], allowed) -> None:
    if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{key} must list distinct values among {', '.join(allowed)}, got {values}")


def help_text() -> str:
    """The config sections and the keys each takes, for `delrec run --help`."""
    lines = ["config file sections (all optional; each also takes the keys of the command it runs):"]
    described = [
        ("(top level)", RunOptions, ""),
        ("data", DataOptions, "+ delrec data prepare's preprocessing keys (num_candidates, seed, max_history, ...)"),
        ("sr.NAME", SRModelOptions, "+ every delrec sr train key of that model"),
        ("predictions", PredictionsOptions, ""),
        ("llm", LLMOptions, "+ delrec llm build-tiny keys, and model loading keys (dtype, device, load_in_4bit, ...)"),
        ("stage1", None, "delrec llm distill-pattern keys (soft_prompt_tokens, max_train_instances, "
                         "learning_rate, ...)"),
        ("stage2", Stage2Options, "+ delrec llm finetune keys (r, alpha, max_train_instances, learning_rate, ...)"),
        ("rank", RankOptions, "+ delrec rank keys (split, readout, max_instances, ...); hf: / vllm: backend options"),
        ("teacher.NAME", None, "delrec teacher export keys; model / sr_model name sr/NAME or stage2/VARIANT"),
        ("students", StudentsOptions, "+ the student model's and delrec sr train's keys; runs.NAME: method, "
                                      "teacher (names), embedding_distillation and the method's keys"),
        ("latency", LatencyOptions, ""),
        ("report", ReportOptions, ""),
    ]
    for name, cls, extra in described:
        lines.append(f"  {name}")
        for f in dataclasses.fields(cls) if cls else ():
            lines.append(f"      {f.name}: {f.metadata.get('help', '')}")
        if extra:
            lines.append(f"      {extra}")
    return "\n".join(lines)
