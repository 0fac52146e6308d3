"""`export_teacher`: a model + a prepared dataset -> a teacher folder over the training instances.

Four teachers (`--mode`; `auto` picks `sr` for an SR model folder, `grounding` otherwise):

- `sr`: any SR model folder (`delrec.sr.load_model`): scores over all items, the top-K kept,
  history items excluded as in `delrec sr predict`; item embeddings = `model.item_embeddings()`
  (none for the popularity baseline).
- `grounding` (BIGRec, as DLLM2Rec's teacher): greedy generation of a title from a prompt
  without candidates (template task `teacher`), the generated text embedded as the LLM's
  last-layer hidden state of its last token, and ALL items ranked by L2 distance to each item
  title embedded the same way (score kind `distance`); item embeddings z_i = those title
  embeddings. Hidden states need transformers: HF backend only. A text is embedded alone
  (BOS when the tokenizer adds one, no EOS); an empty generation is embedded as the EOS token.
- `rerank` (cheaper): per instance an SR model's (`--sr_model`) top-M (history excluded) plus R
  items drawn uniformly from the rest (not in the history, seeded), shown in a shuffled order,
  scored by the LLM's title log-likelihood (the backends' `score`, shared-prompt KV cache; the
  model's own template, e.g. `lsr` lists them as candidates); the teacher's top-K is the best K of
  that list (score kind `score`: summed log-probability). Item embeddings as in grounding with the
  HF backend; the vLLM backend gives no hidden states, so it writes no embedding file.
- `embeddings`: the LLM's item embeddings alone, no rankings: every title of the catalogue embedded
  (batched, sorted by length), for collaborative embedding distillation with `--method none`.
  Cheap: one forward pass per title, no generation, no per-instance work.

User states (`--user_states`, off by default): the teacher's representation of each exported instance,
for the latent methods (DE, FTD, HTD) beside the item embeddings, in `user_states.safetensors` (keyed
like the rankings): `sr` writes the model's state after the history (`encode`, exactly what `delrec sr
predict --user_states` writes, so state . item vector is the teacher's score); `grounding` writes the
LLM's hidden state of each instance's prompt (the prompt the title is generated from, rendered and
truncated as for generation), at `--embedding_layer` / `--embedding_pooling` like the title embeddings,
so users and items share one space. `rerank` and `embeddings` write none (refused in one line): rerank
prompts hold the candidates (and may need a per-user soft prompt that `embed_texts` cannot take), and
`embeddings` renders no prompts.

Trajectory (`--trajectory`, off by default; `sr` only): HetComp's teacher training trajectory
(`delrec.distill.hetcomp`). The SR model folder must hold weight snapshots from its training
(`delrec sr train --snapshot_epochs E1 E2 ...`, `OUT/snapshots/epoch-N.safetensors`); each snapshot of an
epoch before the model's best epoch (metrics.json's `best_epoch`: the final model IS the best epoch, and a
later snapshot is a state it never went through; every snapshot when there is no metrics.json) ranks the
same instances the same way as the final model, oldest first, into `trajectory.safetensors`; the final
(best) model's lists stay `rankings.safetensors`. A model without such snapshots is refused in one line.

Item embeddings (all LLM modes): `--embedding_layer` and `--embedding_pooling` pick the hidden
state; the default is the last layer at the last token, BIGRec's choice, because grounding compares
generated text with titles in exactly that space (the state the LM head reads to continue the
text), and one definition for every mode keeps the teachers' matrices comparable. `mean` pools
the text's tokens (BOS excluded) instead.

The LLM modes cost seconds per instance on a CPU: `--max_instances N` ranks a seeded random subset
of N training instances (`--seed`); students distil on those and train on the rest with their
own loss (`delrec.distill.student`).

Shards (`delrec.ranking.shards`): `grounding` and `rerank` write each chunk of instances the backend answers at
once to OUT/shards/train-START-END.safetensors (items, scores, user states, and the counts teacher.json sums),
so that the processes of an `accelerate launch` split the chunks and an interrupted export resumes from the
chunks written; the main process merges them, in order, into the teacher folder a single process writes, staged
beside OUT and swapped in, which takes the shards away. Every process embeds the titles for grounding (it ranks
by them) and draws rerank's candidates for all instances (one random stream, as a single process draws it). The
`sr` and `embeddings` teachers, seconds of work, are the main process's alone.

The LLM may be a DELRec stage-2 folder, a `delrec export` folder or any causal LM
(`delrec.ranking.models.describe_model`); prompts are rendered as `delrec rank` renders them,
oldest history items dropped when a prompt would not fit the context. teacher.json records the
speed (`seconds`, `instances_per_second`: from the loaded model on, rerank's SR candidates
included) and in `source` the share of instances whose target is in the top-K, and per mode the
truncated prompts, empty generations, generations that are exactly a catalogue title, and the
targets among the rerank candidates. Every teacher with item embeddings (SR tables included) also
gets `embedding_knn`: valid users' targets among the 20 items nearest to their last item, against
chance (`delrec.distill.embedding.item_knn_hit_rate`), so a weak embedding teacher shows before a
student is trained on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from delrec.config import SEED, at_least, between, check_fields
from delrec.data.dataset import Instance, PreparedDataset, sampled_indices
from delrec.distill.embedding import item_knn_hit_rate
from delrec.distill.teacher_folder import SPLIT, Trajectory, check_teacher_out, write_teacher
from delrec.device import launch_position
from delrec.errors import DelrecError
from delrec.headers import ALLOW_OTHER_DATASET_HELP
from delrec.io import check_apart_from_inputs, read_json, replace_directory, staged_directory
from delrec.prompts.options import TemplateChoice
from delrec.sr.evaluate import top_k
from delrec.sr.trainer import SNAPSHOT_DIR

MODES = ("auto", "sr", "grounding", "rerank", "embeddings")
GROUNDING_TASK = "teacher"  # the template task without candidates (teacher.jinja)
KNN_K = 20  # the item-kNN check of a teacher's embeddings: top-20, as the students' test metrics
SETTING_COUNTS = frozenset({"max_new_tokens"})  # among the read-outs' counts, a setting: the same in every shard


@dataclass
class TeacherExportConfig(TemplateChoice):
    """Which teacher to export, for which dataset, and how."""

    model: str = field(
        metadata={"help": "An SR model folder, a DELRec stage-2 folder, a `delrec export` folder or any causal LM "
                  "(folder or hub id)."}
    )
    data: str = field(metadata={"help": "The prepared dataset whose TRAINING instances the teacher ranks."})
    out: str = field(metadata={"help": "Teacher folder to write (teacher.json, rankings.safetensors, "
                               "item_embeddings.safetensors); an existing teacher folder is replaced."})
    topk: int = field(
        default=10, metadata={"help": "Items kept per instance (K); the students' losses need K or more.",
                              "range": at_least(1)}
    )
    mode: Literal["auto", "sr", "grounding", "rerank", "embeddings"] = field(
        default="auto",
        metadata={"help": "sr: SR model scores; grounding: BIGRec generate + L2 grounding over all items (hf); "
                  "rerank: the LLM re-ranks an SR model's top-M + random items; embeddings: the LLM's item "
                  "embeddings only, no rankings (hf); auto: sr for an SR model folder, else grounding."},
    )
    max_instances: int | None = field(
        default=None,
        metadata={"help": "Rank only a seeded random subset of this many training instances (LLM teachers on a "
                  "budget); students train on the others with their own loss alone. Default: all.",
                  "range": at_least(1)},
    )
    embedding_layer: int = field(
        default=-1, metadata={"help": "LLM item embeddings: which hidden layer (-1: the last, as BIGRec; 0: the "
                              "input embeddings; counted from the end when negative).", "range": between(-1024, 1024)}
    )
    embedding_pooling: Literal["last", "mean"] = field(
        default="last", metadata={"help": "LLM item embeddings: the state at the title's last token (BIGRec), or "
                                  "the mean over its tokens (BOS excluded)."}
    )
    backend: Literal["hf", "vllm"] = field(
        default="hf",
        metadata={"help": "LLM backend: hf (transformers; all modes) or vllm (rerank only, no embeddings)."},
    )
    sr_model: str | None = field(
        default=None, metadata={"help": "rerank: the SR model folder whose top-M items the LLM re-ranks."}
    )
    sr_topm: int = field(
        default=20, metadata={"help": "rerank: the SR model's top-M items per instance (M).", "range": at_least(1)}
    )
    num_random: int = field(
        default=10, metadata={"help": "rerank: items drawn uniformly from the rest of the catalogue per instance (R).",
                              "range": at_least(0)}
    )
    keep_history: bool = field(
        default=False, metadata={"help": "Let history items be ranked (and drawn) instead of excluding them."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "grounding: generation budget (default: the longest item title + 8 tokens).",
                                "range": at_least(1)}
    )
    predictions: str | None = field(
        default=None,
        metadata={"help": "rerank with a model that reads a per-user soft prompt: the train split's SR predictions "
                  "written with `delrec sr predict --split train --user_states` (by the SR model it was trained "
                  "with), each prompt's user state."},
    )
    sr_batch_size: int = field(default=1024, metadata={"help": "Histories per SR model batch.", "range": at_least(1)})
    seed: int = field(
        default=0, metadata={"help": "Seed of the --max_instances subset and of rerank's random items and order.",
                             "range": SEED}
    )
    allow_other_dataset: bool = field(default=False, metadata={"help": ALLOW_OTHER_DATASET_HELP})
    user_states: bool = field(
        default=False,
        metadata={"help": "Also write each instance's user representation (user_states.safetensors) for the latent "
                  "methods (--latent de/ftd/htd): an SR model's state after the history; --mode grounding: the "
                  "LLM's hidden state of the prompt (same layer and pooling as the title embeddings)."},
    )
    trajectory: bool = field(
        default=False,
        metadata={"help": "SR teacher: also rank with each weight snapshot the model saved before its best epoch "
                  "(`delrec sr train --snapshot_epochs`), oldest first, into trajectory.safetensors: the teacher's "
                  "training trajectory that --method hetcomp distils as a curriculum."},
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        check_fields(self)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")


@dataclass
class _Ranked:
    """A teacher's output before it is written (items, scores and score_kind None: embeddings only)."""

    items: torch.Tensor | None  # [R, K]
    scores: torch.Tensor | None  # [R, K]
    score_kind: str | None
    embeddings: torch.Tensor | None
    source: dict
    seconds: float  # ranking time, model loading excluded
    user_states: torch.Tensor | None = None  # [R, D'] (--user_states), rows as the instances
    trajectory: Trajectory | None = None  # (--trajectory) rankings of the snapshots before the best epoch


