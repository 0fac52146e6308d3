"""What the error-corpus tests check about a failed command, in one place: it exits 2, stderr is one line holding
the key facts and no traceback, and the folders it was given are byte for byte what they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

from delrec.cli import main


def run_cli(argv) -> int:
    """`delrec ARGV` in-process; argparse's own errors exit through SystemExit, whose code is returned."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def one_line_error(capsys, code: int, *expected: str) -> str:
    """The one stderr line of a command that exited with `code` (must be 2), holding every `expected` fact."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fact in expected:
        assert fact in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path below `folder` with its SHA-256 ("dir" for a folder): equal snapshots mean nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}
