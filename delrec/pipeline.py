"""One YAML config -> the whole loop, each stage in a folder of one run folder, unchanged stages skipped.

    from delrec.pipeline import load_config, run_pipeline
    config = load_config("configs/pipeline/lastfm.yaml")
    run_pipeline(config, "runs/lastfm")                # or: delrec run configs/pipeline/lastfm.yaml

Stages, in order; each calls the library behind one command and writes RUN/<stage>/:

    data         prepare the dataset                                    delrec data prepare
    sr           train the SR models (popularity, SASRec, ...)          delrec sr train
    predictions  one SR model's top-K for train/valid/test, with the    delrec sr predict --prefix_predictions
                 prefix predictions Temporal Analysis needs
    llm          build and pre-train the tiny LLM, or take a hub id /   delrec llm build-tiny
                 local model as it is
    stage1       DELRec stage 1: the soft prompt (TA + RPS)             delrec llm distill-pattern
    stage2       DELRec stage 2: LoRA, one run per variant (stage1:     delrec llm finetune
                 the distilled soft prompt; none: the plain-template
                 ablation; random: an untrained soft prompt)
    rank         rank the test candidates, per variant and backend      delrec rank (+ delrec export for vllm)
    teacher      teacher folders from the LLM and/or SR models          delrec teacher export
    students     students alone and distilled                           delrec student train
    latency      top-K for N users: student vs the LLM teacher
    report       RUN/report.md and its plots                            delrec.report

The YAML has one section per stage (all optional, with defaults) plus `out` and `threads`. A
section takes the same keys as the `--config` file of the command it runs, except the paths the
pipeline wires itself (data, out, predictions, model folders); `delrec run --help` lists them, and
delrec/configs/demo.yaml (the `delrec demo` config) shows each. Unknown keys and bad values are
refused before anything runs, naming the file, section and key.

Skipping, resuming, re-running. RUN/<stage>/stage.json records the stage's content hash (its
configuration + the identity of its inputs: each upstream stage's hash and finish time, and for
outside inputs a fingerprint of the files), the configuration, start and finish times, seconds and
status. A stage is skipped when it finished and its hash is unchanged; a changed configuration
re-runs that stage (its folder emptied first) and, because its finish time changes, everything
downstream. A stage that did not finish (interrupted, failed, killed) resumes in place: the SR
trainer from its epoch checkpoint, stages 1 and 2 from their last Trainer checkpoint, and parts
of a stage that finished (one SR model of several, one stage-2 variant) are not redone.
`--only STAGE` runs one stage, `--from STAGE` that stage and everything after it (both re-run it
even when unchanged; the stages before must be up to date); `--dry-run` prints the plan.
Each stage's own output goes to RUN/<stage>/stage.log; RUN/run.json summarises the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import delrec
from delrec.config import build_parser, coerce_config, load_yaml, option_actions, unknown_key_error
from delrec.errors import DelrecError
from delrec.io import atomic_write, check_parents_are_folders, is_occupied, read_json, write_json, write_jsonl

STAGES = ("data", "sr", "predictions", "llm", "stage1", "stage2", "rank", "teacher", "students", "latency", "report")
INPUTS: dict[str, tuple[str, ...]] = {
    "data": (),
    "sr": ("data",),
    "predictions": ("data", "sr"),
    "llm": ("data",),
    "stage1": ("data", "predictions", "llm"),
    "stage2": ("data", "llm", "stage1"),
    "rank": ("data", "stage2"),
    "teacher": ("data", "sr", "stage2"),
    "students": ("data", "teacher"),
    "latency": ("data", "students", "teacher"),
    "report": STAGES[:-1],
}
STAGE_FILE = "stage.json"
STAGE_LOG = "stage.log"
RUN_FILE = "run.json"
CONFIG_COPY = "config.yaml"
REPORT_FILE = "report.md"
TRAINER_LOG = "trainer_log.jsonl"
SPLITS = ("train", "valid", "test")
VARIANTS = ("stage1", "none", "random")
VARIANT_FOLDERS = {"stage1": "soft-prompt", "none": "no-soft-prompt", "random": "random-soft-prompt"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WIRED = "<set by the pipeline>"


# ----------------------------------------------------------------------------- the pipeline's own options


@dataclass
class RunOptions:
    """Top-level keys of a pipeline config."""

    out: str | None = field(
        default=None, metadata={"help": "Run folder (default: runs/<config file name>); `--out` overrides it."}
    )
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads in every stage; 0: the process's (OMP_NUM_THREADS, else the "
                             "`delrec` command's one per free core)."}
    )

    def __post_init__(self):
        if self.threads < 0:
            raise ValueError(f"threads must be 0 or more, got {self.threads}")


@dataclass
class DataOptions:
    """Section `data` (plus every `PreprocessConfig` key: num_candidates, seed, max_history, kcore, ...)."""

    format: Literal["synthetic", "rows", "recbole", "movielens", "csv"] = field(
        default="synthetic", metadata={"help": "Input format, as `delrec data prepare --format`."}
    )
    input: str | None = field(
        default=None, metadata={"help": "Folder (or file) of the raw data, relative to the working directory."}
    )
    pad_id: int | None = field(default=None, metadata={"help": "rows: the padding id in `seq` (detected if omitted)."})
    title_columns: str | None = field(
        default=None, metadata={"help": "rows: column order of a tab-separated title file, 'id,title' or 'title,id'."}
    )
    move_article: bool = field(
        default=True, metadata={"help": "movielens: 'Matrix, The (1999)' -> 'The Matrix (1999)'."}
    )
    synthetic_users: int = field(default=600, metadata={"help": "synthetic: number of users."})
    synthetic_items: int = field(default=200, metadata={"help": "synthetic: number of items."})
    synthetic_min_length: int = field(default=6, metadata={"help": "synthetic: shortest user sequence."})
    synthetic_max_length: int = field(default=30, metadata={"help": "synthetic: longest user sequence."})
    synthetic_follow_prob: float = field(
        default=0.8, metadata={"help": "synthetic: how often a user follows the planted successor structure."}
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
    topk: int = field(default=20, metadata={"help": "Ranked items written per instance."})
    keep_history: bool = field(default=False, metadata={"help": "Allow history items in the predictions."})
    batch_size: int = field(default=1024, metadata={"help": "Histories scored per batch."})

    def __post_init__(self):
        if self.topk < 1 or self.batch_size < 1:
            raise ValueError(f"topk and batch_size must be at least 1, got {self.topk}, {self.batch_size}")


@dataclass
class LLMOptions:
    """Section `llm` (plus every `delrec llm build-tiny` key, and the loading keys of `ModelConfig`)."""

    model: str | None = field(
        default=None,
        metadata={"help": "A hub id or local model folder used as it is (no building); default: build the tiny LLM."},
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

    users: int = field(default=200, metadata={"help": "Test users the student ranks (fewer if the split is smaller)."})
    topk: int = field(default=20, metadata={"help": "K of the top-K lists."})
    repeats: int = field(default=5, metadata={"help": "Timed repetitions of the student; the median is reported."})
    student: str | None = field(
        default=None, metadata={"help": "The `students.runs` entry to time (default: the first one)."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "The LLM teacher whose export time is compared (default: the first LLM one)."}
    )

    def __post_init__(self):
        if min(self.users, self.topk, self.repeats) < 1:
            raise ValueError("users, topk and repeats must be at least 1")


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


# ----------------------------------------------------------------------------- parsed configuration


@dataclass
class Section:
    """One parsed section (or entry of one): an instance of each config class, validated like a `--config` file.

    `wired` names the fields the pipeline fills in at run time (paths); they are left out of `describe`.
    """

    values: tuple
    wired: frozenset[str] = frozenset()

    def get(self, cls: type):
        for value in self.values:
            if type(value) is cls:
                return value
        raise KeyError(cls.__name__)

    def describe(self) -> dict:
        return {type(v).__name__: {k: x for k, x in dataclasses.asdict(v).items() if k not in self.wired}
                for v in self.values}


@dataclass
class PipelineConfig:
    """A whole pipeline config: `sections[stage]` per stage but sr and teacher, which are named entries
    (`sr_models`, `teachers`), as are `rank_backends` and `students.runs` (`student_runs`)."""

    source: Path
    text: str  # the YAML as written (copied into the run folder and the report)
    run: RunOptions
    sections: dict[str, Section]
    sr_models: dict[str, Section]
    rank_backends: dict[str, Section]
    teachers: dict[str, Section]
    student_runs: dict[str, Section]

    def stage_config(self, stage: str) -> dict:
        """What a stage's content hash covers of the configuration."""
        sections = self.sections
        if stage == "sr":
            return {name: entry.describe() for name, entry in self.sr_models.items()}
        if stage in ("stage1", "stage2"):  # the LLM's loading options act here, not in the build
            return {**sections[stage].describe(), "model": _model_loading(self)}
        if stage == "rank":
            return {**sections[stage].describe(), "backends": {k: v.describe() for k, v in self.rank_backends.items()}}
        if stage == "teacher":
            return {name: entry.describe() for name, entry in self.teachers.items()}
        if stage == "students":
            return {**sections[stage].describe(), "runs": {k: v.describe() for k, v in self.student_runs.items()}}
        if stage == "llm":
            described = sections[stage].describe()
            described.pop("ModelConfig")
            return described
        return sections[stage].describe()


