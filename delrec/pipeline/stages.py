"""What each stage runs; each calls the library behind one command and writes RUN/<stage>/:

    data         prepare the dataset                                    delrec data prepare
    sr           train the SR models (popularity, SASRec, ...)          delrec sr train
    predictions  one SR model's top-K for train/valid/test, with the    delrec sr predict --prefix_predictions
                 prefix predictions Temporal Analysis needs
    llm          build and pre-train the tiny LLM, import a packaged     delrec llm build-tiny /
                 model (gemma-3-270m), or take a hub id / local model    delrec llm import
                 as it is
    stage1       DELRec stage 1: the soft prompt (TA + RPS)             delrec llm distill-pattern
    stage2       DELRec stage 2: LoRA, one run per variant (stage1:     delrec llm finetune
                 the distilled soft prompt; none: the plain-template
                 ablation; random: an untrained soft prompt)
    rank         rank the test candidates, per variant and backend      delrec rank (+ delrec export for vllm)
    teacher      teacher folders from the LLM and/or SR models          delrec teacher export
    students     students alone and distilled                           delrec student train
    latency      top-K for N users: student vs the LLM teacher
    report       RUN/report.md and its plots                            delrec.pipeline.report

A stage returns its outputs (recorded in its stage.json). Parts of a stage that finished (one SR
model of several, one stage-2 variant) are not redone when an interrupted stage resumes.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from delrec.errors import DelrecError
from delrec.io import read_json, write_json, write_jsonl
from delrec.pipeline.latency import add_teacher_latency, student_latency
from delrec.pipeline.layout import REPORT_FILE, SPLITS, TRAINER_LOG, Layout
from delrec.pipeline.options import (DataOptions, LatencyOptions, LLMOptions, PredictionsOptions, RankOptions,
                                     ReportOptions, SRModelOptions, Stage2Options, StudentsOptions)
from delrec.pipeline.schema import PipelineConfig, item_tokens_reference, sr_classes


@dataclass
class Context:
    """What a stage function gets: the config, and where each stage of the run folder keeps its files."""

    config: PipelineConfig
    layout: Layout

    def model_path(self) -> str:
        """The LLM every LLM stage starts from: the configured one, or the one built or imported here."""
        model = self.config.sections["llm"].get(LLMOptions).model
        return str(self.layout.llm_model) if model is None or _packaged(model) else model

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
            model_config = entry.get(sr_classes(model_type, name)[0])
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
    folder = ctx.layout.llm_model
    if model is not None and _packaged(model):
        from delrec.llm.gguf_import import IMPORT_FILE, import_model

        info = import_model(model, folder, overwrite=True)
        return {"model": ctx.layout.relative(folder), "built": False, "imported": model, "import_info": IMPORT_FILE,
                "sha256": info["sha256"], "parameters": info["parameters"]}
    if model is not None:
        return {"model": model, "built": False}
    info = build_tiny_llm(ctx.layout.dataset, folder, ctx.config.sections["llm"].get(TinyLLMConfig),
                          overwrite=True, progress=False)
    keys = ("arch", "size", "parameters", "vocab_size", "hidden_size", "num_hidden_layers", "pretrain_steps",
            "first_loss", "final_loss", "seconds")
    return {"model": ctx.layout.relative(folder), "built": True, "build_info": BUILD_INFO_FILE,
            **{k: info[k] for k in keys if k in info}}


def _packaged(model: str) -> bool:
    """Whether `model` names a model shipped as registry packages, which the llm stage imports (not a path)."""
    from delrec.llm.gguf_import import PACKAGED_MODELS

    return model in PACKAGED_MODELS and not Path(model).exists()


def _train_llm(train: Callable[[], Any], out: Path) -> None:
    """Run a DELRec stage, keep the Trainer's log history (the report's training curves) and drop the model
    before the next one is loaded, so peak memory stays one model."""
    result = train()
    write_jsonl(out / TRAINER_LOG, result.trainer.state.log_history)
    del result
    gc.collect()


def stage_stage1(ctx: Context) -> dict:
    from delrec.llm.stage1 import DistillArguments, distill_pattern
    from delrec.llm.trainer import TrainingSettings

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
    from delrec.llm.trainer import TrainingSettings

    section = ctx.config.sections["stage2"]
    variants = {}
    for variant in section.get(Stage2Options).variants:
        out = ctx.layout.stage2(variant)
        args = dataclasses.replace(section.get(FinetuneArguments), data=str(ctx.layout.dataset), out=str(out),
                                   soft_prompt=variant,
                                   stage1=str(ctx.layout.stage1) if variant == "stage1" else None)
        if item_tokens_reference(ctx.config):
            args = dataclasses.replace(args, item_tokens=ctx.resolve(args.item_tokens))
        if not _done(out):
            _train_llm(lambda: finetune(args, ctx.model_config(), section.get(LoraSettings),
                                        section.get(TrainingSettings)), out)
        variants[variant] = {"folder": ctx.layout.relative(out)}
    return {"variants": variants}


def stage_rank(ctx: Context) -> dict:
    from delrec.ranking.base import ReadoutConfig, backend_module
    from delrec.ranking.runner import RankArguments, rank

    section = ctx.config.sections["rank"]
    options = section.get(RankOptions)
    runs = {}
    for variant in ctx.config.sections["stage2"].get(Stage2Options).variants:
        for backend, backend_section in ctx.config.rank_backends.items():
            model = ctx.layout.stage2(variant)
            if backend == "vllm":  # vLLM serves the merged export, no delrec code
                from delrec.llm.merge import export_model

                if not _done(ctx.layout.export(variant), "delrec.json"):
                    export_model(model, ctx.layout.export(variant), dtype=options.export_dtype, overwrite=True)
                model = ctx.layout.export(variant)
            out = ctx.layout.rank(variant, backend)
            if not _done(out):
                args = dataclasses.replace(section.get(RankArguments), model=str(model), data=str(ctx.layout.dataset),
                                           out=str(out), backend=backend)
                rank(args, section.get(ReadoutConfig), backend_section.get(backend_module(backend).Options))
            runs[f"{variant}/{backend}"] = {"variant": variant, "backend": backend, "folder": ctx.layout.relative(out)}
    return {"runs": runs}


def stage_teacher(ctx: Context) -> dict:
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
    from delrec.distill.teacher_folder import INFO_FILE
    from delrec.ranking.base import backend_module

    teachers = {}
    for name, entry in ctx.config.teachers.items():
        given = entry.get(TeacherExportConfig)
        out = ctx.layout.teacher(name)
        if not _done(out, INFO_FILE):
            config = dataclasses.replace(given, model=ctx.resolve(given.model), sr_model=ctx.resolve(given.sr_model),
                                         data=str(ctx.layout.dataset), out=str(out))
            export_teacher(config, entry.get(backend_module(given.backend).Options))
            gc.collect()
        info = read_json(out / INFO_FILE)
        teachers[name] = {"model": given.model, "mode": (info.get("source") or {}).get("kind"),
                          "folder": ctx.layout.relative(out)}
    return {"teachers": teachers}


def stage_students(ctx: Context) -> dict:
    from delrec.distill.student import StudentConfig, method_config_class, train_student
    from delrec.sr.trainer import TrainConfig

    section = ctx.config.sections["students"]
    model_type = section.get(StudentsOptions).model
    model_config = section.get(sr_classes(model_type, "students")[0])
    runs = {}
    for name, entry in ctx.config.student_runs.items():
        student = entry.get(StudentConfig)
        out = ctx.layout.student(name)
        if not _done(out):
            method_class = method_config_class(student.method)
            train_student(ctx.layout.dataset, model_config, section.get(TrainConfig),
                          [ctx.layout.teacher(t) for t in student.teacher], student.method,
                          entry.get(method_class) if method_class else None, out,
                          embedding_distillation=student.embedding_distillation, ed_weight=student.ed_weight,
                          weight_search=student.weight_search)
        search = read_json(out / "metrics.json")["distillation"].get("weight_search")
        runs[name] = {"model_type": model_type, "method": student.method, "teachers": list(student.teacher),
                      "embedding_distillation": student.embedding_distillation, "folder": ctx.layout.relative(out),
                      **({"weight_search": search} if search else {})}
    return {"runs": runs}


def stage_latency(ctx: Context) -> dict:
    """Top-K over the whole catalogue for N users: the student vs the LLM teacher (`delrec.pipeline.latency`)."""
    from delrec.data.dataset import PreparedDataset
    from delrec.distill.teacher_export import TeacherExportConfig
    from delrec.distill.teacher_folder import INFO_FILE
    from delrec.sr import load_model

    options = ctx.config.sections["latency"].get(LatencyOptions)
    dataset = PreparedDataset.load(ctx.layout.dataset)
    student_name = options.student or next(iter(ctx.config.student_runs))
    model = load_model(ctx.layout.student(student_name), "cpu")
    histories = [inst.history for inst in dataset.instances("test")][: options.users]
    result = student_latency(model, histories, dataset.num_items, options.topk, options.repeats, student_name)
    teacher = options.teacher or next((n for n, e in ctx.config.teachers.items()
                                       if e.get(TeacherExportConfig).model.startswith("stage2/")), None)
    if teacher is not None:
        add_teacher_latency(result, teacher, read_json(ctx.layout.teacher(teacher) / INFO_FILE))
    path = ctx.layout.stage("latency") / "latency.json"
    write_json(path, result)
    return {"file": ctx.layout.relative(path)}


def stage_report(ctx: Context) -> dict:
    from delrec.pipeline.report import write_report

    written = write_report(ctx.layout.run, ctx.config.sections["report"].get(ReportOptions).full_k)
    return {"report": REPORT_FILE, "plots": [ctx.layout.relative(p) for p in written]}


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "data": stage_data, "sr": stage_sr, "predictions": stage_predictions, "llm": stage_llm, "stage1": stage_stage1,
    "stage2": stage_stage2, "rank": stage_rank, "teacher": stage_teacher, "students": stage_students,
    "latency": stage_latency, "report": stage_report,
}
