"""Running the plan: each stage's output captured in RUN/<stage>/stage.log, its record kept current in
RUN/<stage>/stage.json, and RUN/run.json summarising the run, so a failed or killed run says where it
stopped and the next one resumes there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import delrec
from delrec.errors import DelrecError
from delrec.io import atomic_write, check_parents_are_folders, is_occupied, read_json, write_json
from delrec.pipeline.digests import FileDigests
from delrec.pipeline.layout import (CONFIG_COPY, DIGESTS_FILE, REPORT_FILE, RUN_FILE, STAGE_FILE, STAGE_LOG, STAGES,
                                    Layout)
from delrec.pipeline.plan import Step, decide, format_plan, output_digests, plan, read_record
from delrec.pipeline.schema import PipelineConfig
from delrec.pipeline.stages import RUNNERS, Context


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    from delrec.device import torch_threads

    layout = Layout(Path(run_dir))
    digests = FileDigests(layout.run / DIGESTS_FILE)
    steps = plan(config, layout.run, only, start, digests)
    echo(f"delrec run: {config.source} -> {layout.run}")
    if dry_run:
        echo(format_plan(steps))
        if (layout.run / RUN_FILE).is_file():  # an existing run folder keeps what the plan read; a new one gets nothing
            digests.save()
        return {"plan": [dataclasses.asdict(s) for s in steps]}
    summary = _start_run(config, layout)
    digests.save()
    began = time.perf_counter()
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
            step = decide(config, layout, stage, records, set(), digests, planned.forced)
            log = "" if verbose else f"  (output: {layout.stage(stage) / STAGE_LOG})"
            echo(f"{prefix} {step.action:<7} {planned.reason}{log}")
            with torch_threads(config.run.threads):
                record = _run_stage(config, layout, step, verbose, digests)
            records[stage] = record
            summary["stages"][stage] = {"action": step.action, "reason": planned.reason, "status": "finished",
                                        "seconds": record["seconds"], "hash": record["hash"]}
            write_json(layout.run / RUN_FILE, summary)
            echo(f"{'':8}{stage} finished in {record['seconds']:.1f} s")
    except BaseException as exc:
        _end_run(layout, summary, began, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    _end_run(layout, summary, began, "finished")
    return summary


def _start_run(config: PipelineConfig, layout: Layout) -> dict:
    """Claim the run folder: a copy of the config and a run.json that says the run is under way."""
    check_run_folder(layout.run)
    layout.run.mkdir(parents=True, exist_ok=True)
    with atomic_write(layout.run / CONFIG_COPY) as handle:
        handle.write(config.text)
    summary = {"config": str(config.source), "run": str(layout.run), "delrec_version": delrec.__version__,
               "started": _now(), "status": "running", "stages": {}}
    write_json(layout.run / RUN_FILE, summary)
    return summary


def _end_run(layout: Layout, summary: dict, began: float, status: str) -> None:
    summary.update(status=status, finished=_now(), seconds=round(time.perf_counter() - began, 2))
    if status == "finished" and (layout.run / REPORT_FILE).is_file():
        summary["report"] = str(layout.run / REPORT_FILE)
    write_json(layout.run / RUN_FILE, summary)

def _run_stage(config: PipelineConfig, layout: Layout, step: Step, verbose: bool, digests: FileDigests) -> dict:
    """Run one stage, keeping its stage.json current: running, then finished / failed / interrupted; a finished
    one records the digest of every file it wrote, which the next plan checks before skipping it."""
    folder = layout.stage(step.stage)
    if step.wipe and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": step.stage, "hash": step.hash, "inputs": step.inputs, "outside": step.outside,
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
    record.update(status="finished", finished=_now(), seconds=round(time.perf_counter() - began, 2), outputs=outputs,
                  files=output_digests(layout, step.stage, digests))
    write_json(folder / STAGE_FILE, record)
    digests.save()
    return record
