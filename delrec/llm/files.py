"""A damaged model file or a full disk in the LLM stack, as one line naming the file.

The libraries underneath report both badly for a user: safetensors raises its own `SafetensorError`
(not an `OSError`, and naming no file) for a cut-short header and for a full disk alike; torch's
writer reports a full disk as "unexpected pos"; `torch.load` refuses a pickled object in a
paragraph; transformers and PEFT fail on a damaged JSON file with a message that names no file.
These helpers read the files themselves to say which one is damaged (only after a load failed, or
before a resume: JSON and safetensors headers are cheap, torch files are read whole), and turn a
failed write into an `OSError` naming the file, which the CLI prints as one line saying what to do
(`delrec.errors.os_error_message`). A model that loads but is not whole (tensors missing, misshapen,
NaN or inf) is refused the same way (`check_loaded_weights`).

The names of the files a DELRec stage folder holds live here too, in a module that imports no other
part of the LLM stack: the loader, the folder reader and the trainers all name them.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterable

from delrec.errors import DelrecError
from delrec.io import read_json
from delrec.tensors import first_nonfinite

INFO_FILE = "delrec.json"  # what a stage folder is and how to load it (delrec.llm.stage_folder)
RUN_FILE = "run.json"  # the configuration a stage's run was started with (delrec.llm.trainer)
SOFT_PROMPT_FILE = "soft_prompt.safetensors"  # the soft-prompt rows (delrec.llm.soft_prompt)
USER_PROMPT_FILE = "user_prompt.safetensors"  # the per-user soft prompt's projector (delrec.llm.user_prompt)
# what torch's zip writer raises when a write fails (a full disk): no errno, no file name
TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter")
# how Rust's std::io::Error ends its message (safetensors, tokenizers): "No space left on device (os error 28)"
OS_ERROR = re.compile(r"\(os error (\d+)\)")


def summary(exc: BaseException) -> str:
    """An exception's message on one line: its first line (the next too when the first only introduces it), and
    of a long one its first sentence."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    if len(text) > 160:
        text = text.split(". ")[0]
    return f"{type(exc).__name__}: {text}" if isinstance(exc, LookupError) else text  # a KeyError's text is the key


def json_problem(path: Path) -> str | None:
    """Why a JSON file cannot be read (located: file and line), or None when it parses."""
    try:
        read_json(path)
    except DelrecError as exc:
        return str(exc)
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be opened (its header read and checked against the file's size), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        return f"{path}: not a readable safetensors file ({summary(exc)})"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why a file written by `torch.save` cannot be read back as the Trainer reads it (tensors and plain values
    only: `weights_only`, so a pickled object is refused and its code never runs), or None."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():  # the numpy types of the RNG state, as the Trainer allows them
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read it back: the Trainer's own load would fail the same way
        import pickle

        if isinstance(exc, pickle.UnpicklingError):
            refused = next((line for line in str(exc).splitlines() if "GLOBAL" in line), summary(exc))
            return (f"{path}: holds pickled Python objects, which delrec does not load (they could run code): "
                    f"{refused.strip()}")
        return f"{path}: not a readable PyTorch file ({summary(exc)})"
    return None


PROBLEM_READERS = {".json": json_problem, ".safetensors": safetensors_problem, ".bin": torch_file_problem,
                   ".pt": torch_file_problem, ".pth": torch_file_problem}




def damaged_file(files: Iterable[Path]) -> str | None:
    """The problem of the first of `files` (those that exist) that is damaged: JSON that does not parse, a
    safetensors header that does not read, a torch file that does not load as tensors; None when all of them
    read."""
    for path in files:
        reader = PROBLEM_READERS.get(path.suffix)
        problem = reader(path) if reader is not None and path.is_file() else None
        if problem:
            return problem
    return None


@contextlib.contextmanager
def explained_write_errors(path: str | os.PathLike):
    """Writes into `path` (a file or a folder): a failure becomes an `OSError` naming `path` when the library
    named nothing, or a one-line `DelrecError`. The Rust writers of safetensors and tokenizers report a full disk
    as their own error whose message ends with the OS error ("No space left on device (os error 28)"); torch's
    zip writer as a RuntimeError with no errno at all."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    except Exception as exc:
        code = OS_ERROR.search(str(exc))
        if code is not None:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        if isinstance(exc, SafetensorError):
            raise DelrecError(f"{path}: writing failed ({summary(exc)})") from None
        if isinstance(exc, RuntimeError) and TORCH_WRITE_FAILURE.search(str(exc)):
            raise DelrecError(f"{path}: writing failed ({summary(exc)}): most likely the disk is full; free some "
                              "space and re-run the same command") from None
        raise


@contextlib.contextmanager
def quiet_load_report():
    """Keep transformers' multi-line load report (missing, unexpected, misshapen tensors) off the terminal while
    loading: `check_loaded_weights` refuses what matters in one line."""
    from transformers.utils import logging

    # a filter, not a higher level: at WARNING or above, transformers checks a tensor-parallel plan and warns about it
    logger = logging.get_logger("transformers.modeling_utils")
    report = "LOAD REPORT"

    def drop_report(record) -> bool:
        return report not in record.getMessage()

    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


def check_loaded_weights(weights: str | os.PathLike, config: str | os.PathLike, loading: dict, model) -> None:
    """Refuse a model whose weights file `weights` (what `from_pretrained` reported in `loading`) left tensors of
    the model unset (transformers would initialise them at random and go on), has other shapes than `config` gives
    (a damaged file, or a config from another model), or holds NaN or inf (a damaged file, or a diverged training:
    every score would be NaN)."""
    mismatched = sorted(loading.get("mismatched_keys") or ())
    if mismatched:
        name, found, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise DelrecError(f"{weights}: tensor '{name}' has shape {list(found)}, but {config} gives it {list(expected)}"
                          f"{more}; the weights and the config come from different models, or one is damaged")
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DelrecError(f"{weights}: lacks {len(missing)} tensor(s) of the model {config} describes ({shown}); the "
                          "file is damaged or was cut short, or it belongs to another model")
    broken = first_nonfinite(model.named_parameters())
    if broken:
        raise DelrecError(f"{weights}: tensor '{broken[0]}' holds {broken[1]} NaN/inf value(s); the file is damaged, or the training "
                          "that wrote it diverged: use an intact copy of the model")