def export_teacher(config: TeacherExportConfig, options=None) -> Path | None:
    """Write the teacher folder `config.out` and return its path (None on a process of a launch but the main one,
    which merges the shards).

    `options`: the LLM backend module's `Options` (device, dtype, batch size; its defaults when
    None); an SR model runs on `options.device` (auto when there is none).
    """

    position = launch_position()
    dataset = PreparedDataset.load(config.data)
    out = Path(config.out)
    check_apart_from_inputs(out, {"model": config.model, "dataset": config.data, "SR model": config.sr_model},
                            "the teacher")
    _check_out(out)
    if not config.topk <= dataset.num_items:
        raise DelrecError(f"--topk {config.topk} exceeds the catalogue size ({dataset.num_items} items)")
    instances = dataset.instances(SPLIT)
    if not instances:
        raise DelrecError(f"{dataset.path}: the train split has no instances to rank")
    mode = resolve_mode(config)
    if config.user_states and mode not in ("sr", "grounding"):
        raise DelrecError(f"--user_states: --mode {mode} writes no user states (rerank prompts hold the candidates, "
                          "embeddings renders no prompts); use --mode grounding or an SR teacher, or drop --user_states")
    if config.trajectory and mode != "sr":
        raise DelrecError(f"--trajectory: --mode {mode} has no training trajectory to rank with (only an SR model's "
                          "weight snapshots, `delrec sr train --snapshot_epochs`); export an SR teacher, or drop "
                          "--trajectory")
    instances = sampled_instances(instances, config.max_instances, config.seed)
    if mode == "sr":
        _shards(config, dataset, mode, options, position)  # it writes none, but refuses another run's
        if not position.main:
            return None
        ranked = _sr_teacher(config, dataset, instances, getattr(options, "device", "auto"))
    else:
        ranked = _llm_teacher(config, dataset, instances, mode, options, position)
        if ranked is None:
            return None
    ids = None
    if ranked.items is not None:
        targets = torch.tensor([inst.target for inst in instances], dtype=torch.long)
        ranked.source["target_in_topk"] = round(float((ranked.items == targets[:, None]).any(1).float().mean()), 6)
        ids = torch.tensor([inst.id for inst in instances], dtype=torch.long)
    if ranked.embeddings is not None:
        knn = item_knn_hit_rate(ranked.embeddings, dataset.instances("valid"), k=KNN_K, seed=config.seed)
        if knn is not None:
            ranked.source["embedding_knn"] = {"split": "valid", **knn}
    if config.max_instances is not None and ranked.items is not None:
        ranked.source["subset"] = {"max_instances": config.max_instances, "seed": config.seed,
                                   "instances": len(instances)}
    if ranked.user_states is not None:
        ranked.source["user_states"] = ({"kind": "sr state after the history"} if mode == "sr" else {
            "kind": "prompt hidden state", "layer": config.embedding_layer, "pooling": config.embedding_pooling})
    with staged_directory(out) as staged:  # swapped in whole: the shards leave only with a complete teacher
        folder = staged / out.name
        try:
            write_teacher(folder, dataset, ids, ranked.items, ranked.scores, ranked.score_kind, ranked.embeddings,
                          ranked.source, ranked.seconds, user_states=ranked.user_states, trajectory=ranked.trajectory)
        except DelrecError as exc:
            raise DelrecError(str(exc).replace(str(folder), str(out))) from None
        replace_directory(folder, out)
    return out


