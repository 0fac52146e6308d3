"""File contents by SHA-256, read again only when a file's stat moved: RUN/digests.json keeps, per file, its
size, mtime, ctime and inode with the digest they were read with.

The ctime is what makes a remembered digest safe to reuse: the system sets it on every write and every
`touch`/`os.utime`, and no user call sets it back, so an edit that keeps the size and restores the mtime
(`touch -r`, `cp -p`, `os.utime`) still moves it and the file is read again. A plain `touch` moves it too;
the file is read again and found unchanged. A gigabyte model folder is read once, then only stat'ed. Not
seen: an edit that restores the mtime within the same clock tick (milliseconds) as the write before it,
and, on Windows, where the ctime is the creation time, any edit that restores the mtime.

The file is only a cache: a missing or damaged one costs reading the files again, nothing else.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from delrec.errors import DelrecError
from delrec.io import read_json, sha256_file, write_json


def _stamp(status: os.stat_result) -> list[int]:
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]


def _valid(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 5 and all(type(v) is int for v in entry[:4])
            and isinstance(entry[4], str))


class FileDigests:
    """SHA-256 of files, remembered by stat in `path` (None: remembered for this process only)."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                saved = read_json(path)
            except DelrecError:
                saved = None
            if isinstance(saved, dict):
                self.entries = {k: v for k, v in saved.items() if _valid(v)}

    def sha256(self, file: Path) -> str | None:
        """The file's SHA-256; None when it is not there (or is not a file)."""
        try:
            before = os.stat(file)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(before.st_mode):
            return None
        key, stamp = str(Path(file).absolute()), _stamp(before)
        entry = self.entries.get(key)
        if entry is not None and entry[:4] == stamp:
            return entry[4]
        digest = sha256_file(file)
        if _stamp(os.stat(file)) == stamp:  # not written to while it was read
            self.entries[key] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Write the cache, less the files that are gone (a re-run stage's old outputs)."""
        if self.path is not None:
            write_json(self.path, {k: v for k, v in sorted(self.entries.items()) if os.path.isfile(k)})
