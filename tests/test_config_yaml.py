"""Every YAML file delrec reads goes through one strict loader (`delrec.config.StrictLoader`).

A few hundred bytes of aliases ("billion laughs") are refused at once with a short message instead
of expanding to a billion values and an 80 MB error; a duplicate key is refused with its file and
line instead of silently overriding the first; and no error echoes more than a few hundred
characters of a value it found. Configs, pipeline configs, domains.yaml and template headers all
follow the rule, through the CLI too.
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import pytest

from delrec import prompts
from delrec.cli import main
from delrec.config import MAX_ALIAS_VALUES, load_yaml, parse_yaml
from delrec.errors import DelrecError

REPO = Path(__file__).resolve().parents[1]
BILLION_LAUGHS = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""  # 9**9 = 387 million "lol"s in 342 bytes


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(DelrecError) as info:
        load_yaml(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


def one_short_line(err: str, limit: int = 400) -> str:
    assert err.count("\n") == 1 and len(err) < limit, err
    return err


# ----------------------------------------------------------------------------- aliases


def test_the_billion_laughs_fails_fast_with_a_short_message_and_bounded_memory(tmp_path):
    bomb = write(tmp_path / "bomb.yaml", BILLION_LAUGHS)
    assert bomb.stat().st_size < 400
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    message = error_of(bomb)
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB
    assert message.startswith(f"{bomb}:5: invalid YAML (aliases (*name) expand to more than {MAX_ALIAS_VALUES:,}")


@pytest.mark.parametrize("command", ["sr train --config", "student train --config", "run"])
def test_cli_refuses_the_billion_laughs_with_exit_2_and_one_short_line(tmp_path, capsys, command):
    bomb = write(tmp_path / "bomb.yaml", BILLION_LAUGHS)
    assert main([*command.split(), str(bomb)]) == 2
    assert "bomb.yaml:5: invalid YAML (aliases" in one_short_line(capsys.readouterr().err)


def test_prompt_files_refuse_alias_bombs(tmp_path, capsys):
    folder = shutil.copytree(REPO / "delrec" / "prompts" / "templates", tmp_path / "prompts")
    write(folder / "domains.yaml", BILLION_LAUGHS)
    assert main(["prompts", "list", "--prompts_dir", str(folder)]) == 2
    assert "domains.yaml:5: invalid YAML (aliases" in one_short_line(capsys.readouterr().err)

    folder = shutil.copytree(REPO / "delrec" / "prompts" / "templates", tmp_path / "again")
    text = (folder / "plain.jinja").read_text(encoding="utf-8")
    header = "".join(f"x{i}: &x{i} [" + ",".join([f"*x{i - 1}" if i else "1"] * 9) + "]\n" for i in range(9))
    write(folder / "plain.jinja", text.replace("task: plain\n", "task: plain\n" + header))
    problems = prompts.lint(folder)
    assert len(problems) == 1 and "plain.jinja:7: invalid header YAML (aliases" in problems[0], problems


def test_aliases_within_reason_and_merge_keys_still_load(tmp_path):
    config = write(tmp_path / "c.yaml", "base: &base {lr: 0.1, epochs: 2}\nsr:\n  <<: *base\n  lr: 0.5\nalso: *base\n")
    assert load_yaml(config) == {"base": {"lr": 0.1, "epochs": 2}, "sr": {"lr": 0.5, "epochs": 2},
                                 "also": {"lr": 0.1, "epochs": 2}}
    items = ", ".join(["x"] * (MAX_ALIAS_VALUES // 2 - 1))
    assert len(load_yaml(write(tmp_path / "d.yaml", f"a: &a [{items}]\nb: *a\n"))["b"]) == MAX_ALIAS_VALUES // 2 - 1


@pytest.mark.parametrize("text, fact", [
    ("a: &a [1, *a]\n", "c.yaml:1: invalid YAML (alias *a refers to the value that contains it)"),
    ("a: " + "[" * 200 + "]" * 200 + "\n", "c.yaml:1: invalid YAML (nested more than 100 levels deep)"),
    ("a: 1\nb: *nope\n", "c.yaml:2: invalid YAML (found undefined alias 'nope')"),
    ("a: 1\nb: 2001-13-14\n", "c.yaml:2: invalid YAML ('2001-13-14' cannot be read as timestamp (month must be in "
                              "1..12); quote it to keep it as text)"),
    ("a: " + "1" * 5000 + "\n", "c.yaml:1: invalid YAML ('1111111111111111111111111111111111111111... (5,000 "
                                "characters)' cannot be read as int"),
])
def test_bad_aliases_nesting_and_unreadable_values_are_one_line_errors(tmp_path, text, fact):
    assert fact in error_of(write(tmp_path / "c.yaml", text))


# ----------------------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize("text, fact", [
    ("epochs: 1\nlr: 0.1\nepochs: 2\n", "c.yaml:3: invalid YAML (duplicate key 'epochs' (first at line 1)"),
    ("sr:\n  lr: 0.1\n  lr: 0.2\n", "c.yaml:3: invalid YAML (duplicate key 'lr' (first at line 2)"),
    ("1: a\n1.0: b\n", "c.yaml:2: invalid YAML (duplicate key 1.0 (first at line 1)"),
])
def test_duplicate_keys_are_refused_with_file_and_line(tmp_path, text, fact):
    assert fact in error_of(write(tmp_path / "c.yaml", text))


def test_cli_refuses_a_duplicate_key_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    config = write(tmp_path / "sr.yaml", f"data: {tmp_path / 'd'}\nmodel: sasrec\nout: {out}\nepochs: 1\nepochs: 50\n")
    assert main(["sr", "train", "--config", str(config)]) == 2
    assert "sr.yaml:5: invalid YAML (duplicate key 'epochs' (first at line 4)" in one_short_line(
        capsys.readouterr().err)
    assert not out.exists()
    pipeline = write(tmp_path / "pipeline.yaml", (REPO / "delrec/configs/demo.yaml").read_text(encoding="utf-8")
                     + "seed: 1\nseed: 2\n")
    assert main(["run", str(pipeline)]) == 2
    assert "pipeline.yaml:" in one_short_line(capsys.readouterr().err)


def test_prompt_files_refuse_duplicate_keys(tmp_path, capsys):
    folder = shutil.copytree(REPO / "delrec" / "prompts" / "templates", tmp_path / "prompts")
    text = (folder / "plain.jinja").read_text(encoding="utf-8")
    write(folder / "plain.jinja", text.replace("requires_soft_prompt: false\n",
                                               "requires_soft_prompt: false\nrequires_soft_prompt: true\n"))
    domains = (folder / "domains.yaml").read_text(encoding="utf-8")
    write(folder / "domains.yaml", domains + "movie:\n  item_noun: film\n")
    problems = prompts.lint(folder)
    assert any("domains.yaml:" in p and "duplicate key 'movie' (first at line" in p for p in problems), problems
    write(folder / "domains.yaml", domains)
    problems = prompts.lint(folder)
    assert problems == [f"{folder / 'plain.jinja'}:5: invalid header YAML (duplicate key 'requires_soft_prompt' "
                        "(first at line 4); each key may appear once)"]
    assert main(["prompts", "list", "--prompts_dir", str(folder)]) == 2
    assert "plain.jinja:5: invalid header YAML (duplicate key" in one_short_line(capsys.readouterr().err)


def test_every_shipped_yaml_file_reads_with_the_strict_loader():
    files = [*REPO.glob("configs/*/*.yaml"), *REPO.glob("delrec/configs/*.yaml"), REPO / "delrec" / "prompts" / "templates" / "domains.yaml"]
    assert len(files) > 20
    for path in files:
        assert isinstance(parse_yaml(path.read_text(encoding="utf-8"), path), dict), path


# ----------------------------------------------------------------------------- what an error echoes


@pytest.mark.parametrize("text, fact", [
    ("lr: " + "x" * 100_000 + "\n", "key 'lr' expects float, got 'xxxx"),
    ("x" * 1000 + ": 1\n", "unknown key 'xxxx"),  # YAML allows keys of up to 1024 characters
    ("epochs: [" + ", ".join(["1"] * 2000) + "]\n", "key 'epochs' expects a single int, got [1, 1,"),
    ("model: [" + ", ".join(["sasrec"] * 2000) + "]\n", "key 'model' expects a single value, got ['sasrec',"),
])
def test_an_error_echoes_at_most_a_few_hundred_characters_of_a_value(tmp_path, capsys, text, fact):
    config = write(tmp_path / "big.yaml", text)
    assert main(["sr", "train", "--config", str(config)]) == 2
    err = one_short_line(capsys.readouterr().err, 700)  # an unknown key's message also lists the valid keys
    assert fact in err and "x" * 201 not in err


def test_every_one_line_error_is_cut_to_a_thousand_characters_saying_how_long_it_was():
    """The backstop behind the 200-character excerpts: a message that quotes a huge value anyway stays short."""
    from delrec.errors import MAX_MESSAGE

    message = str(DelrecError("x.yaml: bad value " + "ab \n" * 100_000))
    assert "\n" not in message and len(message) < MAX_MESSAGE + 40
    assert message.startswith("x.yaml: bad value ab ab") and message.endswith("... (300,017 characters)")
