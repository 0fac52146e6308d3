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

from delrec.errors import DelrecError, where
from delrec.io import read_json, read_jsonl

FORMAT_VERSION = 1
DATASET_KIND = "delrec-dataset"
SPLITS = ("train", "valid", "test")
CANDIDATE_SPLITS = ("valid", "test")
META_FILE = "meta.json"
ITEMS_FILE = "items.jsonl"


@dataclass(frozen=True)
class Instance:
    """One prediction task: given `history` (item ids, oldest first), predict `target`."""

    id: int
    history: tuple[int, ...]
    target: int
    user: str | None = None


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
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


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
        found = fingerprint_files(path, names)
        if found != meta.get("fingerprint"):
            raise DelrecError(
                f"{path}: the dataset files changed since `delrec data prepare` wrote them (content fingerprint "
                f"{found}, {META_FILE} records {meta.get('fingerprint')!r}); re-run `delrec data prepare`"
            )
        return cls(path, meta)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def num_candidates(self) -> int:
        return int(self.meta["options"]["num_candidates"])

    @cached_property
    def items(self) -> list[dict]:
        file = self.path / ITEMS_FILE
        rows = []
        for line_no, row in read_jsonl(file):
            if row.get("id") != len(rows):
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
                if row["id"] != len(result):
                    raise DelrecError(f"{where(file, line_no, 'id')}: expected id {len(result)}")
            except KeyError as exc:
                raise DelrecError(f"{where(file, line_no, exc.args[0])}: missing field") from None
            for value, field in [(target, "target")] + [(h, "history") for h in history]:
                if not isinstance(value, int) or not 0 <= value < n:
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
            if index >= len(instances) or row.get("id") != index:
                raise DelrecError(f"{where(file, line_no, 'id')}: expected id {index} of {len(instances)} instances")
            candidates = row.get("candidates")
            if not isinstance(candidates, list) or instances[index].target not in candidates:
                raise DelrecError(f"{where(file, line_no, 'candidates')}: expected a list holding the target")
            result.append(candidates)
        if len(result) != len(instances):
            raise DelrecError(f"{file}: {len(result)} candidate sets for {len(instances)} {split} instances")
        return result

    def stats(self) -> dict:
        return dict(self.meta["counts"])