def _model_loading(config: PipelineConfig) -> dict:
    return {**config.sections["llm"].describe()["ModelConfig"], "model": config.sections["llm"].get(LLMOptions).model}


def parse_options(classes: list[type], data: dict, source: str, wired: dict | None = None,
                  defaults: dict | None = None) -> Section:
    """Validate the mapping `data` exactly as the `--config` file of a command built from `classes` would be.

    `wired`: fields the pipeline sets (a key naming one is refused); `defaults`: the pipeline's
    defaults for some fields (e.g. no progress bars), which `data` may override.
    """
    if not isinstance(data, dict):
        raise DelrecError(f"{source}: expected a mapping of option: value, got {type(data).__name__}")
    wired = wired or {}
    parser = build_parser(classes, prog="delrec run")
    actions = option_actions(parser)
    for key in data:
        if str(key) in wired:
            raise DelrecError(f"{source}: key '{key}' is set by the pipeline (it wires the stages' folders); remove it")
    values = {**(defaults or {}), **coerce_config(parser, {str(k): v for k, v in data.items()}, source, hidden=list(wired))}
    values.update(wired)
    for key in values:
        actions[key].required = False
    parser.set_defaults(**values)
    namespace = vars(parser.parse_args([]))
    instances = []
    for cls in classes:
        kwargs = {f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.init and f.name in namespace}
        try:
            instances.append(cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise DelrecError(f"{source}: {exc}") from None
    return Section(tuple(instances), frozenset(wired))


def _mapping(data: Any, source: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DelrecError(f"{source}: expected a mapping, got {type(data).__name__} {data!r}")
    return dict(data)


def _named(data: Any, source: str, default: dict) -> dict[str, dict]:
    """A mapping of names (folder names) to option mappings."""
    entries = _mapping(default if data is None else data, source)
    if not entries:
        raise DelrecError(f"{source}: expected at least one entry")
    for name, value in entries.items():
        if not NAME.match(str(name)):
            raise DelrecError(f"{source}: '{name}' is not a usable name (letters, digits, '_', '.', '-')")
        entries[name] = _mapping(value, f"{source}.{name}")
    return entries


def _sr_classes(name: str, source: str) -> tuple[type, type]:
    from delrec.sr import MODELS

    if name not in MODELS:
        raise DelrecError(f"{source}: unknown model '{name}'; expected one of {', '.join(MODELS)}")
    return MODELS[name].config_class, MODELS[name]


NO_PROGRESS = {"progress": False}
DEFAULT_SR_MODELS = {"pop": {"model": "pop"}, "sasrec": {"model": "sasrec"}}
DEFAULT_TEACHERS = {"llm": {"model": "stage2/stage1", "mode": "grounding"}}
DEFAULT_STUDENT_RUNS = {"alone": {"method": "none"}, "dllm2rec": {"method": "dllm2rec", "teacher": ["llm"]}}


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline config: every key of every section, and every cross-reference."""
    from delrec.data.preprocess import PreprocessConfig
    from delrec.distill.export import TeacherExportConfig
    from delrec.distill.student import StudentConfig, method_config_class
    from delrec.llm.loading import LoraSettings, ModelConfig
    from delrec.llm.stage1 import DistillArguments
    from delrec.llm.stage2 import FinetuneArguments
    from delrec.llm.tiny import TinyLLMConfig
    from delrec.llm.training import TrainingSettings
    from delrec.ranking.base import BACKENDS, ReadoutConfig, backend_module
    from delrec.ranking.runner import RankArguments
    from delrec.sr.trainer import TrainConfig

    path = Path(path)
    data = load_yaml(path)
    text = path.read_text(encoding="utf-8")
    top = {f.name for f in dataclasses.fields(RunOptions)}
    for key in data:
        if key not in top and key not in STAGES:
            raise unknown_key_error(str(path), str(key), sorted(top | set(STAGES)))
    run = parse_options([RunOptions], {k: v for k, v in data.items() if k in top}, str(path)).values[0]

    def where(*keys) -> str:
        return f"{path} section '{'.'.join(str(k) for k in keys)}'"

    def section(name: str) -> dict:
        return _mapping(data.get(name), where(name))

    sections: dict[str, Section] = {}
    sections["data"] = parse_options([DataOptions, PreprocessConfig], section("data"), where("data"))
    data_options = sections["data"].get(DataOptions)
    if data_options.format != "synthetic" and not data_options.input:
        raise DelrecError(f"{where('data')}: format '{data_options.format}' needs 'input' (the raw data folder)")

    sr_models = {}
    for name, entry in _named(data.get("sr"), where("sr"), DEFAULT_SR_MODELS).items():
        model_config, _ = _sr_classes(str(entry.get("model", SRModelOptions.model)), where("sr", name))
        sr_models[name] = parse_options([SRModelOptions, TrainConfig, model_config], entry, where("sr", name),
                                        defaults=NO_PROGRESS)

    sections["predictions"] = parse_options([PredictionsOptions], section("predictions"), where("predictions"))
    source_model = sections["predictions"].get(PredictionsOptions).model
    trainable = [n for n, e in sr_models.items() if _sr_classes(e.get(SRModelOptions).model, "")[1].trainable]
    if source_model not in trainable:
        raise DelrecError(f"{where('predictions')}: model '{source_model}' is not a trainable model of section 'sr'; "
                          f"expected one of: {', '.join(trainable) or 'none (add a sasrec, gru4rec or caser model)'}")

    sections["llm"] = parse_options([LLMOptions, TinyLLMConfig, ModelConfig], section("llm"), where("llm"),
                                    wired={"model_name_or_path": WIRED})
    sections["stage1"] = parse_options(
        [DistillArguments, TrainingSettings], section("stage1"), where("stage1"), defaults=NO_PROGRESS,
        wired={"data": WIRED, "train_predictions": WIRED, "valid_predictions": WIRED, "out": WIRED})
    sections["stage2"] = parse_options(
        [Stage2Options, FinetuneArguments, LoraSettings, TrainingSettings], section("stage2"), where("stage2"),
        defaults=NO_PROGRESS, wired={"data": WIRED, "out": WIRED, "stage1": None, "soft_prompt": "stage1"})
    variants = sections["stage2"].get(Stage2Options).variants

    rank = section("rank")
    backend_keys = {k: rank.pop(k) for k in ("hf", "vllm") if k in rank}
    sections["rank"] = parse_options([RankOptions, RankArguments, ReadoutConfig], rank, where("rank"),
                                     defaults=NO_PROGRESS,
                                     wired={"model": WIRED, "data": WIRED, "out": WIRED, "backend": "hf"})
    rank_backends = {}
    for backend in sections["rank"].get(RankOptions).backends:
        module = backend_module(backend)
        rank_backends[backend] = parse_options([module.Options], _mapping(backend_keys.pop(backend, None),
                                               where("rank", backend)), where("rank", backend))
    for backend in backend_keys:
        raise DelrecError(f"{where('rank', backend)}: options for backend '{backend}', which 'backends' does not list")

    teachers = {}
    for name, entry in _named(data.get("teacher"), where("teacher"), DEFAULT_TEACHERS).items():
        backend = str(entry.get("backend", "hf"))
        if backend not in BACKENDS:
            raise DelrecError(f"{where('teacher', name)}: key 'backend' must be one of {', '.join(BACKENDS)}, "
                              f"got {backend!r}")
        teachers[name] = parse_options([TeacherExportConfig, backend_module(backend).Options], entry,
                                       where("teacher", name), defaults=NO_PROGRESS,
                                       wired={"data": WIRED, "out": WIRED})
        export = teachers[name].get(TeacherExportConfig)
        for key in ("model", "sr_model"):
            _check_reference(getattr(export, key), where("teacher", name), key, sr_models, variants)

    students = section("students")
    runs_data = students.pop("runs", None)
    student_model = str(students.get("model", StudentsOptions.model))
    model_config, model_cls = _sr_classes(student_model, where("students"))
    if not model_cls.trainable:
        raise DelrecError(f"{where('students')}: a student must be a trainable model (sasrec, gru4rec, caser), "
                          f"got '{student_model}'")
    sections["students"] = parse_options([StudentsOptions, TrainConfig, model_config], students, where("students"),
                                         defaults=NO_PROGRESS)
    student_runs = {}
    for name, entry in _named(runs_data, where("students", "runs"), DEFAULT_STUDENT_RUNS).items():
        method = str(entry.get("method", StudentConfig.method))
        method_class = method_config_class(method)
        classes = [StudentConfig] + ([method_class] if method_class else [])
        student_runs[name] = parse_options(classes, entry, where("students", "runs", name))
        student = student_runs[name].get(StudentConfig)
        for teacher in student.teacher:
            if teacher not in teachers:
                raise DelrecError(f"{where('students', 'runs', name)}: teacher '{teacher}' is not an entry of "
                                  f"section 'teacher' ({', '.join(teachers)})")
        uses_teacher = method_class is not None or student.embedding_distillation
        if uses_teacher != bool(student.teacher):
            raise DelrecError(f"{where('students', 'runs', name)}: method '{method}'"
                              + (" distils a teacher: add teacher: [NAME]" if uses_teacher else
                                 " trains the student alone: remove 'teacher' (or set embedding_distillation)"))

    sections["latency"] = parse_options([LatencyOptions], section("latency"), where("latency"))
    latency = sections["latency"].get(LatencyOptions)
    if latency.student is not None and latency.student not in student_runs:
        raise DelrecError(f"{where('latency')}: student '{latency.student}' is not an entry of students.runs "
                          f"({', '.join(student_runs)})")
    llm_teachers = [n for n, e in teachers.items() if e.get(TeacherExportConfig).model.startswith("stage2/")]
    if latency.teacher is not None and latency.teacher not in llm_teachers:
        expected = ", ".join(llm_teachers) or "none (add one with model: stage2/VARIANT)"
        raise DelrecError(f"{where('latency')}: teacher '{latency.teacher}' is not an LLM teacher of section "
                          f"'teacher'; expected one of: {expected}")
    sections["report"] = parse_options([ReportOptions], section("report"), where("report"))
    return PipelineConfig(path, text, run, sections, sr_models, rank_backends, teachers, student_runs)


def _check_reference(value: str | None, source: str, key: str, sr_models: dict, variants: list[str]) -> None:
    """A teacher's `model` names `sr/NAME` (an entry of section `sr`) or `stage2/VARIANT` (a trained stage-2
    variant); its `sr_model` (rerank) an `sr/NAME` or nothing."""
    if value is None and key == "sr_model":
        return
    stage, _, name = str(value).partition("/")
    if (stage == "sr" and name in sr_models) or (stage == "stage2" and name in variants and key == "model"):
        return
    choices = [f"sr/{n}" for n in sr_models] + ([f"stage2/{v}" for v in variants] if key == "model" else [])
    raise DelrecError(f"{source}: key '{key}' is '{value}'; expected one of: {', '.join(choices)}")


# ----------------------------------------------------------------------------- run folder layout


class Layout:
    """Where each stage writes inside the run folder (paths relative to it are recorded in stage.json)."""

    def __init__(self, run: Path):
        self.run = run

    def stage(self, name: str) -> Path:
        return self.run / name

    @property
    def dataset(self) -> Path:
        return self.run / "data" / "dataset"

    def sr_model(self, name: str) -> Path:
        return self.run / "sr" / name

    def predictions(self, split: str) -> Path:
        return self.run / "predictions" / f"{split}.jsonl"

    @property
    def tiny_llm(self) -> Path:
        return self.run / "llm" / "model"

    @property
    def stage1(self) -> Path:
        return self.run / "stage1" / "soft-prompt"

    def stage2(self, variant: str) -> Path:
        return self.run / "stage2" / VARIANT_FOLDERS[variant]

    def rank(self, variant: str, backend: str) -> Path:
        return self.run / "rank" / f"{VARIANT_FOLDERS[variant]}-{backend}"

    def export(self, variant: str) -> Path:
        return self.run / "rank" / f"{VARIANT_FOLDERS[variant]}-export"

    def teacher(self, name: str) -> Path:
        return self.run / "teacher" / name

    def student(self, name: str) -> Path:
        return self.run / "students" / name

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run))


# ----------------------------------------------------------------------------- stages


@dataclass
class Context:
    """What a stage function gets: the config, the layout and a way to record extra files."""

    config: PipelineConfig
    layout: Layout

    def model_path(self) -> str:
        """The LLM every LLM stage starts from: the configured one, or the tiny one built here."""
        model = self.config.sections["llm"].get(LLMOptions).model
        return model if model is not None else str(self.layout.tiny_llm)

    def model_config(self):
        from delrec.llm.loading import ModelConfig

        return dataclasses.replace(self.config.sections["llm"].get(ModelConfig), model_name_or_path=self.model_path())

    def resolve(self, reference: str | None) -> str | None:
        """`sr/NAME` or `stage2/VARIANT` -> that folder."""
        if reference is None:
            return None
        stage, _, name = reference.partition("/")
        return str(self.layout.sr_model(name) if stage == "sr" else self.layout.stage2(name))


def _done(folder: Path, marker: str = "metrics.json") -> bool:
    """Whether a part of a stage finished (its library writes `marker` last); its stage folder is emptied
    whenever the configuration changes, so a marker found here belongs to the current configuration."""
    return (folder / marker).is_file()


def stage_data(ctx: Context) -> dict:
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig

    section = ctx.config.sections["data"]
    options = section.get(DataOptions)
    if options.format == "synthetic":
        from delrec.data.synthetic import make_synthetic

        try:
            raw = make_synthetic(num_users=options.synthetic_users, num_items=options.synthetic_items,
                                 min_length=options.synthetic_min_length, max_length=options.synthetic_max_length,
                                 seed=section.get(PreprocessConfig).seed, follow_prob=options.synthetic_follow_prob)
        except ValueError as exc:
            raise DelrecError(f"{ctx.config.source} section 'data': {exc}") from None
    else:
        from delrec.data.loaders import load_raw

        raw = load_raw(options.format, options.input, pad_id=options.pad_id, title_columns=options.title_columns,
                       move_article=options.move_article)
    dataset = prepare_dataset(raw, section.get(PreprocessConfig), ctx.layout.dataset, overwrite=True)
    return {"dataset": ctx.layout.relative(dataset.path), "fingerprint": dataset.fingerprint,
            "stats": dataset.stats(), "num_candidates": dataset.num_candidates}


def stage_sr(ctx: Context) -> dict:
    from delrec.sr.trainer import TrainConfig, train_sr

    models = {}
    for name, entry in ctx.config.sr_models.items():
        out = ctx.layout.sr_model(name)
        model_type = entry.get(SRModelOptions).model
        if not _done(out):
            model_config = entry.get(_sr_classes(model_type, name)[0])
            train_sr(ctx.layout.dataset, model_config, entry.get(TrainConfig), out)
        models[name] = {"model_type": model_type, "folder": ctx.layout.relative(out)}
    return {"models": models}


def stage_predictions(ctx: Context) -> dict:
    from delrec.data.dataset import PreparedDataset
    from delrec.sr import load_model, write_predictions
    from delrec.device import resolve_device

    options = ctx.config.sections["predictions"].get(PredictionsOptions)
    dataset = PreparedDataset.load(ctx.layout.dataset)
    if options.topk > dataset.num_items:
        raise DelrecError(f"{ctx.config.source} section 'predictions': topk {options.topk} exceeds the catalogue "
                          f"({dataset.num_items} items)")
    folder = ctx.layout.sr_model(options.model)
    model = load_model(folder, resolve_device("auto"))
    files = {}
    for split in SPLITS:
        path = ctx.layout.predictions(split)
        write_predictions(path, model, dataset, split, options.topk, not options.keep_history, options.batch_size,
                          model_path=folder, prefix_predictions=True)
        files[split] = ctx.layout.relative(path)
    return {"model": options.model, "files": files}


def stage_llm(ctx: Context) -> dict:
    from delrec.llm.tiny import BUILD_INFO_FILE, TinyLLMConfig, build_tiny_llm

    model = ctx.config.sections["llm"].get(LLMOptions).model
    if model is not None:
        return {"model": model, "built": False}
    info = build_tiny_llm(ctx.layout.dataset, ctx.layout.tiny_llm, ctx.config.sections["llm"].get(TinyLLMConfig),
                          overwrite=True, progress=False)
    keys = ("arch", "size", "parameters", "vocab_size", "hidden_size", "num_hidden_layers", "pretrain_steps",
            "first_loss", "final_loss", "seconds")
    return {"model": ctx.layout.relative(ctx.layout.tiny_llm), "built": True, "build_info": BUILD_INFO_FILE,
            **{k: info[k] for k in keys if k in info}}


def _train_llm(train: Callable[[], Any], out: Path) -> None:
    """Run a DELRec stage, keep the Trainer's log history (the report's training curves) and drop the model
    before the next one is loaded, so peak memory stays one model."""
    result = train()
    write_jsonl(out / TRAINER_LOG, result.trainer.state.log_history)
    del result
    gc.collect()


def stage_stage1(ctx: Context) -> dict:
    from delrec.llm.stage1 import DistillArguments, distill_pattern
    from delrec.llm.training import TrainingSettings

    section = ctx.config.sections["stage1"]
    out = ctx.layout.stage1
    args = dataclasses.replace(section.get(DistillArguments), data=str(ctx.layout.dataset), out=str(out),
                               train_predictions=str(ctx.layout.predictions("train")),
                               valid_predictions=str(ctx.layout.predictions("valid")))
    if not _done(out):
        _train_llm(lambda: distill_pattern(args, ctx.model_config(), section.get(TrainingSettings)), out)
    return {"folder": ctx.layout.relative(out)}


def stage_stage2(ctx: Context) -> dict:
    from delrec.llm.loading import LoraSettings
    from delrec.llm.stage2 import FinetuneArguments, finetune
    from delrec.llm.training import TrainingSettings

    section = ctx.config.sections["stage2"]
    variants = {}
    for variant in section.get(Stage2Options).variants:
        out = ctx.layout.stage2(variant)
        args = dataclasses.replace(section.get(FinetuneArguments), data=str(ctx.layout.dataset), out=str(out),
                                   soft_prompt=variant,
                                   stage1=str(ctx.layout.stage1) if variant == "stage1" else None)
        if not _done(out):
            _train_llm(lambda: finetune(args, ctx.model_config(), section.get(LoraSettings),
                                        section.get(TrainingSettings)), out)
        variants[variant] = {"folder": ctx.layout.relative(out)}
    return {"variants": variants}


def stage_rank(ctx: Context) -> dict:
    from delrec.ranking.base import ReadoutConfig
    from delrec.ranking.runner import RankArguments, rank

    section = ctx.config.sections["rank"]
    options = section.get(RankOptions)
    runs = {}
    for variant in ctx.config.sections["stage2"].get(Stage2Options).variants:
        for backend, backend_section in ctx.config.rank_backends.items():
            model = ctx.layout.stage2(variant)
            if backend == "vllm":  # vLLM serves the merged export, no delrec code
                from delrec.llm.export import export_model

                if not _done(ctx.layout.export(variant), "delrec.json"):
                    export_model(model, ctx.layout.export(variant), dtype=options.export_dtype, overwrite=True)
                model = ctx.layout.export(variant)
            out = ctx.layout.rank(variant, backend)
            if not _done(out):
                args = dataclasses.replace(section.get(RankArguments), model=str(model), data=str(ctx.layout.dataset),
                                           out=str(out), backend=backend)
                rank(args, section.get(ReadoutConfig), backend_section.values[0])
            runs[f"{variant}/{backend}"] = {"variant": variant, "backend": backend, "folder": ctx.layout.relative(out)}
    return {"runs": runs}


def stage_teacher(ctx: Context) -> dict:
    from delrec.distill.export import TeacherExportConfig, export_teacher
    from delrec.distill.teacher import INFO_FILE

    teachers = {}
    for name, entry in ctx.config.teachers.items():
        given = entry.get(TeacherExportConfig)
        out = ctx.layout.teacher(name)
        if not _done(out, INFO_FILE):
            config = dataclasses.replace(given, model=ctx.resolve(given.model), sr_model=ctx.resolve(given.sr_model),
                                         data=str(ctx.layout.dataset), out=str(out))
            export_teacher(config, entry.values[1])  # the backend's options
            gc.collect()
        info = read_json(out / INFO_FILE)
        teachers[name] = {"model": given.model, "mode": (info.get("source") or {}).get("kind"),
                          "folder": ctx.layout.relative(out)}
    return {"teachers": teachers}


def stage_students(ctx: Context) -> dict:
    from delrec.distill.student import StudentConfig, train_student
    from delrec.sr.trainer import TrainConfig

    section = ctx.config.sections["students"]
    model_type = section.get(StudentsOptions).model
    model_config = section.get(_sr_classes(model_type, "students")[0])
    runs = {}
    for name, entry in ctx.config.student_runs.items():
        student = entry.get(StudentConfig)
        out = ctx.layout.student(name)
        if not _done(out):
            train_student(ctx.layout.dataset, model_config, section.get(TrainConfig),
                          [ctx.layout.teacher(t) for t in student.teacher], student.method,
                          entry.values[1] if len(entry.values) > 1 else None, out,
                          embedding_distillation=student.embedding_distillation, ed_weight=student.ed_weight)
        runs[name] = {"model_type": model_type, "method": student.method, "teachers": list(student.teacher),
                      "embedding_distillation": student.embedding_distillation, "folder": ctx.layout.relative(out)}
    return {"runs": runs}


def stage_latency(ctx: Context) -> dict:
    """Top-K over the whole catalogue for N users: the student timed here (median of repeats, model loaded
    and warmed up first), the LLM teacher by its export (every training instance, model loading excluded)."""
    import torch

    from delrec.data.dataset import PreparedDataset
    from delrec.sr.evaluate import top_k
    from delrec.distill.teacher import INFO_FILE
    from delrec.sr import load_model

    options = ctx.config.sections["latency"].get(LatencyOptions)
    dataset = PreparedDataset.load(ctx.layout.dataset)
    student_name = options.student or next(iter(ctx.config.student_runs))
    model = load_model(ctx.layout.student(student_name), "cpu")
    histories = [inst.history for inst in dataset.instances("test")][: options.users]
    k = min(options.topk, dataset.num_items - max(len(set(h)) for h in histories))
    top_k(model, histories, k, True, len(histories), False)  # warm-up
    timings = []
    for _ in range(options.repeats):
        began = time.perf_counter()
        top_k(model, histories, k, True, len(histories), False)
        timings.append(time.perf_counter() - began)
    seconds = sorted(timings)[len(timings) // 2]
    result = {
        "topk": k,
        "student": {"name": student_name, "users": len(histories), "seconds": seconds,
                    "ms_per_user": 1000 * seconds / len(histories), "device": "cpu",
                    "threads": torch.get_num_threads(), "repeats": options.repeats},
        "llm": None,
    }
    teacher = options.teacher or next((n for n, e in ctx.config.teachers.items()
                                       if e.values[0].model.startswith("stage2/")), None)
    if teacher is not None:
        info = read_json(ctx.layout.teacher(teacher) / INFO_FILE)
        if info.get("seconds"):
            result["llm"] = {"teacher": teacher, "kind": (info.get("source") or {}).get("kind"),
                             "users": info["num_instances"], "seconds": info["seconds"],
                             "ms_per_user": 1000 * info["seconds"] / info["num_instances"],
                             "backend": (info.get("source") or {}).get("backend")}
            result["ratio"] = result["llm"]["ms_per_user"] / result["student"]["ms_per_user"]
    path = ctx.layout.stage("latency") / "latency.json"
    write_json(path, result)
    return {"file": ctx.layout.relative(path)}


def stage_report(ctx: Context) -> dict:
    from delrec.report import write_report

    written = write_report(ctx.layout.run, ctx.config.sections["report"].get(ReportOptions).full_k)
    return {"report": REPORT_FILE, "plots": [ctx.layout.relative(p) for p in written]}


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "data": stage_data, "sr": stage_sr, "predictions": stage_predictions, "llm": stage_llm, "stage1": stage_stage1,
    "stage2": stage_stage2, "rank": stage_rank, "teacher": stage_teacher, "students": stage_students,
    "latency": stage_latency, "report": stage_report,
}


# ----------------------------------------------------------------------------- hashing and the plan


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_path(path: str | Path) -> str:
    """A cheap fingerprint of an outside input (a raw data or model folder): names, sizes and mtimes."""
    path = Path(path)
    if not path.exists():
        return f"missing:{path}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _digest([(str(p.relative_to(path) if p != path else p.name), p.stat().st_size, p.stat().st_mtime_ns)
                    for p in files])


def _outside_inputs(config: PipelineConfig, stage: str) -> dict:
    if stage == "data":
        options = config.sections["data"].get(DataOptions)
        return {"input": fingerprint_path(options.input)} if options.format != "synthetic" else {}
    if stage == "llm":
        model = config.sections["llm"].get(LLMOptions).model
        return {"model": fingerprint_path(model) if model and Path(model).exists() else model}
    return {}


def read_record(layout: Layout, stage: str) -> dict | None:
    path = layout.stage(stage) / STAGE_FILE
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except DelrecError:
        return None  # a damaged record: the stage runs again
    return record if isinstance(record, dict) else None


def identity(record: dict) -> str:
    """What downstream stages see of a finished stage: its hash and when it finished."""
    return f"{record['hash']}@{record['finished']}"


@dataclass
class Step:
    """One line of the plan."""

    stage: str
    action: Literal["run", "resume", "skip"]
    reason: str
    hash: str | None = None  # None: an input runs first, so the hash is known only then
    inputs: dict | None = None
    wipe: bool = False  # empty the stage folder first (a new configuration or a forced re-run)
    forced: str | None = None  # the option that makes it run even when unchanged


def _flatten(obj: Any, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        flat = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): obj}


def _change(stage: str, old: dict, new: dict) -> str:
    """'stage.key: old -> new' for the first differences of two configurations (class names left out)."""
    old, new = _flatten(old), _flatten(new)
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    shown = [f"{'.'.join([stage] + [p for p in k.split('.') if not p[:1].isupper()])}: {old.get(k)!r} -> "
             f"{new.get(k)!r}" for k in keys[:3]]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def decide(config: PipelineConfig, layout: Layout, stage: str, records: dict[str, dict | None],
           running: set[str], forced: str | None = None) -> Step:
    """Run, resume or skip `stage`, and why. `records`: the stage.json of each stage as of now; `running`: stages
    planned to run before this one; `forced`: the option that forces this stage to run."""
    first = max((u for u in INPUTS[stage] if u in running), key=STAGES.index, default=None)
    if first is not None:
        return Step(stage, "run", f"input '{first}' runs first", wipe=True)
    missing = next((u for u in INPUTS[stage] if not records.get(u) or records[u].get("status") != "finished"), None)
    if missing is not None:
        raise DelrecError(f"stage '{stage}' needs stage '{missing}', which has not finished in {layout.run}; "
                          f"run `delrec run CONFIG` without --only/--from first")
    inputs = {u: identity(records[u]) for u in INPUTS[stage]}
    current = config.stage_config(stage)
    content = _digest({"stage": stage, "config": current, "inputs": inputs, "outside": _outside_inputs(config, stage),
                       "delrec": delrec.__version__})
    record = records.get(stage)
    same = record is not None and record.get("hash") == content
    if forced:
        if same and record.get("status") != "finished":
            return Step(stage, "resume", f"{record.get('status')} earlier; resumes ({forced})", content, inputs,
                        forced=forced)
        return Step(stage, "run", f"forced by {forced}", content, inputs, wipe=True, forced=forced)
    if record is None:
        return Step(stage, "run", "not run yet", content, inputs, wipe=True)
    if not same:
        if record.get("config") != json.loads(json.dumps(current, default=str)):
            reason = f"config changed ({_change(stage, record.get('config') or {}, current)})"
        elif record.get("inputs") != inputs:
            changed = [u for u in inputs if (record.get("inputs") or {}).get(u) != inputs[u]]
            reason = f"input {', '.join(repr(u) for u in changed)} changed"
        else:
            reason = "outside input or delrec version changed"
        return Step(stage, "run", reason, content, inputs, wipe=True)
    if record.get("status") != "finished":
        return Step(stage, "resume", f"{record.get('status')} earlier; resumes where it stopped", content, inputs)
    finished = str(record.get("finished"))[:19].replace("T", " ")
    return Step(stage, "skip", f"unchanged (finished {finished} UTC)", content, inputs)


def plan(config: PipelineConfig, run_dir: str | Path, only: str | None = None, start: str | None = None) -> list[Step]:
    """What `run_pipeline` would do now, stage by stage."""
    layout = Layout(Path(run_dir))
    _check_stage_option("--only", only)
    _check_stage_option("--from", start)
    if only and start:
        raise DelrecError("give --only or --from, not both")
    records = {s: read_record(layout, s) for s in STAGES}
    chosen = only or start
    steps, running = [], set()
    for index, stage in enumerate(STAGES):
        before = chosen is not None and index < STAGES.index(chosen)
        if only and index > STAGES.index(only):
            steps.append(Step(stage, "skip", f"not selected (--only {only})"))
            continue
        forced = f"--only {only}" if stage == only else f"--from {start}" if stage == start else None
        step = decide(config, layout, stage, records, running, forced)
        if before and step.action != "skip":
            option = "--only" if only else "--from"
            raise DelrecError(f"cannot {option} {chosen}: stage '{stage}' before it is not up to date ({step.reason}); "
                              f"run without {option}, or with --from {stage}")
        if step.action != "skip":
            running.add(stage)
        steps.append(step)
    return steps


def _check_stage_option(option: str, value: str | None) -> None:
    if value is not None and value not in STAGES:
        raise DelrecError(f"{option} {value}: unknown stage; expected one of: {', '.join(STAGES)}")


def format_plan(steps: list[Step]) -> str:
    width = max(len(s.stage) for s in steps)
    return "\n".join(f"  {s.stage:<{width}}  {s.action:<6}  {s.reason}" for s in steps)


# ----------------------------------------------------------------------------- running


@contextlib.contextmanager
def captured(log: Path | None):
    """Send everything the stage prints (Python, C libraries, progress bars) to `log`; None: leave it alone.

    Redirects file descriptors 1 and 2, so loggers that hold `sys.stderr` are captured too and write to
    the terminal again afterwards."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def check_run_folder(run: Path) -> None:
    """Refuse a run folder that holds anything but an earlier run: stages wipe and rewrite their folders."""
    check_parents_are_folders(run)
    if not is_occupied(run):
        return
    if not run.is_dir():
        raise DelrecError(f"--out {run} is a file; expected a run folder")
    try:
        record = read_json(run / RUN_FILE)
    except DelrecError:
        record = None
    if not (isinstance(record, dict) and "delrec_version" in record and "stages" in record):
        raise DelrecError(f"--out {run} is not empty and is not a delrec run folder (no {RUN_FILE}); its files would "
                          "be replaced: choose a new or empty folder")


