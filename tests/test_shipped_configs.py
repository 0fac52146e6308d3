"""Every config file the repository ships loads into its command's dataclasses with every key kept.

Each file is parsed by the same class lists the commands use (`train_classes`, `export_classes`,
...), so a renamed option, a value a dataclass refuses, or a key that silently lands nowhere fails here
instead of in a user's run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from delrec.cli import llm, serve, sr, student, teacher
from delrec.config import build_parser, parse_command

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def command_classes(path: Path) -> list[type]:
    argv = ["--config", str(path)]
    kind = path.parent.name
    if kind == "sr":
        return sr.train_classes(argv)
    if kind == "delrec":
        return llm.finetune_classes() if "finetune" in path.name else llm.distill_classes()
    if kind == "distill":
        return student.train_classes(argv) if path.name.startswith("student") else teacher.export_classes(argv)
    if kind == "serve":
        return [serve.ServeArguments]
    raise AssertionError(f"no command known for {path}")


COMMAND_CONFIGS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "pipeline")


def test_every_shipped_config_folder_is_covered():
    assert {p.parent.name for p in CONFIGS.glob("*/*.yaml")} == {"sr", "delrec", "distill", "serve", "pipeline"}
    assert len(COMMAND_CONFIGS) >= 20


@pytest.mark.parametrize("path", COMMAND_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates_into_its_dataclasses_with_every_key(path):
    classes = command_classes(path)
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    # the options a run gives on the command line (`--data DATA --out DIR`), never a key of the file
    missing = [a.option_strings[0] for a in build_parser(classes, "x")._actions if a.required and a.dest not in written]
    argv = ["--config", str(path)] + [part for flag in missing for part in (flag, "given-on-the-command-line")]
    parsed = parse_command(classes, argv, "x")
    values = {k: v for config in parsed for k, v in dataclasses.asdict(config).items()}
    for key, value in written.items():
        assert key in values, f"{path}: key '{key}' reaches no dataclass"
        assert values[key] == value or values[key] == [value], f"{path}: {key} is {values[key]!r}, the file says {value!r}"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("pipeline/*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_config_validates_every_stage(path):
    from delrec.pipeline import load_config

    config = load_config(path)
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    compared = 0
    for stage, section in config.sections.items():
        fields = {k: v for values in section.describe().values() for k, v in values.items()}
        for key, value in (written.get(stage) or {}).items():
            if isinstance(value, (str, int, float, bool)) and key in fields:
                assert fields[key] == value, f"{path}: {stage}.{key} is {fields[key]!r}, the file says {value!r}"
                compared += 1
    assert compared >= 5