def _check_out(out: Path) -> None:
    """A teacher folder replaces an existing teacher folder, or the shards of an unfinished export; anything else
    is refused."""
    from delrec.ranking.shards import SHARDS_DIR

    if not (out.is_dir() and all(path.name == SHARDS_DIR for path in out.iterdir())):
        check_teacher_out(out)


def _shards(config: TeacherExportConfig, dataset: PreparedDataset, mode: str, options, position, template=None):
    """The export's shards (`delrec.ranking.shards`); one already in OUT must be this export's: the same options,
    dataset, mode and template, and the same models and predictions by content."""
    from delrec.ranking.shards import TENSORS, Shards, run_identity

    inputs = {"model": config.model, "sr_model": config.sr_model, "predictions": config.predictions}
    identity = run_identity("teacher export", dataset.fingerprint, [config] + ([options] if options else []), inputs,
                            mode=mode, template=None if template is None else template.fingerprint)
    return Shards(config.out, SPLIT, TENSORS, identity, position)


def sampled_instances(instances: list[Instance], count: int | None, seed: int) -> list[Instance]:
    """`count` instances drawn without replacement (seeded), in dataset order; all of them for None."""
    return [instances[i] for i in sampled_indices(len(instances), count, seed)]


def is_sr_folder(path: str | Path) -> bool:
    """Whether `path` is an SR model folder: a config.json whose model_type is a delrec SR model."""
    from delrec.sr import MODELS

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = read_json(config)
    return isinstance(data, dict) and data.get("model_type") in MODELS


