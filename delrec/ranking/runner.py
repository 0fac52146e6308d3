"""`rank`: a model folder + a prepared dataset split -> OUT/rankings.jsonl + OUT/metrics.json.

The one entry point behind `delrec rank` and `scripts/vllm_batch.py`: checks everything that can
be checked before a model is loaded (dataset, split, model folder, template, shards of an earlier
run), opens the chosen backend, renders one request per instance (history truncated to fit), reads
the rankings out chunk by chunk with a progress bar, each chunk a shard (OUT/shards/, `delrec.ranking.shards`:
split over the processes of an `accelerate launch`, and what an interrupted run resumes from), and
the main process merges the shards into both files, written atomically (the rankings stream to a
temp file renamed at the end; metrics.json, written last, marks a finished run, whose shards then go).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from delrec.config import SEED, at_least
from delrec.data.dataset import CANDIDATE_SPLITS, PreparedDataset, sampled_indices
from delrec.device import launch_position
from delrec.errors import DelrecError
from delrec.headers import ALLOW_OTHER_DATASET_HELP
from delrec.io import check_apart_from_inputs, check_own_folder, write_json
from delrec.llm.tokenization import encode_completion
from delrec.prompts.options import TemplateChoice
from delrec.ranking.base import BACKENDS, Ranked, ReadoutConfig, RunSummary, backend_module, read_out, rankings_writer
from delrec.ranking.models import check_soft_tokens, check_trained_dataset, describe_model, ranking_template
from delrec.ranking.requests import build_requests
from delrec.ranking.shards import ROWS, SHARDS_DIR, Shard, Shards, run_identity

RANKINGS_FILE = "rankings.jsonl"
METRICS_FILE = "metrics.json"
GENERATION_MARGIN = 8  # tokens beyond the longest candidate title that free generation may use


@dataclass
class RankArguments(TemplateChoice):
    """What to rank, with which backend, and where to write it."""

    model: str = field(
        metadata={"help": "A DELRec stage-2 folder, a `delrec export` folder, or any causal LM (folder or hub id)."}
    )
    data: str = field(metadata={"help": "A prepared dataset folder (from `delrec data prepare`)."})
    out: str = field(metadata={"help": "Folder to write rankings.jsonl and metrics.json into."})
    split: Literal["valid", "test"] = field(
        default="test", metadata={"help": "Split whose fixed candidate sets to rank."}
    )
    backend: Literal["hf", "vllm", "openai"] = field(
        default="hf",
        metadata={"help": "hf: transformers, any device; vllm: vLLM engine (exported or plain folders); openai: any "
                  "OpenAI-compatible server (--base_url) serving --model."},
    )
    max_instances: int | None = field(
        default=None, metadata={"help": "Rank only N of the split's instances: the first N, or a seeded sample of N "
                                "with --sample_seed.", "range": at_least(1)}
    )
    sample_seed: int | None = field(
        default=None,
        metadata={"help": "With --max_instances: rank a random sample of N instances drawn with this seed (the same "
                  "users for every model, backend and teacher export given the same seed) instead of the first N.",
                  "range": SEED},
    )
    predictions: str | None = field(
        default=None,
        metadata={"help": "sr_hint template, or a model with a per-user soft prompt: the ranked split's SR predictions "
                  "written with `delrec sr predict --user_states` (by the SR model the LLM was fine-tuned with): the "
                  "prompt names its top candidates, or the soft prompt is made from its user states."},
    )
    allow_other_dataset: bool = field(default=False, metadata={"help": ALLOW_OTHER_DATASET_HELP})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self):
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError(f"max_instances must be at least 1, got {self.max_instances}")
        if self.split not in CANDIDATE_SPLITS:
            raise ValueError(f"split '{self.split}' has no fixed candidate sets; rank {' or '.join(CANDIDATE_SPLITS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")


def rank(args: RankArguments, readout: ReadoutConfig, options=None) -> dict | None:
    """Rank, write OUT/rankings.jsonl and OUT/metrics.json, and return the metrics.

    `options`: the backend module's `Options` (its defaults when None). Under `accelerate launch`, each process
    ranks its share of the chunks into OUT/shards; the main process merges them and returns the metrics, the
    others None.
    """
    started = time.perf_counter()
    out = Path(args.out)
    position = launch_position()
    dataset = PreparedDataset.load(args.data)
    check_apart_from_inputs(out, {"model": args.model, "dataset": args.data}, "the rankings")
    check_own_folder(out, (RANKINGS_FILE, METRICS_FILE, SHARDS_DIR))
    spec = describe_model(args.model, args.template, args.domain)
    check_trained_dataset(spec, dataset, args.allow_other_dataset)
    template = ranking_template(spec, args.prompts_dir)
    module = backend_module(args.backend)
    options = options if options is not None else module.Options()
    identity = run_identity("rank", dataset.fingerprint, [args, readout, options],
                            {"model": args.model, "predictions": args.predictions}, template=template.fingerprint)
    shards = Shards(out, args.split, ROWS, identity, position)
    if args.backend == "vllm":
        position.claim_gpus(options.tensor_parallel_size)

    with module.open_backend(spec, options) as backend:
        loaded = time.perf_counter()
        check_soft_tokens(spec, backend.tokenizer)
        requests, max_new_tokens = _requests(args, readout, dataset, spec, template, backend)
        shards.plan(len(requests), backend.chunk_size)

        def work(start: int, end: int) -> Shard:
            ranked = read_out(backend, requests[start:end], readout, max_new_tokens)
            return Shard(start, end, records=[{"id": r.row["id"], "row": r.row, "alternative": r.alternative}
                                              for r in ranked])

        shards.fill(work, args.progress, f"rank ({readout.readout})")
        settings = {"name": backend.name, **backend.settings()}
    if not position.main:
        return None

    summary, seconds = RunSummary(readout), 0.0
    with rankings_writer(out / RANKINGS_FILE) as write:
        for shard in shards.collect([r.id for r in requests], args.progress):
            ranked = [Ranked(record["row"], record["alternative"]) for record in shard.records]
            write([r.row for r in ranked])
            for request, result in zip(requests[shard.start : shard.end], ranked):
                summary.add(request, result)
            seconds += shard.seconds
    totals = summary.metrics()
    metrics = {
        "protocol": "candidates",
        args.split: totals.pop("metrics"),
        "readout": _readout_settings(readout, max_new_tokens),
        **totals,
        "seconds": round(seconds, 3),
        "instances_per_second": round(len(requests) / seconds, 3) if seconds > 0 else None,
        "load_seconds": round(loaded - started, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "backend": settings,
        "model": {"path": spec.path, "kind": spec.kind, "template": template.name,
                  "template_fingerprint": template.fingerprint, "domain": spec.domain, "sr_model": spec.sr_model,
                  "soft_prompt": spec.soft_prompt is not None},
        "dataset": {"path": str(dataset.path), "fingerprint": dataset.fingerprint, "split": args.split},
    }
    write_json(out / METRICS_FILE, metrics)
    shards.remove()
    return metrics


def sr_states(args: RankArguments, spec, template, dataset):
    """The user states an sr_hint template or a per-user soft prompt reads (`--predictions`), checked to come from
    the SR model the LLM was fine-tuned with; None for other models, which refuse `--predictions` rather than
    ignore it."""
    from delrec.predictions import read_user_states

    reader = ("template '" + template.name + "' names the SR model's top candidates" if template.task == "sr_hint"
              else f"{spec.path} reads a per-user soft prompt" if spec.user_prompt else None)
    if reader is None:
        if args.predictions is not None:
            raise DelrecError(f"--predictions: template '{template.name}' does not read SR predictions (only sr_hint "
                              "templates and models with a per-user soft prompt do); leave it out")
        return None
    if args.predictions is None:
        raise DelrecError(f"{reader}: pass --predictions, the {args.split} split's predictions written with "
                          f"`delrec sr predict --split {args.split} --user_states`")
    states = read_user_states(args.predictions, dataset, args.split)
    trained = (spec.sr_hint or spec.user_prompt or {}).get("item_table_sha256")
    if trained is not None and states.item_table_digest() != trained:
        raise DelrecError(f"{args.predictions}: made by another SR model than the one {spec.path} was fine-tuned "
                          "with (their item tables differ); predict with that model")
    return states


def _readout_settings(readout: ReadoutConfig, max_new_tokens: int | None) -> dict:
    """The read-out options that shaped the result (the others do not apply to it)."""
    relevant = {"score": ("length_normalized",), "constrained": ("num_beams",), "generate": ("match",)}[readout.readout]
    settings = {"name": readout.readout, **{k: v for k, v in asdict(readout).items() if k in relevant}}
    if readout.readout == "generate":
        settings["max_new_tokens"] = max_new_tokens
    return settings


def _requests(args: RankArguments, readout: ReadoutConfig, dataset, spec, template, backend):
    """The requests to rank and the generation budget (None unless generating)."""
    cache: dict[str, int] = {}

    def length(title: str) -> int:
        """Tokens of a title as an answer (EOS included)."""
        if title not in cache:
            cache[title] = len(encode_completion(backend.tokenizer, title))
        return cache[title]

    generate = readout.readout == "generate"
    max_new_tokens = readout.max_new_tokens
    if generate and max_new_tokens is None:
        titles = dataset.titles
        every = dataset.candidates(args.split)
        candidate_sets = [every[i] for i in sampled_indices(len(every), args.max_instances, args.sample_seed)]
        max_new_tokens = max(length(titles[i]) for items in candidate_sets for i in items) + GENERATION_MARGIN

    def answer_tokens(titles) -> int:
        """Tokens that must fit after the prompt: the generation budget, or the longest candidate."""
        return max_new_tokens if generate else max(length(t) for t in titles)

    requests = build_requests(
        dataset, args.split, spec, template, backend.tokenizer, backend.max_length, answer_tokens, args.max_instances,
        args.sample_seed, sr_states(args, spec, template, dataset),
    )
    if not requests:
        raise DelrecError(f"{dataset.path}: split '{args.split}' has no instances to rank")
    return requests, max_new_tokens
