"""Run, resume or skip: each stage's content hash against the one its last run recorded, and its output files
against the digests it recorded.

RUN/<stage>/stage.json records the stage's content hash (its configuration + the identity of its
inputs: each upstream stage's hash and finish time, and for outside inputs a fingerprint of the
files' contents), the configuration, start and finish times, seconds, status and the SHA-256 of each
file it wrote. A stage is skipped when it finished, its hash is unchanged and every file it wrote is
still there as written; a changed configuration, or an output deleted or edited since, re-runs that
stage (its folder emptied first) and, because its finish time changes, everything downstream. A stage
that did not finish (interrupted, failed, killed) resumes in place: the SR trainer from its epoch
checkpoint, stages 1 and 2 from their last Trainer checkpoint. `--only STAGE` runs one stage,
`--from STAGE` that stage and everything after it (both re-run it even when unchanged; the stages
before must be up to date); `--dry-run` prints the plan.

Files are read through `FileDigests`, which reads a file again only when its stat moved, so a plan
stats a gigabyte model folder rather than reading it. Changing what `_digest`, `fingerprint_path` or
`identity` compute would re-run every stage of every existing run folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import delrec
from delrec.errors import DelrecError
from delrec.io import read_json
from delrec.pipeline.digests import FileDigests
from delrec.pipeline.layout import DIGESTS_FILE, STAGE_FILE, STAGES, Layout
from delrec.pipeline.options import DataOptions, LLMOptions
from delrec.pipeline.schema import PipelineConfig, item_tokens_reference

# the stages whose outputs each stage reads: it re-runs when one of them finished anew
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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_path(path: str | Path, digests: FileDigests | None = None) -> str:
    """The fingerprint of an outside input (a raw data or model folder): its files' names and contents (read
    through `digests`, so only files whose stat moved are read)."""
    path, digests = Path(path), digests or FileDigests()
    if not path.exists():
        return f"missing:{path}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _digest([(str(p.relative_to(path) if p != path else p.name), digests.sha256(p)) for p in files])


def _outside_inputs(config: PipelineConfig, stage: str, digests: FileDigests | None = None) -> dict:
    if stage == "data":
        options = config.sections["data"].get(DataOptions)
        return {"input": fingerprint_path(options.input, digests)} if options.format != "synthetic" else {}
    if stage == "llm":
        model = config.sections["llm"].get(LLMOptions).model
        return {"model": fingerprint_path(model, digests) if model and Path(model).exists() else model}
    if stage == "stage2" and item_tokens_reference(config) is None:  # `sr/NAME` is stage sr's, which stage 2 reads
        from delrec.llm.stage2 import FinetuneArguments

        folder = config.sections["stage2"].get(FinetuneArguments).item_tokens
        return {"item_tokens": fingerprint_path(folder, digests)} if folder else {}
    return {}


def output_digests(layout: Layout, stage: str, digests: FileDigests) -> dict[str, str]:
    """What a finished stage records of its outputs: each file (relative to the run folder) and its SHA-256."""
    return {layout.relative(p): digests.sha256(p) for p in layout.outputs(stage)}


def _changed_output(layout: Layout, recorded: dict, digests: FileDigests) -> str | None:
    """Why a finished stage's outputs are no longer what it wrote (the first file deleted or edited), or None."""
    for name, digest in recorded.items():
        now = digests.sha256(layout.run / name)
        if now != digest:
            return f"output {layout.run / name} {'was deleted' if now is None else 'changed'} since it was written"
    return None


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
    outside: dict | None = None  # the fingerprints of its outside inputs (raw data, a local model, an SR folder)
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
           running: set[str], digests: FileDigests, forced: str | None = None) -> Step:
    """Run, resume or skip `stage`, and why. `records`: the stage.json of each stage as of now; `running`: stages
    planned to run before this one; `digests`: reads files; `forced`: the option that forces this stage to run."""
    first = max((u for u in INPUTS[stage] if u in running), key=STAGES.index, default=None)
    if first is not None:
        return Step(stage, "run", f"input '{first}' runs first", wipe=True)
    missing = next((u for u in INPUTS[stage] if not records.get(u) or records[u].get("status") != "finished"), None)
    if missing is not None:
        raise DelrecError(f"stage '{stage}' needs stage '{missing}', which has not finished in {layout.run}; "
                          f"run `delrec run CONFIG` without --only/--from first")
    inputs = {u: identity(records[u]) for u in INPUTS[stage]}
    current = config.stage_config(stage)
    outside = _outside_inputs(config, stage, digests)
    content = _digest({"stage": stage, "config": current, "inputs": inputs, "outside": outside,
                       "delrec": delrec.__version__})
    record = records.get(stage)
    same = record is not None and record.get("hash") == content

    def step(action: Literal["run", "resume", "skip"], reason: str, wipe: bool = False) -> Step:
        return Step(stage, action, reason, content, inputs, outside, wipe=wipe, forced=forced)

    if forced:
        if same and record.get("status") != "finished":
            return step("resume", f"{record.get('status')} earlier; resumes ({forced})")
        return step("run", f"forced by {forced}", wipe=True)
    if record is None:
        return step("run", "not run yet", wipe=True)
    # a record written before outputs were recorded: what its stage wrote cannot be checked, so it runs again
    unlisted = record.get("status") == "finished" and not isinstance(record.get("files"), dict)
    if not same or unlisted:
        return step("run", _why_changed(stage, record, current, inputs, outside, unlisted), wipe=True)
    if record.get("status") != "finished":
        return step("resume", f"{record.get('status')} earlier; resumes where it stopped")
    changed_output = _changed_output(layout, record["files"], digests)
    if changed_output is not None:
        return step("run", changed_output, wipe=True)
    finished = str(record.get("finished"))[:19].replace("T", " ")
    return step("skip", f"unchanged (finished {finished} UTC)")


def _why_changed(stage: str, record: dict, current: dict, inputs: dict, outside: dict, unlisted: bool) -> str:
    """Why a stage whose record no longer matches runs again: the first of config, inputs, outside inputs."""
    if record.get("config") != json.loads(json.dumps(current, default=str)):
        return f"config changed ({_change(stage, record.get('config') or {}, current)})"
    if record.get("inputs") != inputs:
        changed = [u for u in inputs if (record.get("inputs") or {}).get(u) != inputs[u]]
        return f"input {', '.join(repr(u) for u in changed)} changed"
    if isinstance(record.get("outside"), dict) and record["outside"] != outside:
        changed = [k for k in sorted(outside.keys() | record["outside"].keys())
                   if record["outside"].get(k) != outside.get(k)]
        return f"outside input {', '.join(repr(k) for k in changed)} changed"
    if unlisted:
        return "recorded by an older delrec, which did not list the stage's output files"
    return "outside input or delrec version changed"


def plan(config: PipelineConfig, run_dir: str | Path, only: str | None = None, start: str | None = None,
         digests: FileDigests | None = None) -> list[Step]:
    """What `run_pipeline` would do now, stage by stage (`digests`: default, the run folder's cache, not saved)."""
    layout = Layout(Path(run_dir))
    digests = digests or FileDigests(layout.run / DIGESTS_FILE)
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
        step = decide(config, layout, stage, records, running, digests, forced)
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

