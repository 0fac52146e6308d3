"""Write a prepared dataset folder (see `delrec.data.dataset`) atomically."""

from __future__ import annotations

import json
from pathlib import Path

from delrec.data.dataset import (
    CANDIDATE_SPLITS,
    DATASET_KIND,
    FORMAT_VERSION,
    ITEMS_FILE,
    Instance,
    META_FILE,
    SPLITS,
    PreparedDataset,
    candidates_file,
    dataset_files,
    fingerprint_files,
    split_file,
)
from delrec.data.preprocess import PreprocessConfig, Processed, preprocess
from delrec.data.raw import RawDataset
from delrec.errors import DelrecError
from delrec.io import atomic_write, is_occupied, read_json, replace_directory, staged_directory, write_json, write_jsonl


def write_prepared(processed: Processed, folder: Path, source: str, protocol: str, options: dict) -> dict:
    write_jsonl(
        folder / ITEMS_FILE,
        ({"id": i, "title": t, "raw_id": r} for i, (t, r) in enumerate(zip(processed.titles, processed.raw_ids))),
    )
    for split in SPLITS:
        with atomic_write(folder / split_file(split)) as handle:
            handle.writelines(map(instance_line, processed.instances(split)))
    for split in CANDIDATE_SPLITS:
        with atomic_write(folder / candidates_file(split)) as handle:
            handle.writelines(f'{{"id": {i}, "candidates": [{", ".join(map(str, c))}]}}\n'
                              for i, c in enumerate(processed.candidates(split)))
    names = dataset_files()
    meta = {
        "kind": DATASET_KIND,
        "format_version": FORMAT_VERSION,
        "source": source,
        "protocol": protocol,
        "seed": options["seed"],
        "options": options,
        "counts": processed.counts,
        "fingerprint": fingerprint_files(folder, names),
    }
    write_json(folder / META_FILE, meta)
    return meta


def instance_line(inst: Instance) -> str:
    """An instance's row as `write_jsonl` writes it (`json.dumps`, ensure_ascii off), formatted directly: a split
    has a row per user, and all of a row but the user (a string or null) are integers."""
    history = ", ".join(map(str, inst.history))
    user = json.dumps(inst.user, ensure_ascii=False)
    return f'{{"id": {inst.id}, "user": {user}, "history": [{history}], "target": {inst.target}}}\n'


def prepare_dataset(raw: RawDataset, config: PreprocessConfig, out: str | Path, overwrite: bool = False) -> PreparedDataset:
    """Preprocess `raw` and write it to `out`.

    If `out` already holds a prepared dataset with the same content (fingerprint) it is simply
    rewritten; a different one is replaced only with `overwrite`. A half-written folder is never
    left behind.
    """
    out = Path(out)
    existing = _existing_fingerprint(out)
    if is_occupied(out) and existing is None and not overwrite:
        raise DelrecError(f"{out} already exists and is not a prepared dataset; choose another --out or pass --overwrite")
    processed = preprocess(raw, config)
    with staged_directory(out) as tmp:
        meta = write_prepared(processed, tmp, raw.source, raw.protocol, vars(config).copy())
        if existing not in (None, meta["fingerprint"]) and not overwrite:
            raise DelrecError(
                f"{out} already holds a different prepared dataset; pass --overwrite to replace it, or choose another --out"
            )
        replace_directory(tmp, out)
    return PreparedDataset.load(out)


def _existing_fingerprint(out: Path) -> str | None:
    meta = out / META_FILE
    if not meta.is_file():
        return None
    try:
        data = read_json(meta)
    except DelrecError:
        return None
    return data.get("fingerprint") if isinstance(data, dict) else None
