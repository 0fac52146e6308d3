"""A pipeline config: YAML file -> `PipelineConfig`, every key checked before anything runs.

The YAML has one section per stage (all optional, with defaults) plus `out` and `threads`. A
section takes the same keys as the `--config` file of the command it runs, except the paths the
pipeline wires itself (data, out, predictions, model folders); `delrec run --help` lists them, and
delrec/configs/demo.yaml (the `delrec demo` config) shows each. Unknown keys and bad values are
refused before anything runs, naming the file, section and key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delrec.config import build_parser, coerce_config, excerpt, load_yaml, option_actions, unknown_key_error
from delrec.errors import DelrecError
from delrec.pipeline.layout import STAGES
from delrec.pipeline.options import (DataOptions, LatencyOptions, LLMOptions, PredictionsOptions, RankOptions,
                                     ReportOptions, RunOptions, SRModelOptions, Stage2Options, StudentsOptions)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WIRED = "<set by the pipeline>"
NO_PROGRESS = {"progress": False}
DEFAULT_SR_MODELS = {"pop": {"model": "pop"}, "sasrec": {"model": "sasrec"}}
DEFAULT_TEACHERS = {"llm": {"model": "stage2/stage1", "mode": "grounding"}}
DEFAULT_STUDENT_RUNS = {"alone": {"method": "none"}, "dllm2rec": {"method": "dllm2rec", "teacher": ["llm"]}}


@dataclass
class Section:
    """One parsed section (or entry of one): an instance of each config class, validated like a `--config` file.

    `wired` names the fields the pipeline fills in at run time (paths); they are left out of `describe`.
    """

    values: tuple
    wired: frozenset[str] = frozenset()

    def get(self, cls: type):
        """The instance of `cls`: read by class, not position, since the classes of a section vary (a backend's
        or a distillation method's options)."""
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
        raise DelrecError(f"{source}: expected a mapping, got {type(data).__name__} {excerpt(data)}")
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


def sr_classes(name: str, source: str) -> tuple[type, type]:
    """The config class and the model class of SR model type `name`."""
    from delrec.sr import MODELS

    if name not in MODELS:
        raise DelrecError(f"{source}: unknown model {excerpt(name)}; expected one of {', '.join(MODELS)}")
    return MODELS[name].config_class, MODELS[name]


@dataclass
class _Source:
    """The YAML mapping being read, and how its errors name a section."""

    path: Path
    data: dict

    def where(self, *keys) -> str:
        return f"{self.path} section '{'.'.join(str(k) for k in keys)}'"

    def section(self, name: str) -> dict:
        return _mapping(self.data.get(name), self.where(name))


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline config: every key of every section, and every cross-reference."""
    path = Path(path)
    source = _Source(path, load_yaml(path))
    text = path.read_text(encoding="utf-8")
    run = _run_options(source)
    sections = {"data": _data_section(source)}
    sr_models = _sr_models(source)
    sections["predictions"] = _predictions_section(source, sr_models)
    sections.update(_llm_sections(source))
    _check_item_tokens(sections["stage2"], source.where("stage2"), sr_models)
    sections["rank"], rank_backends = _rank_sections(source)
    teachers = _teachers(source, sr_models, sections["stage2"].get(Stage2Options).variants)
    sections["students"], student_runs = _students(source, teachers)
    sections["latency"] = _latency_section(source, student_runs, teachers)
    sections["report"] = parse_options([ReportOptions], source.section("report"), source.where("report"))
    return PipelineConfig(path, text, run, sections, sr_models, rank_backends, teachers, student_runs)


def _run_options(source: _Source) -> RunOptions:
    """The top-level keys; any other key must name a stage."""
    top = {f.name for f in dataclasses.fields(RunOptions)}
    for key in source.data:
        if key not in top and key not in STAGES:
            raise unknown_key_error(str(source.path), str(key), sorted(top | set(STAGES)))
    given = {k: v for k, v in source.data.items() if k in top}
    return parse_options([RunOptions], given, str(source.path)).get(RunOptions)


def _data_section(source: _Source) -> Section:
    from delrec.data.preprocess import PreprocessConfig

    section = parse_options([DataOptions, PreprocessConfig], source.section("data"), source.where("data"))
    options = section.get(DataOptions)
    if options.format != "synthetic" and not options.input:
        raise DelrecError(f"{source.where('data')}: format '{options.format}' needs 'input' (the raw data folder)")
    return section


def _sr_models(source: _Source) -> dict[str, Section]:
    """Section `sr`: each entry validated as `delrec sr train` of its model type."""
    from delrec.sr.trainer import TrainConfig

    models = {}
    for name, entry in _named(source.data.get("sr"), source.where("sr"), DEFAULT_SR_MODELS).items():
        where = source.where("sr", name)
        model_config, _ = sr_classes(str(entry.get("model", SRModelOptions.model)), where)
        models[name] = parse_options([SRModelOptions, TrainConfig, model_config], entry, where, defaults=NO_PROGRESS)
    return models


def _predictions_section(source: _Source, sr_models: dict[str, Section]) -> Section:
    where = source.where("predictions")
    section = parse_options([PredictionsOptions], source.section("predictions"), where)
    model = section.get(PredictionsOptions).model
    trainable = [n for n, e in sr_models.items() if sr_classes(e.get(SRModelOptions).model, "")[1].trainable]
    if model not in trainable:
        raise DelrecError(f"{where}: model '{model}' is not a trainable model of section 'sr'; "
                          f"expected one of: {', '.join(trainable) or 'none (add a sasrec, gru4rec or caser model)'}")
    return section


def _llm_sections(source: _Source) -> dict[str, Section]:
    """Sections `llm`, `stage1` and `stage2`: the LLM and the two DELRec stages that train it."""
    from delrec.llm.loading import LoraSettings, ModelConfig
    from delrec.llm.stage1 import DistillArguments
    from delrec.llm.stage2 import FinetuneArguments
    from delrec.llm.tiny import TinyLLMConfig
    from delrec.llm.trainer import TrainingSettings

    return {
        "llm": parse_options([LLMOptions, TinyLLMConfig, ModelConfig], source.section("llm"), source.where("llm"),
                             wired={"model_name_or_path": WIRED}),
        "stage1": parse_options(
            [DistillArguments, TrainingSettings], source.section("stage1"), source.where("stage1"),
            defaults=NO_PROGRESS, wired={"data": WIRED, "train_predictions": WIRED, "valid_predictions": WIRED,
                                         "out": WIRED}),
        "stage2": parse_options(
            [Stage2Options, FinetuneArguments, LoraSettings, TrainingSettings], source.section("stage2"),
            source.where("stage2"), defaults=NO_PROGRESS,
            wired={"data": WIRED, "out": WIRED, "stage1": None, "soft_prompt": "stage1"}),
    }


def item_tokens_reference(config: PipelineConfig) -> str | None:
    """NAME when stage 2 shows items as the item tokens of the pipeline's SR model `sr/NAME` (resolved in the run
    folder); None without item tokens or with an SR model folder outside the run (an outside input)."""
    from delrec.llm.stage2 import FinetuneArguments

    stage, _, name = str(config.sections["stage2"].get(FinetuneArguments).item_tokens).partition("/")
    return name if stage == "sr" and name in config.sr_models else None


def _check_item_tokens(section: Section, where: str, sr_models: dict[str, Section]) -> None:
    from delrec.llm.stage2 import FinetuneArguments

    value = section.get(FinetuneArguments).item_tokens
    stage, _, name = str(value).partition("/")
    if value is None or stage != "sr":
        return
    trainable = [n for n, e in sr_models.items() if sr_classes(e.get(SRModelOptions).model, "")[1].trainable]
    if name not in trainable:
        raise DelrecError(f"{where}: key 'item_tokens' is {excerpt(value)}, but item tokens need a trained SR "
                          "model's item embeddings; expected one of: "
                          f"{', '.join(f'sr/{n}' for n in trainable) or 'none'}, or an SR model folder")


def _rank_sections(source: _Source) -> tuple[Section, dict[str, Section]]:
    """Section `rank`, and the options (`hf:`, `vllm:`) of each backend it lists."""
    from delrec.ranking.base import ReadoutConfig, backend_module
    from delrec.ranking.runner import RankArguments

    rank = source.section("rank")
    backend_keys = {k: rank.pop(k) for k in ("hf", "vllm") if k in rank}
    section = parse_options([RankOptions, RankArguments, ReadoutConfig], rank, source.where("rank"),
                            defaults=NO_PROGRESS, wired={"model": WIRED, "data": WIRED, "out": WIRED, "backend": "hf"})
    backends = {}
    for backend in section.get(RankOptions).backends:
        where = source.where("rank", backend)
        backends[backend] = parse_options([backend_module(backend).Options],
                                          _mapping(backend_keys.pop(backend, None), where), where)
    unlisted = next(iter(backend_keys), None)
    if unlisted is not None:
        raise DelrecError(f"{source.where('rank', unlisted)}: options for backend '{unlisted}', which 'backends' "
                          "does not list")
    return section, backends


def _teachers(source: _Source, sr_models: dict[str, Section], variants: list[str]) -> dict[str, Section]:
    entries = _named(source.data.get("teacher"), source.where("teacher"), DEFAULT_TEACHERS)
    return {name: _teacher(entry, source.where("teacher", name), sr_models, variants)
            for name, entry in entries.items()}


def _teacher(entry: dict, where: str, sr_models: dict[str, Section], variants: list[str]) -> Section:
    """One entry of section `teacher`: `delrec teacher export` keys plus its backend's options."""
    from delrec.distill.teacher_export import TeacherExportConfig
    from delrec.ranking.base import BACKENDS, backend_module

    backend = str(entry.get("backend", "hf"))
    if backend not in BACKENDS:
        raise DelrecError(f"{where}: key 'backend' must be one of {', '.join(BACKENDS)}, got {excerpt(backend)}")
    teacher = parse_options([TeacherExportConfig, backend_module(backend).Options], entry, where,
                            defaults=NO_PROGRESS, wired={"data": WIRED, "out": WIRED})
    export = teacher.get(TeacherExportConfig)
    for key in ("model", "sr_model"):
        _check_reference(getattr(export, key), where, key, sr_models, variants)
    return teacher