def resolve_mode(config: TeacherExportConfig) -> str:
    """The mode to run: `auto` resolved from the folder, and a mode that does not fit the folder refused."""
    sr = is_sr_folder(config.model)
    if config.mode == "auto":
        return "sr" if sr else "grounding"
    if sr and config.mode != "sr":
        raise DelrecError(f"{config.model} is an SR model folder; --mode {config.mode} needs an LLM (use --mode sr, "
                          "or pass it as --sr_model for rerank)")
    if config.mode == "sr" and not sr:
        raise DelrecError(f"--mode sr needs an SR model folder (config.json with a delrec SR model_type); "
                          f"{config.model} is not one")
    return config.mode


# ----------------------------------------------------------------------------- SR teacher


def _load_sr(path: str, dataset: PreparedDataset, device: torch.device):
    from delrec.sr import load_model
    from delrec.sr.evaluate import check_compatible

    model = load_model(path, device)
    check_compatible(model, dataset, path)
    return model


def _sr_teacher(config: TeacherExportConfig, dataset: PreparedDataset, instances, device: str) -> _Ranked:
    from delrec.device import resolve_device

    exclude = not config.keep_history
    _check_room(instances, dataset.num_items, config.topk, exclude, "--topk")
    device = resolve_device(device)
    model = _load_sr(config.model, dataset, device)
    snapshots, best_epoch = trajectory_snapshots(config.model) if config.trajectory else ([], None)
    began = time.perf_counter()
    histories = [inst.history for inst in instances]
    items, scores = top_k(model, histories, config.topk, exclude, config.sr_batch_size, config.progress)
    try:
        embeddings = model.item_embeddings().detach().float().cpu()
    except NotImplementedError:  # the popularity baseline has none
        embeddings = None
    states = None
    if config.user_states:
        states = sr_user_states(model, histories, config.sr_batch_size, config.model)
    source = {"kind": "sr", "model": str(config.model), "model_type": model.model_type, "exclude_history": exclude,
              "device": str(device)}
    trajectory = None
    if snapshots:
        lists = [top_k(_with_snapshot(model, path), histories, config.topk, exclude, config.sr_batch_size,
                       config.progress) for _, path in snapshots]
        trajectory = Trajectory(tuple(epoch for epoch, _ in snapshots), torch.stack([i for i, _ in lists]),
                                torch.stack([s for _, s in lists]))
        source["trajectory"] = {"epochs": list(trajectory.epochs), "final_epoch": best_epoch,
                                "snapshots": f"{SNAPSHOT_DIR}/epoch-N.safetensors"}
    return _Ranked(items, scores, "score", embeddings, source, time.perf_counter() - began, states, trajectory)


