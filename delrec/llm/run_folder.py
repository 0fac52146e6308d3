"""A DELRec stage's output folder as a run: what it was started with, where it resumes, when it is done.

An output folder remembers the configuration it was started with (OUT/run.json); re-running the same command
resumes from its last checkpoint, a different configuration is refused, and so is a checkpoint another run wrote
(each checkpoint holds its run's identity, `run_identity`). A finished run asked again has nothing to do and says so;
one stopped after its last checkpoint finishes without training a step more (`DelrecTrainer.train`).
`start_processes` comes first, so that every process of a CPU launch knows its rank from the start.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from delrec.device import launch_position
from delrec.errors import DelrecError
from delrec.io import check_parents_are_folders, is_occupied, read_json, write_json
from delrec.llm.files import RUN_FILE, damaged_file

CHECKPOINTS_DIR = "checkpoints"
CACHE_DIR = "cache"
RUN_IDENTITY_FILE = "delrec_run.json"  # in each checkpoint: the run that wrote it (`run_identity`)
METRICS_FILE = "metrics.json"
# Options that may change when a run is resumed: they do not change what is learned per step.
RUNTIME_OPTIONS = frozenset({
    "num_train_epochs", "max_steps", "logging_steps", "eval_steps", "save_total_limit", "eval_batch_size",
    "num_threads", "progress", "resume", "dataloader_num_workers", "eval_max_instances", "test_max_instances",
    "device", "torch_compile",
})
# Options that change how a run runs, not what it yields: a finished run asked again with other values of these (and
# of nothing else) has nothing left to do.
INCIDENTAL_OPTIONS = frozenset({"progress", "num_threads", "dataloader_num_workers", "resume", "torch_compile"})
# Options renamed since a run could have recorded them (old name: new name): a recorded configuration is read under
# today's names, so that runs started before the rename resume.
RENAMED_OPTIONS = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


@dataclass
class StageResult:
    """What a stage returns: the printed summary (also in metrics.json) and the trainer holding the trained model
    (None when the run had already finished: nothing was loaded)."""

    summary: dict[str, Any]
    trainer: Any  # the stage's DelrecTrainer, or None


@dataclass
class RunFolder:
    """What `prepare_run` found in OUT: the checkpoint to resume from, the run's identity (`run_identity`, written
    into each checkpoint) and, when this same run already finished there, its result: nothing is left to do."""

    out: Path
    record: dict[str, Any]  # OUT/run.json: the stage and its configuration
    resume_from: str | None
    identity: dict[str, Any]
    finished: StageResult | None = None

    def finish(self) -> None:
        """Mark the run finished (OUT/run.json), once its outputs are written: the same command then does nothing."""
        if launch_position().main:
            write_json(self.out / RUN_FILE, {**self.record, "finished": True})


# --- processes, output folder, resume --------------------------------------------------------------


def start_processes(device: str) -> None:
    """Set up accelerate's process state for a run on `device`, before anything asks who the main process is.

    `accelerate launch` starts several CPU processes through torchrun (accelerate_configs/cpu-2proc.yaml; its
    own CPU launcher needs MPI). Asked without `cpu=True`, accelerate finds no GPU and each of them believes it
    is the only, main process until the Trainer sets the state up again: they wrote run.json, the cache and
    the soft prompt at the same time. With `cpu=True` they join one gloo group from the start.
    """
    from accelerate import PartialState

    PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def end_processes() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down at exit can abort a
    process ("terminate called without an active exception") after its work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def prepare_run(out: Path, stage: str, config: dict[str, Any], resume: bool) -> RunFolder:
    """Record the run's configuration in OUT/run.json; say where to resume from, if anywhere.

    A folder holding the work of a run started with another configuration (a checkpoint, or the
    finished outputs) is refused, naming the first option that differs: the checkpoints would mix
    two runs; `RUNTIME_OPTIONS` may change. So is a checkpoint another run wrote (copied in: its
    `run_identity` differs). The record of an attempt that failed before its first checkpoint (a bad
    option, a model that did not load) is replaced, so the corrected command runs. A run that
    finished with this same configuration (`INCIDENTAL_OPTIONS` aside) is not run again: its result
    is returned and the command says so, as `delrec sr train` does not train a finished run further.
    Any other existing file or folder is refused rather than written into.
    """
    main = launch_position().main  # the one process that writes here (others could see it mid-write)
    check_parents_are_folders(out)
    run_file = out / RUN_FILE
    if main and is_occupied(out) and not run_file.is_file():
        raise DelrecError(f"{out} already exists and is not a {stage} run folder (no {RUN_FILE}); choose another out "
                          "(a new or empty folder)")
    last = last_complete_checkpoint(out / CHECKPOINTS_DIR)
    identity = run_identity(stage, config)
    record = {"stage": stage, "config": config}
    previous = None
    if run_file.is_file() and (last is not None or (out / METRICS_FILE).is_file()):
        previous = read_json(run_file)
        previous["config"] = current_names(previous.get("config", {}))
        if previous.get("stage") != stage:
            raise DelrecError(f"{out} holds a {previous.get('stage')} run, not a {stage} run; choose another out")
        difference = first_difference(previous.get("config", {}), config, RUNTIME_OPTIONS)
        if difference:
            raise DelrecError(f"{out} was started with {difference}; cannot resume a run with another "
                              f"configuration: choose another out, or delete {out} to start again")
    if resume and last is not None:
        check_resumable(Path(last), identity)
    if (resume and previous is not None and previous.get("finished") is True and (out / METRICS_FILE).is_file()
            and not first_difference(previous.get("config", {}), config, INCIDENTAL_OPTIONS)):
        return RunFolder(out, record, last, identity, finished=_finished_run(out, stage))
    out.mkdir(parents=True, exist_ok=True)
    if main:
        write_json(run_file, record)
    return RunFolder(out, record, last if resume else None, identity)


def run_identity(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """Which run wrote a checkpoint: the stage and the options that must match to resume it (all but
    `RUNTIME_OPTIONS`, and the output folder: a checkpoint means the same wherever it lies), with their SHA-256, the
    one thing compared."""
    resumable = {key: value for key, value in config.items() if key not in RUNTIME_OPTIONS and key != "out"}
    text = json.dumps({"stage": stage, "config": resumable}, sort_keys=True, default=str)
    return {"stage": stage, "sha256": hashlib.sha256(text.encode()).hexdigest(), "config": resumable}


def current_names(config):
    """A recorded configuration under today's option names (`RENAMED_OPTIONS`); anything but a mapping unchanged."""
    if not isinstance(config, dict):
        return config
    return {RENAMED_OPTIONS.get(key, key): value for key, value in config.items()}


