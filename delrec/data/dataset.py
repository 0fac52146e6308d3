"""The prepared dataset folder: the contract between data preparation and every model.

    items.jsonl              {"id", "title", "raw_id"}; ids contiguous from 0
    train.jsonl, valid.jsonl, test.jsonl
                             {"id", "user", "history", "target"}; history oldest first
    candidates/valid.jsonl, candidates/test.jsonl
                             {"id", "candidates"}; a fixed, shuffled set holding the target
    meta.json                source, protocol, options, counts, seed and a content fingerprint

`PreparedDataset.load` validates what it reads, so a model never trains on a folder of the
wrong kind or a half-edited file; errors name the file and line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from delrec.config import excerpt
from delrec.errors import DelrecError, where
from delrec.io import read_json, read_jsonl

FORMAT_VERSION = 1
DATASET_KIND = "delrec-dataset"
SPLITS = ("train", "valid", "test")
CANDIDATE_SPLITS = ("valid", "test")
META_FILE = "meta.json"
ITEMS_FILE = "items.jsonl"
FINGERPRINT_BLOCK = 16 << 20


@dataclass(frozen=True)
class Instance:
    """One prediction task: given `history` (item ids, oldest first), predict `target`."""

    id: int
    history: tuple[int, ...]
    target: int
    user: str | None = None


def sampled_indices(total: int, count: int | None, seed: int | None) -> list[int]:
    """Which of `total` instances a command takes, in dataset order: the first `count` with no seed, else `count`
    drawn without replacement from a stream of (seed, total) alone, so that every command (ranking with any model or
    backend, a teacher export) given the same seed and count takes the same users; all of them for count None."""
    if count is None or count >= total:
        return list(range(total))
    if seed is None:
        return list(range(count))
    import numpy as np

    return sorted(np.random.default_rng([seed, total]).choice(total, size=count, replace=False).tolist())


def split_file(split: str) -> str:
    return f"{split}.jsonl"


def candidates_file(split: str) -> str:
    return f"candidates/{split}.jsonl"


def dataset_files() -> list[str]:
    """The files a prepared dataset consists of, in fingerprint order."""
    return [ITEMS_FILE] + [split_file(s) for s in SPLITS] + [candidates_file(s) for s in CANDIDATE_SPLITS]


def fingerprint_files(folder: Path, names: list[str]) -> str:
    """A content hash of the dataset files, stored in meta.json so that files derived from a
    dataset (predictions, teacher files) can prove which dataset they belong to."""
    return _fingerprint_and_rows(folder, names)[0]


def _fingerprint_and_rows(folder: Path, names: list[str]) -> tuple[str, dict[str, int]]:
    """The fingerprint and each file's number of rows (non-blank lines, as `read_jsonl` yields them): the rows
    come free while the bytes are in hand, and let `load` check meta.json's counts without parsing a file."""
    digest = hashlib.sha256()
    rows = {}
    for name in names:
        digest.update(name.encode())
        count, rest = 0, b""
        with open(folder / name, "rb") as handle:  # in blocks: a 100M-interaction dataset's files are gigabytes
            while block := handle.read(FINGERPRINT_BLOCK):
                digest.update(block)
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                count += sum(1 for line in lines if line.strip())
        rows[name] = count + bool(rest.strip())
    return digest.hexdigest()[:16], rows


