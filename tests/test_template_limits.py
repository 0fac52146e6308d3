"""Templates render in a sandbox with bounded work and text-only output (delrec/prompts/sandbox.py).

A runaway template (a loop of 10**12 steps, a text repeated 10**9 times, a macro calling itself)
stops within about a second with one line naming the file, its line and the limit; a template
that would print a Python repr (`['A', 'B']`, `None`, `<generator ...>`) or an undefined value
fails its render and `delrec prompts lint` instead of putting it into training data.
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import pytest

from delrec import prompts
from delrec.cli import main
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.errors import DelrecError
from delrec.prompts.sandbox import MAX_STEPS

SHIPPED = Path(__file__).resolve().parents[1] / "delrec" / "prompts" / "templates"
ANCHOR = "{{ history | numbered }}\n"  # a line of the shipped plain.jinja; test lines go right after it
VALUES = {"history": ["Alpha", "Beta"], "candidates": ["Gamma"], "target": "Gamma"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    raw = make_synthetic(num_users=12, num_items=20, min_length=4, max_length=6, seed=3)
    return prepare_dataset(raw, PreprocessConfig(num_candidates=4), tmp_path_factory.mktemp("limits") / "d")


def folder_with(tmp_path: Path, line: str) -> tuple[Path, int]:
    """A copy of the shipped templates whose plain.jinja has `line` added to its prompt block, and that line's number."""
    folder = shutil.copytree(SHIPPED, tmp_path / "prompts")
    text = (folder / "plain.jinja").read_text(encoding="utf-8")
    assert ANCHOR in text
    (folder / "plain.jinja").write_text(text.replace(ANCHOR, ANCHOR + line + "\n"), encoding="utf-8")
    return folder, text[: text.index(ANCHOR)].count("\n") + 2


def render_error(folder: Path) -> str:
    with pytest.raises(DelrecError) as info:
        prompts.get_template("plain", folder).render(VALUES)
    message = str(info.value)
    assert "\n" not in message and len(message) < 500
    return message


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- work


RUNAWAY = {
    "loop-of-10**12": ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100) %}"
                       "{% endfor %}{% endfor %}{% endfor %}", f"more than {MAX_STEPS:,} steps"),
    "macro-fan-out-2**60": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                            "{{ f(60) }}", f"more than {MAX_STEPS:,} steps"),
    "macro-calling-itself": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "calls nest too deeply"),
    "output-of-10**8-characters": ("{% for i in range(100000) %}{{ '0123456789' * 100 }}{% endfor %}",
                                   "prompt block: its text reaches 1,000,"),
    "text-repeated-10**9-times": ("{{ 'x' * 1000000000 }}", "'*' would build 1,000,000,000 characters"),
    "width-of-10**9": ("{{ 'x' | center(1000000000) }}", "filter 'center' got the number 1000000000"),
    "power-tower": ("{{ 10 ** 100000000 }}", "'**' would build a number of"),
    "replace-amplifier": ("{{ ('x' * 100000) | replace('x', 'y' * 1000) }}",
                          "filter 'replace' would build 100,000,000 characters"),
    "doubling-through-a-namespace": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                                     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "'~' joins a value of"),
    "format-width-of-10**8": ("{{ '%0100000000d' % 1 }}", "width of a million or more"),
    "scan-in-a-loop": ("{% set big = range(100000) | list %}{% for i in range(100000) %}{% if i in big %}{% endif %}"
                       "{% endfor %}", "characters or items through filters"),
    "padding-method": ("{{ history[0].ljust(1000) }}", "text method 'ljust' is not available"),
}


@pytest.mark.parametrize("case", list(RUNAWAY))
def test_a_runaway_template_stops_fast_with_one_line(tmp_path, case):
    line, fact = RUNAWAY[case]
    folder, number = folder_with(tmp_path, line)
    before, start = peak_memory_mb(), time.monotonic()
    message = render_error(folder)
    assert time.monotonic() - start < 10, "the limits must stop it within seconds"
    assert peak_memory_mb() - before < 200, "and before it takes the memory"
    assert f"plain.jinja:{number}:" in message and fact in message, message


