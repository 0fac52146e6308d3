"""Instances split over the processes of a launch, written as shards, merged into what one process writes.

`delrec rank` and the LLM modes of `delrec teacher export` run for hours on a real LLM. Both cut their
instances (already sampled, in order) into ranges of the backend's chunk, the instances it answers in one
call anyway, so that any number of processes batches exactly as one process does and the merged files are the
same bytes. Process r of n (RANK of WORLD_SIZE, set by `accelerate launch` / torchrun) takes a contiguous run
of the ranges and writes each, atomically, to OUT/shards/NAME-START-END.SUFFIX with a header: the run's
identity (every option that shapes a row, the dataset and the models by content), the range and the seconds
it took. The main process (rank 0) then waits for every shard, merges them in order into the command's own
files (metrics from the merged rows, so they too are the single-process ones) and removes the folder.

Resume: a process skips its ranges whose shard is on disk, so re-running the same command resumes an
interrupted run, with one process or many, whatever their number before (the ranges follow the chunk, not
the processes). A shard of another run (other options, data or model), a file that is no shard of this run and
a damaged shard are refused in one line naming the file.

No process group: the processes meet only in this folder, the main one polling it. A barrier would time out
(NCCL's default: 10 minutes) while a resumed process with nothing left waits for the others, and a process
group in the process would meet vLLM's own; a process that fails ends the launch (torchrun stops the others).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from delrec.device import LaunchPosition
from delrec.errors import DelrecError
from delrec.io import atomic_write, json_text, loads_json, read_jsonl, safetensors_bytes

SHARDS_DIR = "shards"
FORMAT = "delrec-shard"
FORMAT_VERSION = 1
ROWS, TENSORS = "jsonl", "safetensors"  # a shard of JSON records (one per instance), or of tensors (a row each)
POLL_SECONDS = 1.0
IGNORED_OPTIONS = frozenset({"out", "progress", "prompts_dir"})  # prompts_dir: the template's fingerprint counts
DAMAGED = "the file is damaged: delete it and re-run the same command (its instances are ranked again)"


def run_identity(command: str, dataset_fingerprint: str, configs: Sequence, inputs: dict[str, str | None],
                 **settings) -> dict:
    """What a shard must share with this run to be merged into its output: the command, the dataset, each input
    (`inputs`: option -> path) by content, every option of the `configs` dataclasses but those paths and the ones
    that change how a run shows, not what it writes (`IGNORED_OPTIONS`), and `settings` (a template's fingerprint,
    a resolved mode). Nothing about the processes: a run resumes with any number of them."""
    from delrec.llm.stage_folder import model_fingerprint

    ignored = IGNORED_OPTIONS | {"data", *inputs}
    options = {key: value for config in configs for key, value in asdict(config).items() if key not in ignored}
    contents = {name: None if path is None else model_fingerprint(path) or str(path) for name, path in inputs.items()}
    return {"command": command, "dataset": dataset_fingerprint, "inputs": contents, "options": options, **settings}


@dataclass
class Shard:
    """The results for instances `start` to `end` of a run: JSON `records` (one per instance, each with its "id")
    or `tensors` (a row per instance, "ids" among them); `extra`: JSON the merge adds up (counts)."""

    start: int
    end: int
    records: list[dict] | None = None
    tensors: dict | None = None
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0


class Shards:
    """The shards of one run in OUT/shards: NAME-START-END.SUFFIX, one per range of the run's instances.

    Made before the model loads: a shard already there must be this run's (`identity`), or the command stops."""

    def __init__(self, out: str | Path, name: str, suffix: str, identity: dict, position: LaunchPosition):
        self.folder = Path(out) / SHARDS_DIR
        self.name, self.suffix, self.position = name, suffix, position
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as a header reads back
        self.pattern = re.compile(rf"{re.escape(name)}-(\d+)-(\d+)\.{suffix}")
        self.ranges: list[tuple[int, int]] = []
        self.total = 0
        self.found = self._check_folder()

    def path(self, start: int, end: int) -> Path:
        return self.folder / f"{self.name}-{start}-{end}.{self.suffix}"

    def plan(self, total: int, size: int) -> None:
        """Cut the run's `total` instances into ranges of `size`; each shard on disk must be one of them."""
        ranges = [(start, min(start + size, total)) for start in range(0, total, size)]
        for (start, end), path in self.found.items():
            if (start, end) not in ranges:
                raise DelrecError(f"{path}: instances {start}-{end} are not a shard of this run, which writes "
                                  f"{size} of its {total} instances per shard; {self._remedy()}")
        self.total, self.ranges = total, ranges

    def fill(self, work: Callable[[int, int], Shard], progress: bool, desc: str) -> None:
        """Compute (`work(start, end)`) and write this process's shards that are not on disk yet, in order; the
        progress bar shows on the main process only."""
        count, index = len(self.ranges), self.position.index
        mine = self.ranges[count * index // self.position.count : count * (index + 1) // self.position.count]
        todo = [(start, end) for start, end in mine if not self.path(start, end).is_file()]
        with tqdm(total=sum(end - start for start, end in todo), desc=desc, unit="inst",
                  disable=not (progress and self.position.main)) as bar:
            for start, end in todo:
                began = time.perf_counter()
                shard = work(start, end)
                shard.seconds = time.perf_counter() - began
                self._write(shard)
                bar.update(end - start)

    def collect(self, ids: Sequence[int], progress: bool) -> Iterator[Shard]:
        """Every shard of the run in order, each checked against the instances' `ids`, once all are on disk (the
        other processes' are waited for)."""
        self._wait(progress)
        for start, end in self.ranges:
            yield self._read(start, end, list(ids[start:end]))

    def remove(self) -> None:
        """Remove the folder once the merged output is written."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- files ------------------------------------------------------------------------------------------------

    def _check_folder(self) -> dict[tuple[int, int], Path]:
        """The shards already on disk by range, each checked to be this run's."""
        found = {}
        if not self.folder.is_dir():
            return found
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith("."):  # a shard being written (atomic_write's temp file)
                continue
            match = self.pattern.fullmatch(path.name)
            if match is None or not path.is_file():
                raise DelrecError(f"{path}: not a shard of this command (expected {self.name}-START-END."
                                  f"{self.suffix}); {self._remedy()}")
            self._check_header(path, self._header(path))
            found[(int(match[1]), int(match[2]))] = path
        return found

    def _remedy(self) -> str:
        return f"re-run the command that wrote it to finish that run, or delete {self.folder} to start this one"

    def _header(self, path: Path):
        """The header of a shard, read alone (a shard on disk is checked before the model loads)."""
        if self.suffix == TENSORS:
            return _open_tensors(path)[0]
        with open(path, "rb") as handle:
            first = handle.readline()
        try:
            text = first.decode("utf-8")
        except UnicodeDecodeError:
            raise DelrecError(f"{path}:1: not UTF-8 text; {DAMAGED}") from None
        line = loads_json(text, path, 1) if text.strip() else None
        return line.get("shard") if isinstance(line, dict) else None

    def _check_header(self, path: Path, header) -> None:
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DelrecError(f"{path}: no '{FORMAT}' header; {DAMAGED}")
        if header.get("format_version") != FORMAT_VERSION:
            raise DelrecError(f"{path}: shard format version {header.get('format_version')!r}, expected "
                              f"{FORMAT_VERSION}; {self._remedy()}")
        if header.get("identity") != self.identity:
            raise DelrecError(f"{path}: a shard of another run ({_difference(header.get('identity'), self.identity)});"
                              f" {self._remedy()}")

    def _write(self, shard: Shard) -> None:
        path = self.path(shard.start, shard.end)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "identity": self.identity,
                  "start": shard.start, "end": shard.end, "total": self.total, "seconds": round(shard.seconds, 3),
                  "extra": shard.extra}
        if self.suffix == TENSORS:
            data = safetensors_bytes({key: value.detach().cpu().contiguous() for key, value in shard.tensors.items()},
                                     metadata={"shard": json_text(header, path)})
            with atomic_write(path, "wb") as handle:
                handle.write(data)
            return
        with atomic_write(path) as handle:
            handle.write(json_text({"shard": header}, path, 1) + "\n")
            for line, record in enumerate(shard.records, start=2):
                handle.write(json_text(record, path, line) + "\n")

    def _read(self, start: int, end: int, ids: list[int]) -> Shard:
        path = self.path(start, end)
        if self.suffix == TENSORS:
            header, tensors = _open_tensors(path, with_tensors=True)
            self._check_header(path, header)
            found = tensors["ids"].tolist() if "ids" in tensors else None
            if any(value.shape[:1] != (end - start,) for value in tensors.values()):
                found = None
            shard = Shard(start, end, tensors=tensors)
        else:
            lines = [record for _, record in read_jsonl(path)]
            header = lines[0].get("shard") if lines else None
            self._check_header(path, header)
            shard = Shard(start, end, records=lines[1:])
            found = [record.get("id") for record in shard.records]
        if (header.get("start"), header.get("end")) != (start, end) or found != ids:
            raise DelrecError(f"{path}: does not hold instances {start}-{end} of this run (ids {_excerpt(ids)}); "
                              f"{DAMAGED}")
        extra = header.get("extra")
        shard.extra = extra if isinstance(extra, dict) else {}
        shard.seconds = float(header.get("seconds") or 0.0)
        return shard

    def _wait(self, progress: bool) -> None:
        """Return once every shard is on disk; a process writes its own before it merges, so only the other
        processes' can be missing here."""
        missing = [(start, end) for start, end in self.ranges if not self.path(start, end).is_file()]
        if missing and self.position.count == 1:
            raise DelrecError(f"{self.path(*missing[0])}: written by this run and gone since; re-run the same command")
        if not missing:
            return
        with tqdm(total=len(self.ranges), initial=len(self.ranges) - len(missing), desc="shards of all processes",
                  unit="shard", disable=not progress) as bar:
            while missing:
                time.sleep(POLL_SECONDS)
                left = [(start, end) for start, end in missing if not self.path(start, end).is_file()]
                bar.update(len(missing) - len(left))
                missing = left


def _open_tensors(path: Path, with_tensors: bool = False):
    """(header, tensors or None) of a tensor shard; anything unreadable is a `DelrecError` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get("shard")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else None
    except (SafetensorError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DelrecError(f"{path}: not a readable safetensors file ({reason}); {DAMAGED}") from None
    return (None if text is None else loads_json(text, path)), tensors


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {key: item for name, child in value.items() for key, item in _flat(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


def _difference(recorded, current: dict) -> str:
    """The first setting (by name) whose value differs, as `name: 'there', not 'here'`."""
    old, new = _flat(recorded if isinstance(recorded, dict) else {}), _flat(current)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {_excerpt(old.get(key))} there, {_excerpt(new.get(key))} here"
    return "the same settings"


def _excerpt(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}..."
