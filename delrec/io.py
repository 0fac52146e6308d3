"""Small file helpers: atomic writes (temp file + rename), one writer per output, and JSON lines with located
errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from delrec.errors import DelrecError, where

# The process's umask, read once: mkstemp and mkdtemp create 0600 files and 0700 folders whatever it says, so
# every output is given the mode a plain open() or mkdir() would have (others on a shared machine can read it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temp file next to `path`; on success rename it over `path`, on error delete it.

    Readers never see a half-written file, and an interrupted run leaves the old file intact (the temp file
    of a killed run is removed by the next write of the same file).
    """
    path = Path(path)
    created = make_parents(path)
    tmp = None
    try:
        remove_leftovers(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_transient_prefix(path), suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
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
        if exc.filename is None or _is_transient(exc.filename, path):  # a failed write() names no file, or a temp
            exc.filename = str(path)                                     # one: say which output it was for
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
    interrupted run never leaves a half-written folder under the real name (and the staging folder
    of a killed run is removed by the next run that stages the same output).
    """
    path = Path(path)
    created = make_parents(path)
    try:
        remove_leftovers(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_transient_prefix(path), suffix=".tmp"))
        tmp.chmod(0o777 & ~_UMASK)
    except BaseException as exc:
        remove_empty(created)
        if isinstance(exc, OSError) and exc.filename is not None and _is_transient(exc.filename, path):
            exc.filename = str(path)
        raise
    try:
        yield tmp
    except OSError as exc:  # name the file of the output, not of the staging folder that is about to go
        if exc.filename is not None and Path(exc.filename).is_relative_to(tmp):
            exc.filename = str(path / Path(exc.filename).relative_to(tmp))
        raise
    except DelrecError as exc:  # likewise a refusal of what was about to be written there (e.g. a NaN in JSON)
        if str(tmp) in str(exc):
            raise DelrecError(str(exc).replace(str(tmp), str(path))) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            remove_empty(created)


def replace_directory(source: Path, target: Path) -> None:
    """Move a finished folder to `target`, replacing what was there only once it is complete."""
    if target.exists():
        old = target.with_name(f"{_transient_prefix(target)}old")
        os.replace(target, old)
        os.replace(source, target)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file in the way, replaced as asked (overwrite)
            old.unlink()
    else:
        os.replace(source, target)


# Temp files, staging folders and replaced outputs beside an output `NAME` are `.NAME.PID-HOST.<random>.tmp`
# and `.NAME.PID-HOST.old`: whose process wrote them, so that the next run can tell a killed run's leftovers
# (the process is gone) from a live run's (same output, another process: never touched).
_HOST = hashlib.blake2s(socket.gethostname().encode(), digest_size=3).hexdigest()
_LEFTOVER = re.compile(r"(\d+)-([0-9a-f]{6})\.(?:[a-z0-9_]+\.tmp|old)")


def _transient_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{_HOST}."


def _is_transient(name: str | os.PathLike, path: Path) -> bool:
    """Whether `name` is one of this process's temp files or staging folders for `path`: an error about it is
    reported as an error about `path`, the only name the user knows."""
    return Path(name).parent == path.parent and Path(name).name.startswith(_transient_prefix(path))


def remove_leftovers(path: Path) -> None:
    """Remove what killed runs of this host left beside `path`: temp files, staging folders, and the replaced
    output of a run killed mid-swap, which is put back instead when `path` itself is missing. Best effort:
    what cannot be removed stays, and the write goes on."""
    prefix, leftovers = f".{path.name}.", []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        leftovers = [entry.name for entry in entries if entry.name.startswith(prefix)]
    for name in leftovers:
        match = _LEFTOVER.fullmatch(name[len(prefix):])
        if match is None or match[2] != _HOST or is_running(int(match[1])):
            continue
        leftover = path.parent / name
        with contextlib.suppress(OSError):
            if name.endswith(".old") and not path.exists():
                os.replace(leftover, path)
            elif leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


def is_running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, command: str):
    """Hold the output `out` (a folder or a file) for this process while `command` writes it.

    The lock is the hidden file `.NAME.lock` beside `out`, so it exists before the output does, outlives the
    swap of a staged folder, and works for a file output too. It holds an `flock`, which the system drops
    when the process ends however it ends: a second writer is refused with one line naming the holder (the
    file records its pid, host, command and start time), and the lock file of a killed run is taken over
    with one line on stderr. Holding the lock, it clears what killed runs left beside `out`. A lock that
    cannot be placed (a read-only parent, a parent that is a file, a file system without locks) does not
    stop the command, which reports its own errors if it cannot write either.
    """
    target = Path(out).resolve()
    lock = target.parent / f".{target.name}.lock"
    fd, left, created = None, "", []
    try:
        created = make_parents(lock)
        fd, left = _acquire(lock, out)
    except OSError:
        pass  # unlocked, as said above
    except BaseException:
        remove_empty(created)
        raise
    try:
        if fd is not None:
            if left.strip():
                print(f"{out}: taking over the lock of delrec process {_describe(_lock_record(left))}, which ended "
                      "without finishing", file=sys.stderr)
            remove_leftovers(target)  # before the command looks at what `out` holds: a swap cut short is undone
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            with contextlib.suppress(OSError):  # the lock holds without its record (on a full disk, say)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            os.close(fd)
        remove_empty(created)


def _acquire(lock: Path, out: str | os.PathLike) -> tuple[int, str]:
    """The locked file's descriptor and what its last holder left in it (a killed run's record, or nothing);
    a `DelrecError` naming the holder when another process holds it."""
    import fcntl  # POSIX only: imported here so that the rest of delrec imports anywhere

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_record(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
                raise DelrecError(f"{out}: another delrec process ({_describe(holder)}) is writing here; wait for it "
                                  "to finish or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # not a file its last holder unlinked meanwhile
                    return fd, os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _lock_record(text: str) -> dict:
    with contextlib.suppress(ValueError):
        record = json.loads(text)
        if isinstance(record, dict):
            return record
    return {}


def _describe(record: dict) -> str:
    """`pid N, `delrec sr train`, started at T` (and the host when it is another one)."""
    if "pid" not in record:
        return "pid unknown"
    host = record.get("host")
    elsewhere = f" on host {host}" if host and host != socket.gethostname() else ""
    started = record.get("started", "?")
    return f"pid {record['pid']}{elsewhere}, `{record.get('command', 'delrec')}`, started at {started}"


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
                      inputs: dict[str, Any], what: str, read: dict[str, Any] | None = None) -> None:
    """Refuse a file output that would replace something the command did not write: a folder, a file inside
    an input folder (`inputs`: name -> folder), a file of a folder the command reads (`read`: name -> folder,
    where new files may go but none of its own is replaced, even with `overwrite`), or an existing file for which
    `is_own` is false (the command's own earlier output is replaced; anything else only with `overwrite`)."""
    names_folder = str(out).endswith(("/", os.sep))  # `Path` drops the trailing slash that says so
    out = Path(out)
    check_parents_are_folders(out)
    if out.is_dir() or names_folder:
        raise DelrecError(f"--out {out} names a folder; expected the path of {what} to write")
    target = out.resolve()
    for name, folder in inputs.items():
        if folder is not None and Path(folder).is_dir() and Path(folder).resolve() in target.parents:
            raise DelrecError(f"--out {out} is inside the {name} folder {folder}; write {what} elsewhere")
    for name, folder in (read or {}).items():
        if (folder is not None and out.exists() and not is_own(out) and Path(folder).is_dir()
                and Path(folder).resolve() in target.parents):
            raise DelrecError(f"--out {out} is a file of the {name} folder {folder}, which this command reads; "
                              f"write {what} elsewhere")
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
    text = json_text(obj, path, indent=2)
    with atomic_write(path) as handle:
        handle.write(text)
        handle.write("\n")


def json_text(obj: Any, path: str | os.PathLike, line: int | None = None, indent: int | None = None) -> str:
    """`obj` as JSON for the file `path`, refusing NaN and infinities: Python would write them as `NaN`, which
    no JSON reader (nor delrec's own) accepts, so the file could never be read back."""
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        found = _non_finite(obj) if "Out of range float" in str(exc) else None  # not a circular reference
        if found is None:
            raise
        field, value = found
        raise DelrecError(f"{where(path, line, field)}: {value} is not a finite number, which JSON cannot hold; "
                          f"{Path(path).name} was not written (a diverged training or an empty split gives such "
                          "values)") from None


def _non_finite(obj: Any, field: str | None = None) -> tuple[str | None, float] | None:
    """`(field path, value)` of the first NaN or infinity in `obj` (`a.b[2]`; None for `obj` itself), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return field, obj
    if isinstance(obj, dict):
        children = ((f"{field}.{key}" if field else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f"{field or ''}[{index}]", value) for index, value in enumerate(obj))
    else:
        return None
    return next((found for name, value in children if (found := _non_finite(value, name)) is not None), None)


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


class _NotJSON(ValueError):
    """A value Python's json module would accept but JSON has not: `NaN`, `Infinity`, `-Infinity`."""


def _refuse_constant(name: str) -> None:
    raise _NotJSON(f"{name} is not a JSON number (JSON has no NaN or infinities)")


class _DuplicateKey(ValueError):
    """A key given twice in one JSON object: Python's json keeps the last value without a word."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        key = next(key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i]))
        shown = repr(key) if len(repr(key)) <= 60 else f"{repr(key)[:60]}..."
        raise _DuplicateKey(f"key {shown} appears twice in one object; expected each key once (which value is meant?)")
    return found


def loads_json(text: str, path: str | os.PathLike, line: int | None = None, unique_keys: bool = False) -> Any:
    """`json.loads` for a file's text, every failure a located one-line `DelrecError`: invalid JSON, NaN or
    Infinity (Python would accept them, no other reader does), nesting deeper than the interpreter's stack
    and numbers longer than Python converts (both would otherwise be tracebacks); with `unique_keys`, a key
    given twice in one object (raw inputs, where the user's file decides what a record means)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys if unique_keys else None)
    except _DuplicateKey as exc:
        raise DelrecError(f"{where(path, line)}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DelrecError(f"{where(path, line or exc.lineno)}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise DelrecError(f"{where(path, line)}: invalid JSON (arrays or objects nested too deeply)") from None
    except ValueError as exc:  # _NotJSON, or an integer over Python's digit limit
        raise DelrecError(f"{where(path, line)}: invalid JSON ({str(exc)[:200]})") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DelrecError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DelrecError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None
    return loads_json(text, path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            count += 1
            handle.write(json_text(row, path, line=count))
            handle.write("\n")
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
            obj = loads_json(text, path, line_no)
            if not isinstance(obj, dict):
                raise DelrecError(f"{where(path, line_no)}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj
