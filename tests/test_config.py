"""Config dataclasses -> YAML + CLI flags, strictly validated."""

import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from delrec.cli import COMMANDS, main
from delrec.config import dataclass_from_dict, parse_command
from delrec.errors import DelrecError


@dataclass
class TrainArgs:
    out: str = field(metadata={"help": "output folder"})
    epochs: int = field(default=3, metadata={"help": "epochs"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    loss: Literal["ce", "bce"] = field(default="ce", metadata={"help": "loss"})
    ks: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "cut-offs"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle"})
    limit: int | None = field(default=200, metadata={"help": "at most this many (none: all)"})


def parse(argv):
    return parse_command([TrainArgs], argv, prog="delrec test")[0]


def test_flags_and_defaults():
    args = parse(["--out", "x", "--epochs", "5", "--no-shuffle"])
    assert (args.out, args.epochs, args.lr, args.shuffle, args.ks) == ("x", 5, 1e-3, False, [1, 5])


@pytest.mark.parametrize("text, expected", [("7", 7), ("none", None), ("None", None), ("null", None)])
def test_an_optional_option_takes_none_as_a_flag_and_in_yaml(tmp_path, text, expected):
    assert parse(["--out", "x", "--limit", text]).limit == expected
    config = tmp_path / "c.yaml"
    config.write_text(f"out: x\nlimit: {text}\n")
    assert parse(["--config", str(config)]).limit == expected


def test_yaml_sets_values_and_flags_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("out: runs/a\nepochs: 7\nlr: 1e-4\nloss: bce\nks: [10, 20]\nshuffle: false\n")
    args = parse(["--config", str(config), "--epochs", "2"])
    assert (args.out, args.epochs, args.lr, args.loss, args.ks, args.shuffle) == ("runs/a", 2, 1e-4, "bce", [10, 20], False)


@pytest.mark.parametrize(
    "text, message",
    [
        ("out: x\nepoch: 3\n", r"c.yaml: unknown key 'epoch'; did you mean 'epochs'\?"),
        ("out: x\nepochs: 2.5\n", r"key 'epochs' expects an integer, got 2.5"),
        ("out: x\nlimit: 2.5\n", r"key 'limit' expects an integer, got 2.5"),
        ("out: x\nlimit: true\n", r"key 'limit' expects int or none, got True"),
        ("out: x\nlimit: all\n", r"key 'limit' expects int or none, got 'all'"),
        ("out: x\nlr: fast\n", r"key 'lr' expects float, got 'fast'"),
        ("out: x\nloss: mse\n", r"key 'loss' must be one of ce, bce, got 'mse'"),
        ("- a\n- b\n", r"expected a mapping"),
        ("out: [x\n", r"c.yaml:\d+: invalid YAML"),
    ],
)
def test_bad_config_files_name_file_and_key(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(DelrecError, match=message):
        parse(["--config", str(config)])


def test_missing_config_file_and_bad_flag(tmp_path, capsys):
    with pytest.raises(DelrecError, match="config file not found"):
        parse(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        parse(["--out", "x", "--epochs", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--epochs" in err and "invalid int value" in err


def test_dataclass_from_dict_is_strict():
    assert dataclass_from_dict(TrainArgs, {"out": "y", "epochs": 1}, "config.json").epochs == 1
    with pytest.raises(DelrecError, match="config.json: unknown key 'lrr'; did you mean 'lr'"):
        dataclass_from_dict(TrainArgs, {"out": "y", "lrr": 1}, "config.json")


@pytest.mark.parametrize("load, expected", [(0.0, 2), (0.6, 1), (1.0, 1), (7.5, 1)])
def test_the_console_script_starts_with_one_thread_per_free_core(load, expected, monkeypatch):
    import delrec.cli as cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(cli, "main", lambda: int(os.environ["OMP_NUM_THREADS"]))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli.console_main() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert cli.console_main() == 3


@pytest.mark.parametrize("command", [" ".join(key) for key in COMMANDS])
def test_every_commands_help_prints_and_exits_0(command, capsys):
    """Help texts are prose: a "%" in one (e.g. "94.0% of instances") must print, not crash argparse's formatting."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
