"""Each benchmark owns one block of benchmarks/RESULTS.md, between `<!-- NAME -->` and `<!-- /NAME -->`."""

from __future__ import annotations

from pathlib import Path

from delrec.io import atomic_write


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace only the block from `begin` to `end` (re-read right before writing: others edit the
    file too), or append the section when the file has no such block yet."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop > start:
        text = text[:start] + section.rstrip("\n") + text[stop + len(end):]
    elif text:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        text = "# Benchmark results\n\n" + section.rstrip("\n") + "\n"
    with atomic_write(path) as handle:
        handle.write(text)
