"""User-facing errors.

Every problem a user can fix (a bad file, a wrong flag, a folder of the wrong kind) is raised as
a `DelrecError` whose message is one line: where (file, line, field), what was found and what was
expected or what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

import errno
from os import PathLike


MAX_MESSAGE = 1000  # characters: a backstop for a message that quotes a huge value (most cut theirs to 200)


class DelrecError(Exception):
    """An error caused by the user's input; its message is shown as is, on one line of at most `MAX_MESSAGE`
    characters."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        if len(text) > MAX_MESSAGE:
            text = f"{text[:MAX_MESSAGE]}... ({len(text):,} characters)"
        super().__init__(text)


def where(path: str | PathLike, line: int | None = None, field: str | None = None) -> str:
    """Format a location as `path:line field 'name'` for error messages."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f" field '{field}'"
    return text


_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space and re-run the same command (finished files are "
                  "intact, and a command that trains resumes from its last checkpoint)",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose an output path whose parents are folders",
    errno.EEXIST: "a file is in the way of a folder this command needs to create; choose another output path",
    errno.EACCES: "permission denied; choose a path you can write to",
    errno.EROFS: "the file system is read-only; choose a path you can write to",
    errno.EISDIR: "this is a folder; expected a file path",
}


def os_error_message(exc: OSError) -> str:
    """One line for an `OSError` the user can act on: the path, what the system said and what to do."""
    path = exc.filename if exc.filename is not None else "(a file being written)"
    hint = _OS_ERROR_HINTS.get(exc.errno, "check the path and the disk, then re-run the same command")
    return " ".join(f"{path}: {exc.strerror or exc}; {hint}".split())