def trajectory_snapshots(folder: str | Path) -> tuple[list[tuple[int, Path]], int | None]:
    """The SR model folder's weight snapshots before its best epoch, oldest first ((epoch, path) each), and that
    best epoch (None without a metrics.json that names it: then every snapshot); none is a `DelrecError`."""
    folder = Path(folder)
    found = []
    for path in sorted((folder / SNAPSHOT_DIR).glob("epoch-*.safetensors")):
        number = path.name.removeprefix("epoch-").removesuffix(".safetensors")
        if number.isdigit():
            found.append((int(number), path))
    found.sort()
    metrics = folder / "metrics.json"
    data = read_json(metrics) if metrics.is_file() else None
    best = data.get("best_epoch") if isinstance(data, dict) else None
    best = best if type(best) is int else None
    kept = [(epoch, path) for epoch, path in found if best is None or epoch < best]
    if not kept:
        held = ", ".join(str(epoch) for epoch, _ in found) or "none"
        raise DelrecError(f"--trajectory: {folder} has no weight snapshot before its best epoch {best} (snapshots of "
                          f"epochs: {held}); train it with `delrec sr train ... --snapshot_epochs E1 E2 ...` (epochs "
                          "before the best one), or drop --trajectory")
    return kept, best


def _with_snapshot(model, path: Path):
    """`model` holding the snapshot's weights (checked as `load_model` checks model.safetensors)."""
    from delrec.sr.base import check_dtypes, read_weights
    from delrec.tensors import first_nonfinite

    expected = model.state_dict()
    tensors = read_weights(path, {k: tuple(v.shape) for k, v in expected.items()})
    check_dtypes(tensors, expected, path)
    broken = first_nonfinite(tensors.items())
    if broken is not None:
        raise DelrecError(f"{path}: tensor '{broken[0]}' holds {broken[1]} NaN/inf value(s); the snapshot is damaged, "
                          "or training diverged by then")
    model.load_state_dict({k: v.to(expected[k].device) for k, v in tensors.items()})
    return model.eval()


