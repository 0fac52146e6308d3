"""The JSON headers that say what a delrec folder or file is, validated by one small schema.

Four artefacts carry one: a teacher folder (`teacher.json`), a predictions file (its
`FILE.meta.json` sidecar), a DELRec LLM folder (`delrec.json`) and an SR model folder
(`config.json`). Each names its kind, a format version and, where it was made for one dataset,
that dataset's fingerprint; every reader checks the same things in the same words, so a user who
passes the wrong folder learns what it is and what to re-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from delrec.errors import DelrecError
from delrec.io import read_json


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class FieldRule:
    """A required field: `accepts(value)` must hold; `expected` says what it should be, for the error."""

    accepts: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True)
class Header:
    """One artefact's header: which field names its kind, the version this delrec reads, how to remake it.

    `kind_field=None` when another field tells the kind (an SR config's `model_type` is checked by
    the model registry, which knows the valid names).
    """

    description: str  # what the file is, for messages: "teacher description"
    kind_field: str | None
    kind: str | None
    version: int
    remedy: str  # what to do about a wrong version: "re-export the teacher"
    version_label: str = "format version"  # how the version is named in messages
    fields: dict[str, FieldRule] = field(default_factory=dict)

    def read(self, path: str | Path) -> dict[str, Any]:
        """The header at `path`, validated."""
        return self.validate(read_json(path), path)

    def validate(self, data: Any, path: str | Path) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise DelrecError(f"{path}: not a {self.description} (expected a JSON object)")
        if self.kind_field is not None and data.get(self.kind_field) != self.kind:
            raise DelrecError(f"{path}: not a {self.description} (field '{self.kind_field}' should be '{self.kind}')")
        version = data.get("format_version")
        if version is not None and not positive_int(version):
            raise DelrecError(f"{path}: field 'format_version' must be a positive integer, got {version!r}")
        if version != self.version:
            raise DelrecError(f"{path}: {self.version_label} {data.get('format_version')!r}, this delrec reads "
                              f"{self.version}; {self.remedy}")
        for name, rule in self.fields.items():
            if not rule.accepts(data.get(name)):
                raise DelrecError(f"{path}: field '{name}' must be {rule.expected}, got {data.get(name)!r}")
        return data


ALLOW_OTHER_DATASET_HELP = ("Use the model on a dataset other than the one it was fine-tuned on (a transfer "
                            "experiment); without it that is refused, since item titles and candidates would not be "
                            "the trained ones.")


def check_dataset(data: dict[str, Any], path: str | Path, dataset, made: str, remedy: str) -> None:
    """Refuse a header made for another dataset: `made` says what was made ("predictions were made")."""
    if data.get("dataset_fingerprint") != dataset.fingerprint:
        raise DelrecError(f"{path}: {made} on dataset {data.get('dataset_fingerprint')}, not on {dataset.path} "
                          f"(fingerprint {dataset.fingerprint}); {remedy}")


def check_split(data: dict[str, Any], path: str | Path, expected: str, what: str, remedy: str = "") -> None:
    """Refuse a header for another split; `what` names the artefact ("holds predictions")."""
    if data.get("split") != expected:
        tail = f"; {remedy}" if remedy else ""
        raise DelrecError(f"{path}: {what} for split {data.get('split')!r}, expected {expected!r}{tail}")


# The SR model folder's config.json (delrec.sr.base writes it; delrec.llm.hybrid reads the item table beside it,
# which the layering keeps from importing delrec.sr). The kind is the registered model_type, checked against the
# model registry, so no kind field here.
SR_MODEL_FORMAT_VERSION = 1
SR_MODEL_CONFIG_FILE = "config.json"
SR_MODEL_WEIGHTS_FILE = "model.safetensors"
SR_MODEL_HEADER = Header("delrec SR model config", None, None, SR_MODEL_FORMAT_VERSION,
                         "retrain the model with this version of delrec", version_label="SR model format version",
                         fields={"num_items": FieldRule(positive_int, "a positive integer")})