def is_count(value) -> bool:
    """A JSON non-negative integer; `true` is not 1 (bool is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_amount(value) -> bool:
    """A JSON non-negative number (NaN is refused by the JSON reader)."""
    return type(value) in (int, float) and value >= 0


def is_item_id(value, num_items: int) -> bool:
    """An id of the catalogue `0..num_items-1`; `true` is not item 1."""
    return is_count(value) and value < num_items


# meta.json's `counts`: (path of the field, accepts its value, what it should be). `data stats` prints them and the
# pipeline's reports quote them, so a wrong type is refused at load, not printed or crashed on.
_COUNT_FIELDS = (
    (("users",), is_count, "a non-negative integer"),
    (("items",), is_count, "a non-negative integer"),
    (("interactions",), is_count, "a non-negative integer"),
    *((("instances", split), is_count, "a non-negative integer") for split in SPLITS),
    (("history_length", "mean"), is_amount, "a non-negative number"),
    (("history_length", "max"), is_count, "a non-negative integer"),
    (("density",), is_amount, "a non-negative number"),
    (("dropped",), lambda v: isinstance(v, dict) and all(map(is_count, v.values())),
     "an object of non-negative integers"),
)


def _check_counts(meta: dict, meta_path: Path, rows: dict[str, int]) -> None:
    """Refuse a `counts` in meta.json of the wrong shape or disagreeing with the rows the files hold."""
    counts = meta.get("counts")
    if not isinstance(counts, dict):
        raise DelrecError(f"{where(meta_path, field='counts')}: expected an object of dataset counts, found "
                          f"{excerpt(counts, 60)}; re-run `delrec data prepare`")
    held = {("items",): ITEMS_FILE, **{("instances", s): split_file(s) for s in SPLITS}}
    for keys, accepts, expected in _COUNT_FIELDS:
        value = counts
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        name = ".".join(("counts", *keys))
        if not accepts(value):
            raise DelrecError(f"{where(meta_path, field=name)}: expected {expected}, found {excerpt(value, 60)}; "
                              "re-run `delrec data prepare`")
        if keys in held and value != rows[held[keys]]:
            raise DelrecError(f"{where(meta_path, field=name)}: says {value}, but {held[keys]} holds "
                              f"{rows[held[keys]]} rows; {META_FILE} was edited, re-run `delrec data prepare`")


# Files that tell what a folder is, when it is not a dataset: (file, what it is).
_OTHER_FOLDERS = (
    ("teacher.json", "a teacher folder"),
    ("delrec.json", "a delrec LLM folder"),
    ("run.json", "a run folder"),
    ("config.json", "a model folder"),
)


def _what_instead(path: Path) -> str:
    """What to do about a folder that is not a dataset: name the kind it seems to be, else say how to make one."""
    for name, kind in _OTHER_FOLDERS:
        if (path / name).is_file():
            return f"it is {kind} ({name}); pass the prepared dataset folder instead"
    return f"create one with `delrec data prepare --out {path}`"


class PreparedDataset:
    """A validated, lazily loaded prepared dataset folder."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self._instances: dict[str, list[Instance]] = {}

    @classmethod
    def load(cls, path: str | Path) -> "PreparedDataset":
        path = Path(path)
        if path.is_file():
            raise DelrecError(f"{path} is a file, expected a dataset folder (the folder holding {META_FILE})")
        if not path.is_dir():
            raise DelrecError(f"{path}: dataset folder not found; create one with `delrec data prepare`")
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise DelrecError(f"{path}: not a prepared dataset (no {META_FILE}); {_what_instead(path)}")
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("kind") != DATASET_KIND:
            raise DelrecError(f"{meta_path}: not a delrec dataset (field 'kind' should be '{DATASET_KIND}')")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DelrecError(
                f"{meta_path}: dataset format version {meta.get('format_version')!r}, this delrec reads "
                f"{FORMAT_VERSION}; re-run `delrec data prepare`"
            )
        names = dataset_files()
        for name in names:
            if not (path / name).is_file():
                raise DelrecError(f"{path}: prepared dataset is missing {name}; re-run `delrec data prepare`")
        found, rows = _fingerprint_and_rows(path, names)
        if found != meta.get("fingerprint"):
            raise DelrecError(
                f"{path}: the dataset files changed since `delrec data prepare` wrote them (content fingerprint "
                f"{found}, {META_FILE} records {meta.get('fingerprint')!r}); re-run `delrec data prepare`"
            )
        _check_counts(meta, meta_path, rows)
        options = meta.get("options")
        num_candidates = options.get("num_candidates") if isinstance(options, dict) else None
        if not is_count(num_candidates) or num_candidates < 1:
            raise DelrecError(f"{where(meta_path, field='options.num_candidates')}: expected a positive integer, "
                              f"found {excerpt(num_candidates, 60)}; re-run `delrec data prepare`")
        return cls(path, meta)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def num_candidates(self) -> int:
        return self.meta["options"]["num_candidates"]

    @cached_property
    def items(self) -> list[dict]:
        file = self.path / ITEMS_FILE
        rows = []
        for line_no, row in read_jsonl(file):
            if not is_count(row.get("id")) or row["id"] != len(rows):
                raise DelrecError(f"{where(file, line_no, 'id')}: expected id {len(rows)} (ids are contiguous from 0)")
            if not isinstance(row.get("title"), str) or not row["title"].strip():
                raise DelrecError(f"{where(file, line_no, 'title')}: expected a non-empty title")
            rows.append(row)
        if not rows:
            raise DelrecError(f"{file}: no items")
        return rows

    @cached_property
    def titles(self) -> list[str]:
        return [row["title"] for row in self.items]

    @property
    def num_items(self) -> int:
        return len(self.items)

    def instances(self, split: str) -> list[Instance]:
        if split not in SPLITS:
            raise DelrecError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
        if split not in self._instances:
            self._instances[split] = self._load_split(split)
        return self._instances[split]

    def _load_split(self, split: str) -> list[Instance]:
        file = self.path / split_file(split)
        n = self.num_items
        result = []
        for line_no, row in read_jsonl(file):
            try:
                history, target = row["history"], row["target"]
                if not isinstance(history, list):
                    raise DelrecError(f"{where(file, line_no, 'history')}: expected a list of item ids, found "
                                      f"{excerpt(history, 60)}")
                if not is_count(row["id"]) or row["id"] != len(result):
                    raise DelrecError(f"{where(file, line_no, 'id')}: expected id {len(result)}")
            except KeyError as exc:
                raise DelrecError(f"{where(file, line_no, exc.args[0])}: missing field") from None
            for value, field in [(target, "target")] + [(h, "history") for h in history]:
                if not is_item_id(value, n):
                    raise DelrecError(
                        f"{where(file, line_no, field)}: item id {value!r} is not in the catalogue (0..{n - 1})"
                    )
            result.append(Instance(row["id"], tuple(history), target, row.get("user")))
        return result

    def candidates(self, split: str) -> list[list[int]]:
        """The fixed candidate lists of `split`, aligned with `instances(split)`."""
        if split not in CANDIDATE_SPLITS:
            raise DelrecError(f"no candidate sets for split '{split}'; they exist for {', '.join(CANDIDATE_SPLITS)}")
        file = self.path / candidates_file(split)
        if not file.is_file():
            raise DelrecError(f"{self.path}: missing {candidates_file(split)}; re-run `delrec data prepare`")
        instances = self.instances(split)
        result = []
        for line_no, row in read_jsonl(file):
            index = len(result)
            if index >= len(instances) or not is_count(row.get("id")) or row["id"] != index:
                raise DelrecError(f"{where(file, line_no, 'id')}: expected id {index} of {len(instances)} instances")
            candidates = row.get("candidates")
            if not isinstance(candidates, list) or instances[index].target not in candidates:
                raise DelrecError(f"{where(file, line_no, 'candidates')}: expected a list holding the target")
            for candidate in candidates:
                if not is_item_id(candidate, self.num_items):
                    raise DelrecError(f"{where(file, line_no, 'candidates')}: item id {candidate!r} is not in the "
                                      f"catalogue (0..{self.num_items - 1})")
            result.append(candidates)
        if len(result) != len(instances):
            raise DelrecError(f"{file}: {len(result)} candidate sets for {len(instances)} {split} instances")
        return result

    def stats(self) -> dict:
        return dict(self.meta["counts"])