def run_pipeline(config: PipelineConfig, run_dir: str | Path, only: str | None = None, start: str | None = None,
                 dry_run: bool = False, verbose: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run the plan (or only print it); return the run summary written to RUN/run.json."""
    import torch

    layout = Layout(Path(run_dir))
    steps = plan(config, layout.run, only, start)
    echo(f"delrec run: {config.source} -> {layout.run}")
    if dry_run:
        echo(format_plan(steps))
        return {"plan": [dataclasses.asdict(s) for s in steps]}
    check_run_folder(layout.run)
    layout.run.mkdir(parents=True, exist_ok=True)
    with atomic_write(layout.run / CONFIG_COPY) as handle:
        handle.write(config.text)
    summary = {"config": str(config.source), "run": str(layout.run), "delrec_version": delrec.__version__,
               "started": _now(), "status": "running", "stages": {}}
    write_json(layout.run / RUN_FILE, summary)
    began = time.perf_counter()
    threads = torch.get_num_threads()
    records = {s: read_record(layout, s) for s in STAGES}
    try:
        for number, planned in enumerate(steps, start=1):
            stage = planned.stage
            prefix = f"[{number:>2}/{len(steps)}] {stage:<11}"
            if planned.action == "skip":
                record = records.get(stage) or {}
                summary["stages"][stage] = {"action": "skip", "reason": planned.reason, "status": record.get("status"),
                                            "seconds": record.get("seconds"), "hash": record.get("hash")}
                echo(f"{prefix} skip    {planned.reason}")
                continue
            # decided again now that its inputs have finished: the hash covers their new identity
            step = decide(config, layout, stage, records, set(), planned.forced)
            log = "" if verbose else f"  (output: {layout.stage(stage) / STAGE_LOG})"
            echo(f"{prefix} {step.action:<7} {planned.reason}{log}")
            if config.run.threads:
                torch.set_num_threads(config.run.threads)
            record = _run_stage(config, layout, step, verbose)
            torch.set_num_threads(threads)
            records[stage] = record
            summary["stages"][stage] = {"action": step.action, "reason": planned.reason, "status": "finished",
                                        "seconds": record["seconds"], "hash": record["hash"]}
            write_json(layout.run / RUN_FILE, summary)
            echo(f"{'':8}{stage} finished in {record['seconds']:.1f} s")
    except BaseException as exc:
        summary.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", finished=_now(),
                       seconds=round(time.perf_counter() - began, 2))
        write_json(layout.run / RUN_FILE, summary)
        raise
    finally:
        torch.set_num_threads(threads)
    summary.update(status="finished", finished=_now(), seconds=round(time.perf_counter() - began, 2))
    if (layout.run / REPORT_FILE).is_file():
        summary["report"] = str(layout.run / REPORT_FILE)
    write_json(layout.run / RUN_FILE, summary)
    return summary


def _run_stage(config: PipelineConfig, layout: Layout, step: Step, verbose: bool) -> dict:
    """Run one stage, keeping its stage.json current: running, then finished / failed / interrupted."""
    folder = layout.stage(step.stage)
    if step.wipe and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": step.stage, "hash": step.hash, "inputs": step.inputs,
              "config": json.loads(json.dumps(config.stage_config(step.stage), default=str)),
              "started": _now(), "finished": None, "seconds": None, "status": "running"}
    write_json(folder / STAGE_FILE, record)
    began = time.perf_counter()
    log = None if verbose else folder / STAGE_LOG
    try:
        with captured(log):
            outputs = RUNNERS[step.stage](Context(config, layout))
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        record.update(status="interrupted" if interrupted else "failed", seconds=round(time.perf_counter() - began, 2),
                      error=None if interrupted else f"{type(exc).__name__}: {exc}")
        write_json(folder / STAGE_FILE, record)
        if isinstance(exc, DelrecError):
            where = "" if log is None else f" (its output: {log})"
            raise DelrecError(f"stage '{step.stage}' failed: {exc}{where}; fix it and re-run: finished stages are "
                              "skipped") from None
        raise
    record.update(status="finished", finished=_now(), seconds=round(time.perf_counter() - began, 2), outputs=outputs)
    write_json(folder / STAGE_FILE, record)
    return record


def builtin_demo_config():
    """The packaged demo config (`delrec/configs/demo.yaml`; `configs/pipeline/demo.yaml` links to it)."""
    from importlib import resources

    return resources.files("delrec") / "configs" / "demo.yaml"


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