def first_difference(old: dict[str, Any], new: dict[str, Any], ignored: frozenset[str]) -> str | None:
    """The first option (by name) whose value differs between two configurations, as `key = old, not new`."""
    for key in sorted(set(old) | set(new)):
        if key not in ignored and old.get(key) != new.get(key):
            return f"{key} = {old.get(key)!r}, not {new.get(key)!r}"
    return None


def _finished_run(out: Path, stage: str) -> StageResult:
    """The result of the run that finished in OUT, said in one line on stderr (stdout keeps the summary JSON alone):
    nothing is trained or written."""
    summary = read_json(out / METRICS_FILE)
    if launch_position().main:
        print(f"{out}: this {stage} run already finished with the same configuration (global_step "
              f"{summary.get('global_step')}); nothing to do: choose another out, or delete {out}, to train again",
              file=sys.stderr, flush=True)
    return StageResult({"out": str(out), **summary}, None)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` in `folder` that holds its trainer state, which the Trainer writes last: a run
    killed while saving leaves a newer, partial folder, skipped here (the Trainer's `get_last_checkpoint` would
    pick it and fail to resume)."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if step.isdigit() and (path / TRAINER_STATE_NAME).is_file():
            steps[int(step)] = str(path)
    return steps[max(steps)] if steps else None


# What the Trainer reads from a checkpoint to resume, besides its trainer_state.json: the stage's weights (the
# soft rows, the adapter) and, written by torch.save, the optimizer, scheduler, gradient scaler and RNG states.
RESUME_WEIGHTS = ("adapter_config.json", "*.safetensors")
RESUME_STATES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")


def check_resumable(checkpoint: Path, identity: dict[str, Any]) -> None:
    """Read every file the Trainer reads to resume from `checkpoint`, and the weights of the best checkpoint its
    state names (loaded at the end of training), before any model loads: a checkpoint of another run (`identity`
    differs), a damaged file, or a pickled object (refused: it could run code), is one line naming the file and
    what to do, not a traceback (or a silently mixed run) mid-resume."""
    from transformers import TrainerState
    from transformers.trainer import TRAINER_STATE_NAME

    remedy = (f"this checkpoint cannot be resumed: delete {checkpoint} to resume from the checkpoint before it, or "
              "re-run with --resume false to start over")
    _check_identity(checkpoint, identity, remedy)
    state_file = checkpoint / TRAINER_STATE_NAME

    def files(folder: Path, patterns) -> list[Path]:
        return [path for pattern in patterns for path in sorted(folder.glob(pattern))]

    problem = damaged_file([state_file, *files(checkpoint, RESUME_WEIGHTS + RESUME_STATES)])
    if problem:
        raise DelrecError(f"{problem}; {remedy}")
    state = read_json(state_file)
    try:
        TrainerState(**state)
    except TypeError as exc:  # not an object, or fields the Trainer does not know
        raise DelrecError(f"{state_file}: not a Trainer state ({exc}); {remedy}") from None
    best = state.get("best_model_checkpoint")
    if best and Path(best).is_dir() and Path(best).resolve() != checkpoint.resolve():
        best_remedy = ("this is the best checkpoint so far, which training loads at its end: delete "
                       f"{best} to resume without it, or re-run with --resume false to start over")
        _check_identity(Path(best), identity, best_remedy)
        problem = damaged_file(files(Path(best), RESUME_WEIGHTS))
        if problem:
            raise DelrecError(f"{problem}; {best_remedy}")


def _check_identity(checkpoint: Path, identity: dict[str, Any], remedy: str) -> None:
    """Refuse a checkpoint written by another run (copied in from another folder, seed, stage...): resuming it
    would continue that run under this one's name, or fail deep in the Trainer. One written before delrec recorded
    the identity is accepted, as before; so is one whose options differ only by options it did not know, left unset
    here (an option added to delrec later, whose unset value keeps what the run did)."""
    file = checkpoint / RUN_IDENTITY_FILE
    if not file.is_file():
        return
    recorded = read_json(file)
    recorded = recorded if isinstance(recorded, dict) else {}
    if recorded.get("sha256") == identity["sha256"]:
        return
    if recorded.get("stage") != identity["stage"]:
        which = f"a {recorded.get('stage')} run, not this {identity['stage']} run"
    else:
        config = current_names(recorded.get("config"))
        difference = first_difference(config, identity["config"], frozenset()) if isinstance(config, dict) else None
        if isinstance(config, dict) and difference is None:
            return
        which = f"a run with {difference}" if difference else "another run"
    raise DelrecError(f"{file}: this checkpoint was written by {which}; {remedy}")


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    write_json(out / METRICS_FILE, metrics)