def sr_user_states(model, histories: Sequence[Sequence[int]], batch_size: int, path) -> torch.Tensor:
    """[R, d] the SR model's state after each history (`encode`): what `delrec sr predict --user_states` writes."""
    from safetensors.torch import load as load_safetensors

    from delrec.sr.evaluate import user_states_bytes

    if model.model_type == "pop":
        raise DelrecError(f"--user_states: {path} is a popularity model, which keeps no state per user; drop "
                          "--user_states or export another SR model")
    return load_safetensors(user_states_bytes(model, histories, batch_size))["states"]


def _check_room(instances: Sequence[Instance], num_items: int, needed: int, exclude: bool, option: str) -> None:
    """Refuse when some history leaves fewer than `needed` items to rank once history items are excluded."""
    if needed > num_items:
        raise DelrecError(f"{option} needs {needed} items per instance, but the catalogue has {num_items}")
    if not exclude:
        return
    inst = max(instances, key=lambda i: len(set(i.history)))
    left = num_items - len(set(inst.history))
    if left < needed:
        raise DelrecError(
            f"{option} needs {needed} items per instance, but train instance {inst.id} has {num_items - left} "
            f"distinct history items, leaving {left} of the {num_items} items once its history is excluded; "
            f"lower {option} or pass --keep_history"
        )


# ----------------------------------------------------------------------------- LLM teachers


def _user_states(config: TeacherExportConfig, spec, dataset: PreparedDataset, instances, mode: str):
    """Each instance's SR user state [R, d] for a model with a per-user soft prompt (`--predictions`), checked to
    come from the SR model it was trained with; None for other models, which refuse `--predictions`."""
    from delrec.predictions import read_user_states

    if not spec.user_prompt:
        if config.predictions is not None:
            raise DelrecError(f"--predictions: {spec.path} reads no per-user soft prompt; leave it out")
        return None
    if mode != "rerank":
        raise DelrecError(f"{spec.path} reads a per-user soft prompt, which only --mode rerank hands each prompt (by "
                          "its user state); use --mode rerank")
    if config.predictions is None:
        raise DelrecError(f"{spec.path} reads a per-user soft prompt: pass --predictions, the train split's "
                          "predictions written with `delrec sr predict --split train --user_states`")
    states = read_user_states(config.predictions, dataset, SPLIT)
    if states.item_table_digest() != spec.user_prompt.get("item_table_sha256"):
        raise DelrecError(f"{config.predictions}: made by another SR model than the one {spec.path} was trained with "
                          "(their item tables differ); predict with that model")
    row = {inst.id: index for index, inst in enumerate(dataset.instances(SPLIT))}
    return states.states[[row[inst.id] for inst in instances]]