def _check_reference(value: str | None, source: str, key: str, sr_models: dict, variants: list[str]) -> None:
    """A teacher's `model` names `sr/NAME` (an entry of section `sr`) or `stage2/VARIANT` (a trained stage-2
    variant); its `sr_model` (rerank) an `sr/NAME` or nothing."""
    if value is None and key == "sr_model":
        return
    stage, _, name = str(value).partition("/")
    if (stage == "sr" and name in sr_models) or (stage == "stage2" and name in variants and key == "model"):
        return
    choices = [f"sr/{n}" for n in sr_models] + ([f"stage2/{v}" for v in variants] if key == "model" else [])
    raise DelrecError(f"{source}: key '{key}' is {excerpt(value)}; expected one of: {', '.join(choices)}")



def _students(source: _Source, teachers: dict[str, Section]) -> tuple[Section, dict[str, Section]]:
    """Section `students` (the student model and training every run shares) and its `runs`."""
    from delrec.sr.trainer import TrainConfig

    where = source.where("students")
    students = source.section("students")
    runs = students.pop("runs", None)
    model = str(students.get("model", StudentsOptions.model))
    model_config, model_cls = sr_classes(model, where)
    if not model_cls.trainable:
        raise DelrecError(f"{where}: a student must be a trainable model (sasrec, gru4rec, caser), got '{model}'")
    section = parse_options([StudentsOptions, TrainConfig, model_config], students, where, defaults=NO_PROGRESS)
    entries = _named(runs, source.where("students", "runs"), DEFAULT_STUDENT_RUNS)
    return section, {name: _student_run(entry, source.where("students", "runs", name), teachers)
                     for name, entry in entries.items()}