NUMBERS = {  # Python would write none of these (or fail with its own advice, `sys.set_int_max_str_digits()`)
    "ten-to-the-100000": ("{{ 10**100000 }}", "'**' would build a number of more than 1,000 digits"),
    "a-product-of-long-numbers": ("{{ (10**900) * (10**900) }}", "'*' would build a number of more than 1,000 digits"),
    "a-sum-one-digit-too-long": ("{{ 10**999 + 9 * 10**999 }}", "'+' built a number of more than 1,000 digits"),
    "a-long-number-formatted": ("{{ '%d' % (10**600 * 10**600) }}", "'*' would build a number of more than"),
    "a-5000-digit-literal": ("{{ " + "9" * 5000 + " }}", "syntax error: a number of more than 1,000 digits"),
    "long-text-made-a-number": ("{{ ('9' * 5000) | int }}", "filter 'int' got a number of more than 1,000 digits"),
    "a-float-overflow": ("{{ 10.0 ** 400 }}", "'**' overflows: its result is beyond the largest float"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_a_number_too_long_for_a_prompt_is_refused_with_the_sandbox_s_own_message(tmp_path, case):
    line, fact = NUMBERS[case]
    folder, number = folder_with(tmp_path, line)
    message = render_error(folder)
    assert f"plain.jinja:{number}:" in message and fact in message, message
    assert "set_int_max_str_digits" not in message and "4300" not in message


def test_a_number_of_1000_digits_still_prints(tmp_path):
    folder, _ = folder_with(tmp_path, "{{ 10**999 }}|{{ 2**0.5 }}")
    assert f"1{'0' * 999}|1.414" in prompts.get_template("plain", folder).render(VALUES).prompt


def test_cli_render_and_lint_of_the_10_to_the_12_loop_exit_2_with_one_short_line(tmp_path, dataset, capsys):
    folder, number = folder_with(tmp_path, RUNAWAY["loop-of-10**12"][0])
    start = time.monotonic()
    assert main(["prompts", "render", "plain", "--data", str(dataset.path), "--prompts_dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400 and f"plain.jinja:{number}:" in err and "steps" in err
    assert main(["prompts", "lint", "--prompts_dir", str(folder)]) == 2
    captured = capsys.readouterr()
    assert f"plain.jinja:{number}:" in captured.out and "steps" in captured.out
    assert captured.err.count("\n") == 1 and len(captured.err) < 600
    assert time.monotonic() - start < 20


def test_real_template_constructs_still_render(tmp_path):
    """Loops, filters, formatting and indexing that a prompt needs are untouched by the limits."""
    line = ("{% for title in history %}{{ loop.index }}) {{ title | upper }}{% if not loop.last %}; {% endif %}"
            "{% endfor %} | {{ history | join(', ') }} | {{ '%d seen' | format(history | length) }} | {{ history[-1] }}"
            " | {{ history | map('lower') | join('/') }} | {{ history[0] ~ '!' }} | {{ 'n=%s' % history | length }}"
            "{% if 'Beta' in history %} | has Beta{% endif %} | {{ history[:1] | join }}")
    folder, _ = folder_with(tmp_path, line)
    prompt = prompts.get_template("plain", folder).render(VALUES).prompt
    assert ("1) ALPHA; 2) BETA | Alpha, Beta | 2 seen | Beta | alpha/beta | Alpha! | n=2 | has Beta | Alpha\n"
            in prompt)


# ----------------------------------------------------------------------------- reprs and undefined values


NOT_TEXT = {
    "a-list": ("{{ history }}", "prints list ['"),
    "a-generator": ("{{ history | map('upper') }}", "prints generator <generator object"),
    "an-iterator": ("{{ history | reverse }}", "prints list_reverseiterator"),
    "none": ("{{ none }}", "prints NoneType None"),
    "a-truth-value": ("{{ history | length > 1 }}", "prints bool True"),
    "a-list-made-text": ("{{ history | string }}", "filter 'string' got list ['"),
    "a-list-through-a-text-filter": ("{{ history | upper }}", "filter 'upper' got list"),
    "a-list-joined-with-tilde": ("{{ 'Seen: ' ~ history }}", "'~' joins list ['"),
    "a-list-formatted": ("{{ 'Seen: %s' % history }}", "'%' formatting got list"),
    "none-formatted": ("{{ 'Seen: %s' | format(none) }}", "filter 'format' got NoneType None"),
    "str-format": ("{{ 'Seen: {}'.format(history) }}", "text method 'format' is not available"),
    "methods-joined": ("{{ history | join(', ', attribute='upper') }}", "filter 'join' got the item"),
    "nested-lists-numbered": ("{{ history | batch(1) | numbered }}", "filter 'numbered' got the item list ['"),
    "an-undefined-attribute": ("{{ history.first_title }}", "'list object' has no attribute 'first_title'"),
    "an-undefined-in-a-list": ("{{ [history.first_title] }}", "prints list [Undefined]"),
    "an-undefined-through-a-filter": ("{{ history.first_title | upper }}", "has no attribute 'first_title'"),
    "an-undefined-joined": ("{{ 'x' ~ history.first_title }}", "has no attribute 'first_title'"),
}


@pytest.mark.parametrize("case", list(NOT_TEXT))
def test_a_repr_or_undefined_fails_render_and_lint(tmp_path, case):
    line, fact = NOT_TEXT[case]
    folder, number = folder_with(tmp_path, line)
    message = render_error(folder)
    assert f"plain.jinja:{number}:" in message and fact in message, message
    problems = prompts.lint(folder)
    assert len(problems) == 1 and f"plain.jinja:{number}:" in problems[0] and fact in problems[0], problems


def test_the_repr_filter_is_gone_and_an_unknown_filter_is_a_lint_problem(tmp_path):
    for line, name in (("{{ history | pprint }}", "pprint"), ("{{ history | numberd }}", "numberd")):
        folder, number = folder_with(tmp_path / name, line)
        problems = prompts.lint(folder)
        assert problems == [f"{folder / 'plain.jinja'}:{number}: syntax error: No filter named '{name}'."]


def test_cli_render_and_lint_of_a_printed_list_exit_2(tmp_path, dataset, capsys):
    folder, number = folder_with(tmp_path, "{{ candidates }}")
    assert main(["prompts", "render", "plain", "--data", str(dataset.path), "--prompts_dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 500 and f"plain.jinja:{number}: prompt block: prints list [" in err
    assert main(["prompts", "lint", "--prompts_dir", str(folder)]) == 2
    captured = capsys.readouterr()
    assert f"plain.jinja:{number}: prompt block: prints list ['Sample Title" in captured.out
    assert captured.err.count("\n") == 1