def _llm_teacher(config: TeacherExportConfig, dataset: PreparedDataset, instances, mode: str, options,
                 position) -> _Ranked | None:
    """The LLM teacher (None on a process of a launch but the main one, once its shards are written)."""
    from delrec.ranking.base import backend_module
    from delrec.ranking.models import check_soft_tokens, check_trained_dataset, describe_model, ranking_template
    from delrec.ranking.shards import Shard
    from delrec.ranking.teacher_signals import grounding_budget, embed_texts, ground, prompt_states, rerank

    if mode in ("grounding", "embeddings") and config.backend != "hf":
        raise DelrecError(f"--mode {mode} needs the LLM's hidden states, which only the hf backend gives; use "
                          f"--backend hf, or --mode rerank with --backend {config.backend}")
    spec = describe_model(config.model, config.template or (GROUNDING_TASK if mode == "grounding" else None),
                          config.domain)
    check_trained_dataset(spec, dataset, config.allow_other_dataset)
    template = ranking_template(spec, config.prompts_dir)
    if mode == "grounding" and template.task != GROUNDING_TASK:
        raise DelrecError(f"--mode grounding renders a template without candidates (task '{GROUNDING_TASK}', e.g. "
                          f"--template {GROUNDING_TASK}); '{template.name}' is a '{template.task}' template")
    module = backend_module(config.backend)
    options = options if options is not None else module.Options()
    shards = _shards(config, dataset, mode, options, position, template)
    sharded = mode in ("grounding", "rerank")
    if not (sharded or position.main):
        return None
    user_states = _user_states(config, spec, dataset, instances, mode)
    exclude = not config.keep_history
    candidate_sets, rerank_source, sr_seconds = None, {}, 0.0
    if mode == "rerank":
        began = time.perf_counter()
        device = getattr(options, "device", "auto")
        candidate_sets, rerank_source = rerank_candidates(config, dataset, instances, device)
        sr_seconds = time.perf_counter() - began
    elif mode == "grounding":
        _check_room(instances, dataset.num_items, config.topk, exclude, "--topk")

    if config.backend == "vllm":
        position.claim_gpus(options.tensor_parallel_size)
    started = time.perf_counter()
    with module.open_backend(spec, options) as backend:
        check_soft_tokens(spec, backend.tokenizer)
        began = time.perf_counter()
        embeddings = None
        if backend.name == "hf" and (position.main or mode == "grounding"):  # grounding ranks by them
            check_embedding_layer(config.embedding_layer, backend.model, spec.path)
            embeddings = embed_texts(backend.model, backend.tokenizer, dataset.titles, backend.batch_size,
                                     config.progress and position.main, "embed titles", config.embedding_layer,
                                     config.embedding_pooling)
        seconds = time.perf_counter() - began + sr_seconds  # the SR candidates are part of the teacher's cost
        if sharded:  # each shard's calls as quiet as one call on its chunk, the budget measured once
            budget = (grounding_budget(config, dataset.titles, backend.tokenizer) if mode == "grounding"
                      else config.max_new_tokens)
            quiet = replace(config, progress=False, max_new_tokens=budget)

            def work(start: int, end: int) -> Shard:
                chunk = instances[start:end]
                if mode == "grounding":
                    items, scores, counts = ground(quiet, dataset, chunk, spec, template, backend, embeddings)
                    tensors = {"items": items, "scores": scores}
                    if config.user_states:
                        tensors["states"] = prompt_states(quiet, dataset, chunk, spec, template, backend)
                else:
                    items, scores, counts = rerank(quiet, dataset, chunk, candidate_sets[start:end], spec, template,
                                                   backend, user_states=None if user_states is None else
                                                   user_states[start:end])
                    tensors = {"items": items, "scores": scores}
                ids = torch.tensor([inst.id for inst in chunk], dtype=torch.long)
                return Shard(start, end, tensors={"ids": ids, **tensors}, extra=counts)

            shards.plan(len(instances), backend.chunk_size)
            shards.fill(work, config.progress, mode)
        settings = {"name": backend.name, **backend.settings()}
    if not position.main:
        return None
    items = scores = states = None
    counts: dict = {}
    if sharded:
        parts = list(shards.collect([inst.id for inst in instances], config.progress))
        items, scores = (torch.cat([part.tensors[name] for part in parts]) for name in ("items", "scores"))
        states = torch.cat([part.tensors["states"] for part in parts]) if config.user_states else None
        for part in parts:
            for key, value in part.extra.items():
                counts[key] = value if key in SETTING_COUNTS else counts.get(key, 0) + value
        seconds += sum(part.seconds for part in parts)
    source = {
        "kind": f"llm-{mode}",
        "model": {"path": spec.path, "kind": spec.kind, "template": template.name,
                  "template_fingerprint": template.fingerprint, "domain": spec.domain,
                  "soft_prompt": spec.soft_prompt is not None},
        "backend": settings,
        "exclude_history": exclude,
        **rerank_source,
        **counts,
        "embeddings": {"text": "each item title", "layer": config.embedding_layer,
                       "pooling": config.embedding_pooling} if embeddings is not None else
        f"none: the {config.backend} backend gives no hidden states (use --backend hf)",
        "load_seconds": round(began - started, 3),
    }
    kind = {"grounding": "distance", "rerank": "score"}.get(mode)
    return _Ranked(items, scores, kind, embeddings, source, seconds, states)


