"""Small file helpers: atomic writes (temp file + rename) and JSON lines with located errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from delrec.errors import DelrecError, where


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temp file next to `path`; on success rename it over `path`, on error delete it.

    Readers never see a half-written file, and an interrupted run leaves the old file intact.
    """
    path = Path(path)
    created = make_parents(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file; say which one
            exc.filename = str(path)
        remove_empty(created)
        raise
    except BaseException:
        remove_empty(created)
        raise


def make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of `path`; return them, deepest first, so that a failed write can
    remove exactly what it created (an empty `checkpoint/` left behind would block the next run)."""
    missing = [parent for parent in path.parents if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike):
    """Yield an empty temp folder beside `path` to build a whole output folder in.

    Move it into place with `replace_directory`; if the block fails, it is removed, so an
    interrupted run never leaves a half-written folder under the real name.
    """
    path = Path(path)
    created = make_parents(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            remove_empty(created)


def replace_directory(source: Path, target: Path) -> None:
    """Move a finished folder to `target`, replacing what was there only once it is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(source, target)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file in the way, replaced as asked (overwrite)
            old.unlink()
    else:
        os.replace(source, target)


def is_occupied(path: Path) -> bool:
    """Whether writing an output folder at `path` would replace something: a file, or a non-empty folder."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_parents_are_folders(out: str | os.PathLike) -> None:
    """Refuse, before any work, an output path under a regular file (it could never be written)."""
    for parent in Path(out).parents:
        if parent.exists():
            if not parent.is_dir():
                raise DelrecError(f"--out {out}: {parent} is a file, not a folder; choose an output path whose "
                                  "parents are folders")
            return


def check_apart_from_inputs(out: str | os.PathLike, inputs: dict[str, Any], what: str = "the output") -> None:
    """Refuse an output folder that is, or holds, an input (`inputs`: name -> path, None when not given):
    writing there would replace or mix with the input, which the command is still reading."""
    check_parents_are_folders(out)
    target = Path(out).resolve()
    for name, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents:
            relation = f"is the {name} folder" if source == target else f"holds the {name} {path}"
            raise DelrecError(f"--out {out} {relation}; write {what} to a folder of its own")


def check_output_file(out: str | os.PathLike, overwrite: bool, is_own: Callable[[Path], bool],
                      inputs: dict[str, Any], what: str) -> None:
    """Refuse a file output that would replace something the command did not write: a folder, a file inside
    an input folder (`inputs`: name -> folder), or an existing file for which `is_own` is false (the
    command's own earlier output is replaced; anything else only with `overwrite`)."""
    out = Path(out)
    check_parents_are_folders(out)
    if out.is_dir():
        raise DelrecError(f"--out {out} is a folder; expected the path of {what} to write")
    target = out.resolve()
    for name, folder in inputs.items():
        if folder is not None and Path(folder).is_dir() and Path(folder).resolve() in target.parents:
            raise DelrecError(f"--out {out} is inside the {name} folder {folder}; write {what} elsewhere")
    if out.exists() and not overwrite and not is_own(out):
        raise DelrecError(f"--out {out} already exists and is not {what} written by delrec; choose another path, "
                          "or pass --overwrite to replace it")


def check_own_folder(out: str | os.PathLike, outputs: Sequence[str]) -> None:
    """Refuse an output folder holding anything but the command's `outputs` (hidden temp files aside): the
    folder of a model or a dataset, say, whose files (its metrics.json) the command would replace."""
    out = Path(out)
    check_parents_are_folders(out)
    if out.exists() and not out.is_dir():
        raise DelrecError(f"--out {out} is a file; expected a folder for {', '.join(outputs)}")
    entries = out.iterdir() if out.is_dir() else ()
    others = sorted(p.name for p in entries if p.name not in outputs and not p.name.startswith("."))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise DelrecError(f"--out {out} already holds other files ({shown}), which are not {' or '.join(outputs)}; "
                          "choose a new or empty folder")


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 4 MB blocks (model files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save`, but the same tensors and metadata always give the same bytes: safetensors
    writes the metadata map in a random order per process, so the header is rewritten with sorted keys
    (the data offsets in it are relative to the data, which stays as it is)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    header = header.encode("utf-8")
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DelrecError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DelrecError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DelrecError(f"{where(path, exc.lineno)}: invalid JSON ({exc.msg})") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False))
            handle.write("\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DelrecError(f"{path}: file not found")
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM, as editors on Windows write
            except UnicodeDecodeError as exc:
                raise DelrecError(
                    f"{where(path, line_no)}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DelrecError(f"{where(path, line_no)}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DelrecError(f"{where(path, line_no)}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj
