"""User-facing errors.

Every problem a user can fix (a bad file, a wrong flag, a folder of the wrong kind) is raised as
a `DelrecError` whose message is one line: where (file, line, field), what was found and what was
expected or what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

from os import PathLike


class DelrecError(Exception):
    """An error caused by the user's input; its message is shown as is, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def where(path: str | PathLike, line: int | None = None, field: str | None = None) -> str:
    """Format a location as `path:line field 'name'` for error messages."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f" field '{field}'"
    return text