def _student_run(entry: dict, where: str, teachers: dict[str, Section]) -> Section:
    """One entry of `students.runs`: a method, with the teachers it distils (and only if it distils one)."""
    from delrec.distill.student import StudentConfig, method_config_class

    method = str(entry.get("method", StudentConfig.method))
    method_class = method_config_class(method)
    run = parse_options([StudentConfig] + ([method_class] if method_class else []), entry, where)
    student = run.get(StudentConfig)
    for teacher in student.teacher:
        if teacher not in teachers:
            raise DelrecError(f"{where}: teacher '{teacher}' is not an entry of section 'teacher' "
                              f"({', '.join(teachers)})")
    uses_teacher = method_class is not None or student.embedding_distillation
    if uses_teacher != bool(student.teacher):
        raise DelrecError(f"{where}: method '{method}'"
                          + (" distils a teacher: add teacher: [NAME]" if uses_teacher else
                             " trains the student alone: remove 'teacher' (or set embedding_distillation)"))
    return run


def _latency_section(source: _Source, student_runs: dict[str, Section], teachers: dict[str, Section]) -> Section:
    """Section `latency`: its student must be a `students.runs` entry, its teacher an LLM one."""
    from delrec.distill.teacher_export import TeacherExportConfig

    where = source.where("latency")
    section = parse_options([LatencyOptions], source.section("latency"), where)
    latency = section.get(LatencyOptions)
    if latency.student is not None and latency.student not in student_runs:
        raise DelrecError(f"{where}: student '{latency.student}' is not an entry of students.runs "
                          f"({', '.join(student_runs)})")
    llm_teachers = [n for n, e in teachers.items() if e.get(TeacherExportConfig).model.startswith("stage2/")]
    if latency.teacher is not None and latency.teacher not in llm_teachers:
        expected = ", ".join(llm_teachers) or "none (add one with model: stage2/VARIANT)"
        raise DelrecError(f"{where}: teacher '{latency.teacher}' is not an LLM teacher of section "
                          f"'teacher'; expected one of: {expected}")
    return section


DEMO_CONFIGS = {"tiny": "demo.yaml", "gemma-3-270m": "demo-gemma-3-270m.yaml"}


def builtin_demo_config(llm: str = "tiny"):
    """The packaged demo config for `llm` (`delrec/configs/`; `configs/pipeline/demo*.yaml` link to them)."""
    from importlib import resources

    if llm not in DEMO_CONFIGS:
        raise DelrecError(f"no built-in demo for LLM '{llm}'; expected one of: {', '.join(DEMO_CONFIGS)}")
    return resources.files("delrec") / "configs" / DEMO_CONFIGS[llm]
