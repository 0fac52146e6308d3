"""The one driver of a DELRec training stage: the sequence every stage runs, in one place.

    runtime -> dataset -> stage checks -> processes -> run folder -> model -> soft prompt (and item tokens)
    -> instances (built on the main process first) -> trainer -> train -> save -> summary -> metrics.json
    and delrec.json

A stage (`delrec.llm.stage1.PatternDistillation`, `delrec.llm.stage2.LoraFinetuning`) is a `TrainingStage` that
supplies what differs: its checks before anything loads (`prepare`), what it adds to the model (`attach`), its
instance sets (`instances`), its trainer (`trainer`), what it measures after training (`after_training`) and what
delrec.json records (`info`). Everything a stage must not get wrong twice - the order (a refused configuration
loads no model; the run folder is checked before anything is written), resume, the finished-run shortcut, writing
from the main process only - is here.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import delrec
from delrec.device import launch_position
from delrec.llm.run_folder import (
    CACHE_DIR, CHECKPOINTS_DIR, RunFolder, StageResult, prepare_run, start_processes, write_metrics,
)
from delrec.llm.trainer import (
    DelrecTrainer, RankCounts, TrainingSettings, best_metric, on_cpu, sft_config, stage_runtime,
    training_model_config, training_precision,
)


class TrainingStage:
    """A DELRec stage run by `run`; subclasses set the class attributes and implement the hooks."""

    name: str  # the stage's name in run.json, delrec.json and metrics.json
    default_learning_rate: float
    default_metric: str  # the valid metric that picks the best checkpoint unless `metric_for_best_model` says

    def __init__(self, args, model_config, settings: TrainingSettings, *option_groups):
        self.args = args
        self.model_config = model_config
        self.settings = settings
        self.option_groups = option_groups  # further option dataclasses recorded in run.json (stage 2: LoRA)
        self.out = Path(args.out)

    # --- the hooks ---------------------------------------------------------------------------------------

    def summarize(self, counts: dict[str, RankCounts]) -> dict[str, float]:
        """The stage's named valid metrics from the evaluator's per-task rank counts."""
        raise NotImplementedError

    def tasks(self) -> list[str]:
        """The tasks the stage's valid instances hold (what `summarize` is asked about)."""
        raise NotImplementedError

    def prepare(self, dataset) -> None:
        """Read and check everything the stage needs beyond the dataset (templates, predictions, an earlier stage's
        folder) before a process group starts or a model loads: a wrong input costs a second, not a model load."""

    def attach(self, model, tokenizer) -> None:
        """Add what the stage trains or reads to the loaded base model (a soft prompt, item tokens)."""

    def instances(self, dataset, tokenizer, model) -> dict[str, Any]:
        """The stage's instance sets by name (`delrec.llm.instances.InstanceSet`), cached in OUT/cache."""
        raise NotImplementedError

    def trainer(self, model, tokenizer, sets: dict[str, Any], config, run: RunFolder) -> DelrecTrainer:
        """The stage's trainer on `config` (the SFTConfig every stage shares)."""
        raise NotImplementedError

    def sft_overrides(self) -> dict[str, Any]:
        """SFTConfig options the stage sets itself."""
        return {}

    def after_training(self, trainer: DelrecTrainer, sets: dict[str, Any]) -> dict[str, Any]:
        """What the stage measures with the trained model before it is saved (stage 2: the test split)."""
        return {}

    def info(self, sets: dict[str, Any]) -> dict[str, Any]:
        """The stage's entries of delrec.json, beside its stage, version, base model and dataset."""
        raise NotImplementedError

    # --- the driver --------------------------------------------------------------------------------------

    def run(self) -> StageResult:
        """Run the stage: the summary (printed by the command, written to metrics.json) and the trainer."""
        with stage_runtime(self.settings):
            return self._run()

    def _run(self) -> StageResult:
        from accelerate import PartialState

        from delrec.data.dataset import PreparedDataset
        from delrec.llm.loading import load_model
        from delrec.llm.stage_folder import local_or_hub, write_info

        started = time.perf_counter()
        self.metric = best_metric(self.settings, self.summarize, self.tasks(), self.default_metric)
        dataset = self.dataset = PreparedDataset.load(self.args.data)
        self.prepare(dataset)
        start_processes(self.model_config.device)
        run = prepare_run(self.out, self.name, self.run_config(), self.settings.resume)
        if run.finished is not None:
            return run.finished

        self.precision = training_precision(self.settings, self.model_config.device)
        model, tokenizer = load_model(training_model_config(self.model_config, self.precision))
        self.attach(model, tokenizer)
        with PartialState().main_process_first():
            sets = self.instances(dataset, tokenizer, model)
        config = sft_config(self.settings, self.out / CHECKPOINTS_DIR, on_cpu(model), self.precision,
                            learning_rate=self.default_learning_rate, metric_for_best_model=self.metric,
                            resuming=run.resume_from is not None, **self.sft_overrides())
        trainer = self.trainer(model, tokenizer, sets, config, run)
        train_started = time.perf_counter()
        trainer.train(resume_from_checkpoint=run.resume_from)
        train_seconds = time.perf_counter() - train_started
        measured = self.after_training(trainer, sets)
        trainer.save_model(str(self.out))  # the best checkpoint's weights, loaded at the end of training

        summary = {
            "protocol": "candidates",
            "stage": self.name,
            "valid": trainer.logged_metrics(),  # of the best checkpoint, loaded at the end of training
            **measured,
            "valid_before_training": trainer.logged_metrics(step=0),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "global_step": trainer.state.global_step,
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
            "instances": {name: [s.stats for s in value] if isinstance(value, list) else value.stats
                          for name, value in sets.items()},
        }
        if launch_position().main:
            write_metrics(self.out, summary)
            write_info(self.out, {
                "stage": self.name,
                "delrec_version": delrec.__version__,
                "base_model": self.model_description(),
                **self.info(sets),
                "dataset": {"path": local_or_hub(str(dataset.path)), "fingerprint": dataset.fingerprint},
            })
        run.finish()
        return StageResult({"out": str(self.out), **summary}, trainer)

    # --- shared pieces -----------------------------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        return self.out / CACHE_DIR

    def run_config(self) -> dict[str, Any]:
        """The options of the run as one flat dict (run.json; the run identity hashes it)."""
        merged: dict[str, Any] = {}
        for config in (self.args, self.model_config, *self.option_groups, self.settings):
            merged.update(dataclasses.asdict(config))
        return merged

    def model_description(self) -> dict[str, Any]:
        """How to load the base model again (delrec.json's base_model), with its content fingerprint."""
        from delrec.llm.stage_folder import local_or_hub, model_fingerprint

        config = self.model_config
        return {
            "model_name_or_path": local_or_hub(config.model_name_or_path),
            "fingerprint": model_fingerprint(config.model_name_or_path),
            "load_in_4bit": config.load_in_4bit,
            "load_in_8bit": config.load_in_8bit,
            "trust_remote_code": config.trust_remote_code,
        }