def check_embedding_layer(layer: int, model, path) -> None:
    """`layer` must index the model's hidden states: the input embeddings and each layer's output, L + 1 of
    them (negative: counted from the end). A model whose config gives no layer count is left to run."""
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    layers = getattr(model_config, "num_hidden_layers", None)
    if isinstance(layers, int) and not -(layers + 1) <= layer <= layers:
        raise DelrecError(f"--embedding_layer {layer}: {path} has {layers} layers, so its hidden states are "
                          f"-{layers + 1}..{layers} (0: the input embeddings, -1: the last layer's output)")


def rerank_candidates(config: TeacherExportConfig, dataset: PreparedDataset, instances, device):
    """Per instance the SR top-M + R random other items, shuffled; and what teacher.json records of them."""
    if not config.sr_model:
        raise DelrecError("--mode rerank needs --sr_model DIR: the SR model folder whose top-M items the LLM re-ranks")
    if config.sr_topm + config.num_random < config.topk:
        raise DelrecError(f"--topk {config.topk} exceeds the re-ranked list of --sr_topm {config.sr_topm} + "
                          f"--num_random {config.num_random} items; raise them or lower --topk")
    exclude = not config.keep_history
    _check_room(instances, dataset.num_items, config.sr_topm + config.num_random, exclude, "--sr_topm + --num_random")
    from delrec.device import resolve_device

    model = _load_sr(config.sr_model, dataset, resolve_device(device))
    top, _ = top_k(model, [inst.history for inst in instances], config.sr_topm, exclude,
                          config.sr_batch_size, config.progress)
    rng = np.random.default_rng(config.seed)
    candidate_sets, hits = [], 0
    for inst, sr_items in zip(instances, top.tolist()):
        taken = set(sr_items) | (set(inst.history) if exclude else set())
        drawn: list[int] = []
        while len(drawn) < config.num_random:
            item = int(rng.integers(dataset.num_items))
            if item not in taken:
                taken.add(item)
                drawn.append(item)
        candidates = [int(i) for i in rng.permutation(sr_items + drawn)]
        hits += inst.target in candidates
        candidate_sets.append(candidates)
    source = {"sr_model": {"path": str(config.sr_model), "model_type": model.model_type}, "sr_topm": config.sr_topm,
              "num_random": config.num_random, "seed": config.seed,
              "target_in_candidates": round(hits / len(instances), 6)}
    return candidate_sets, source
