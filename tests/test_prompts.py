"""Prompt templates: the shipped templates lint clean, render correctly, and bad templates fail clearly."""

import shutil
from pathlib import Path

import pytest

from delrec import prompts
from delrec.cli import main
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.errors import DelrecError
from delrec.llm.loading import load_tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "delrec" / "prompts" / "templates"  # the checkout's templates
SOFT = prompts.soft_prompt_placeholder(4)

GOOD_HEADER = """{# delrec
task: lsr
description: test template
requires_soft_prompt: true
variables: [history, candidates, soft_prompt, item_noun, target]
#}
"""
GOOD_BODY = """{% block prompt %}
Pattern: {{ soft_prompt }}
History of {{ item_noun }}s:
{{ history | numbered }}
Candidates:
{{ candidates | numbered }}
{% endblock %}
{% block completion %}
{{ target }}
{% endblock %}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    raw = make_synthetic(num_users=30, num_items=50, seed=1)
    return prepare_dataset(raw, PreprocessConfig(num_candidates=6), tmp_path_factory.mktemp("prompts") / "d")


def folder_with(tmp_path, name, text, keep_shipped=False):
    """A template folder holding the shipped domains.yaml (and optionally templates) plus `name`."""
    folder = tmp_path / "p"
    if keep_shipped:
        shutil.copytree(SHIPPED, folder)
    else:
        folder.mkdir(parents=True)
        shutil.copy(SHIPPED / prompts.DOMAINS_FILE, folder / prompts.DOMAINS_FILE)
    (folder / name).write_text(text, encoding="utf-8")
    return folder


def error_of(folder, name="bad"):
    with pytest.raises(DelrecError) as info:
        prompts.get_template(name, folder)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- shipped templates


def test_shipped_prompts_lint_clean(dataset):
    assert prompts.lint(SHIPPED) == []
    assert prompts.lint(SHIPPED, dataset=dataset, max_length=4000) == []
    names = [t.name for t in prompts.list_templates(SHIPPED)]
    assert set(prompts.TASKS) <= set(names)


def test_default_folder_and_env_override(tmp_path, monkeypatch):
    monkeypatch.delenv(prompts.ENV_VAR, raising=False)
    assert prompts.prompts_dir() == SHIPPED and (SHIPPED / prompts.DOMAINS_FILE).is_file()
    monkeypatch.setenv(prompts.ENV_VAR, str(tmp_path))
    assert prompts.prompts_dir() == tmp_path
    monkeypatch.setenv(prompts.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(DelrecError, match=prompts.ENV_VAR):
        prompts.prompts_dir()


@pytest.mark.parametrize("name", list(prompts.TASKS))
def test_each_template_renders_instance_in_order(dataset, name):
    template = prompts.get_template(name, SHIPPED)
    values, _ = prompts.preview_variables(template, dataset, "test", 2, soft_prompt=SOFT)
    out = template.render(values, "item")
    assert out.prompt.endswith("Answer:\n") and out.prompt.count("\n\n") == 0
    assert out.completion == values["target"] and out.completion not in out.prompt.split("Answer:")[-1]

    def positions(titles):
        found = [out.prompt.index(f"{i}. {title}\n") for i, title in enumerate(titles, start=1)]
        assert found == sorted(found)

    positions(values["history"])
    if "candidates" in values:
        positions(values["candidates"])
    if template.requires_soft_prompt:
        assert out.prompt.count(SOFT) == 1
        assert out.prompt[slice(*out.soft_span)] == SOFT
        assert f"model is: {SOFT}\n" in out.prompt  # fixed text on both sides of the slot
        assert out.prompt.count("<|sp:") == 4
    else:
        assert out.soft_span is None and "<|sp:" not in out.prompt
    # identical on every call; the serving form is the training prompt without its completion
    assert template.render(values, "item") == out
    serving = {k: v for k, v in values.items() if k != "target"}
    assert template.render(serving, "item", with_completion=False).prompt == out.prompt


def test_lsr_shows_real_instance(dataset):
    inst = dataset.instances("test")[0]
    values, _ = prompts.preview_variables(prompts.get_template("lsr", SHIPPED), dataset, "test", 0, soft_prompt=SOFT)
    assert values["history"] == [dataset.titles[i] for i in inst.history]
    assert values["candidates"] == [dataset.titles[i] for i in dataset.candidates("test")[0]]
    assert values["target"] == dataset.titles[inst.target]


def test_ta_and_rps_answers(dataset):
    ta = prompts.get_template("ta", SHIPPED)
    values, _ = prompts.preview_variables(ta, dataset, "test", 0, soft_prompt=SOFT)
    history = [dataset.titles[i] for i in dataset.instances("test")[0].history]
    assert values["target"] == history[-1]  # the hidden most recent item
    assert values["example_history"] + [values["example_recent"]] + values["history"] + [values["target"]] == history
    out = ta.render(values)
    assert out.completion == history[-1] and f"{len(values['history'])}. {history[-2]}\n" in out.prompt

    rps = prompts.get_template("rps", SHIPPED)
    values, _ = prompts.preview_variables(rps, dataset, "test", 0, soft_prompt=SOFT, predictions=[5, 9, 7, 3, 1])
    seen = set(dataset.instances("test")[0].history)
    ranked = [dataset.titles[i] for i in [5, 9, 7, 3, 1] if i not in seen]
    assert values["target"] == ranked[0] and values["sr_predictions"] == ranked[1:3]  # ranks 2..h, h = 3
    assert set(ranked[:3]) <= set(values["candidates"])
    empty = rps.render({**values, "sr_predictions": []})
    assert "ranks these candidates next" not in empty.prompt and "\n\n" not in empty.prompt


def test_domain_changes_wording_without_second_template(dataset):
    template = prompts.get_template("lsr", SHIPPED)
    values, _ = prompts.preview_variables(template, dataset, "test", 0, soft_prompt=SOFT)
    game = template.render(values, "game").prompt
    movie = template.render(values, "movie").prompt
    item = template.render(values).prompt
    assert "Candidate games:" in game and "play next" in game and "has played" in game
    assert "Candidate movies:" in movie and "watch next" in movie
    assert "Candidate items:" in item
    assert game.replace("game", "X").replace("play", "V") == movie.replace("movie", "X").replace("watch", "V")
    assert len(list(SHIPPED.glob("*.jinja"))) == len(prompts.template_names(SHIPPED))
    with pytest.raises(DelrecError, match="unknown domain 'film'.*movie"):
        template.render(values, "film")


def test_render_errors_name_template_and_variable(dataset):
    template = prompts.get_template("lsr", SHIPPED)
    values, _ = prompts.preview_variables(template, dataset, "test", 0, soft_prompt=SOFT)
    missing = {k: v for k, v in values.items() if k != "candidates"}
    with pytest.raises(DelrecError, match=r"template lsr.jinja needs variable 'candidates'"):
        template.render(missing)
    with pytest.raises(DelrecError, match=r"template lsr.jinja got unknown variable 'candidate'"):
        template.render({**values, "candidate": ["x"]})
    with pytest.raises(DelrecError, match=r"lsr.jinja needs variable 'target'"):
        template.render({k: v for k, v in values.items() if k != "target"})
    with pytest.raises(DelrecError, match=r"'history' must be a list of titles"):
        template.render({**values, "history": "A, B"})
    with pytest.raises(DelrecError, match="surrounding whitespace"):
        template.render({**values, "soft_prompt": " " + SOFT})
    # a known variable the template does not use is fine (the template may drop it) unless strict
    plain = prompts.get_template("plain", SHIPPED)
    assert plain.render(values).soft_span is None
    with pytest.raises(DelrecError, match="plain.jinja does not declare variable '(sr_model|soft_prompt)'"):
        plain.render(values, strict=True)
    assert prompts.render("lsr", values, "game", folder=SHIPPED) == template.render(values, "game")


def test_token_count_with_a_local_tokenizer(dataset, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator(dataset.titles + prompts.template_corpus(SHIPPED), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))

    template = prompts.get_template("lsr", SHIPPED)
    values, _ = prompts.preview_variables(template, dataset, "test", 0, soft_prompt=prompts.soft_prompt_placeholder(7))
    out = template.render(values)
    count = prompts.count_tokens(out, loaded)
    start, end = out.soft_span
    expected = len(loaded(out.prompt[:start])["input_ids"]) + len(loaded(out.prompt[end:])["input_ids"]) + 7
    assert count.prompt == expected and "tokenizer" in count.method
    assert count.total == count.prompt + count.completion + 1
    # once the placeholders are added tokens (one id each), the whole prompt tokenizes to the same count
    with_soft = load_tokenizer(str(tmp_path / "tok"))
    with_soft.add_tokens([prompts.SOFT_TOKEN_FORMAT.format(i) for i in range(7)], special_tokens=True)
    assert len(with_soft(out.prompt, add_special_tokens=False)["input_ids"]) == count.prompt
    reports = prompts.lint_report(SHIPPED, dataset, loaded, max_length=10_000, soft_tokens=7)
    assert all(r.tokens is not None for r in reports if r.name.endswith(".jinja"))
    problems = prompts.lint(SHIPPED, dataset, loaded, max_length=50)
    assert problems and all("exceed max length 50" in p for p in problems)
    render = ["prompts", "render", "plain", "--data", str(dataset.path), "--tokenizer"]
    assert main([*render, str(tmp_path / "tok")]) == 0
    assert f"tokenizer {tmp_path / 'tok'}" in capsys.readouterr().out
    # a folder that is not there is refused before transformers could take it for a hub id; one without
    # tokenizer files is refused by the LLM layer's loader
    (tmp_path / "empty").mkdir()
    refusals = {"nope": "nope: tokenizer folder not found", "empty": "empty: model folder without tokenizer files"}
    for folder, message in refusals.items():
        assert main([*render, str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert main(["prompts", "lint", "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "nope: tokenizer folder not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad templates


def test_good_minimal_template_loads(tmp_path):
    folder = folder_with(tmp_path, "bad.jinja", GOOD_HEADER + GOOD_BODY)
    template = prompts.get_template("bad", folder)
    out = template.render({"history": ["A", "B"], "candidates": ["C"], "soft_prompt": SOFT, "target": "C"}, "game")
    assert out.prompt == f"Pattern: {SOFT}\nHistory of games:\n1. A\n2. B\nCandidates:\n1. C\n"
    assert out.completion == "C"


def test_missing_variable_declaration(tmp_path):
    body = GOOD_BODY.replace("Candidates:", "Also: {{ sr_model }}\nCandidates:")
    message = error_of(folder_with(tmp_path, "bad.jinja", GOOD_HEADER + body))
    assert "bad.jinja:11" in message and "uses variable 'sr_model' but does not declare it" in message


def test_unused_and_unknown_declarations(tmp_path):
    header = GOOD_HEADER.replace("target]", "target, sr_model]")
    assert "declares variable 'sr_model' but never uses it" in error_of(
        folder_with(tmp_path, "bad.jinja", header + GOOD_BODY))
    header = GOOD_HEADER.replace("target]", "target, mood]")
    body = GOOD_BODY.replace("Candidates:", "{{ mood }}\nCandidates:")
    message = error_of(folder_with(tmp_path / "b", "bad.jinja", header + body))
    assert "bad.jinja" in message and "unknown variable 'mood'" in message
    # a known variable that the task's code does not provide
    header = GOOD_HEADER.replace("target]", "target, example_recent]")
    body = GOOD_BODY.replace("Candidates:", "{{ example_recent }}\nCandidates:")
    assert "'example_recent' is not provided for task 'lsr'" in error_of(
        folder_with(tmp_path / "c", "bad.jinja", header + body))


def test_soft_slot_problems(tmp_path):
    no_slot = GOOD_HEADER.replace("soft_prompt, ", "") + GOOD_BODY.replace("Pattern: {{ soft_prompt }}\n", "")
    assert "bad.jinja has no soft-prompt slot" in error_of(folder_with(tmp_path / "a", "bad.jinja", no_slot))
    two = GOOD_HEADER + GOOD_BODY.replace("Candidates:", "Again {{ soft_prompt }}\nCandidates:")
    message = error_of(folder_with(tmp_path / "b", "bad.jinja", two))
    assert "bad.jinja has 2 soft-prompt slots (lines 8, 11)" in message
    looped = GOOD_HEADER + GOOD_BODY.replace("Pattern: {{ soft_prompt }}", "Pattern: {{ soft_prompt | trim }}")
    assert "plain {{ soft_prompt }}" in error_of(folder_with(tmp_path / "c", "bad.jinja", looped))
    plain = GOOD_HEADER.replace("task: lsr", "task: plain").replace("true", "false") + GOOD_BODY
    message = error_of(folder_with(tmp_path / "d", "bad.jinja", plain))
    assert "not provided for task 'plain'" in message or "requires_soft_prompt is false" in message


def test_syntax_error_names_file_and_line(tmp_path):
    body = GOOD_BODY.replace("{{ history | numbered }}", "{{ history | numbered }")
    message = error_of(folder_with(tmp_path, "bad.jinja", GOOD_HEADER + body))
    assert "bad.jinja:10: syntax error" in message


def test_structure_problems(tmp_path):
    assert "missing header" in error_of(folder_with(tmp_path / "a", "bad.jinja", GOOD_BODY))
    no_completion = GOOD_HEADER.replace(", target]", "]") + GOOD_BODY.split("{% block completion %}")[0]
    assert "missing {% block completion %}" in error_of(folder_with(tmp_path / "b", "bad.jinja", no_completion))
    outside = GOOD_HEADER + "Stray text\n" + GOOD_BODY
    assert "outside the prompt/completion blocks" in error_of(folder_with(tmp_path / "c", "bad.jinja", outside))
    leak = GOOD_HEADER + GOOD_BODY.replace("Candidates:", "Hint {{ target }}\nCandidates:")
    assert "leak" in error_of(folder_with(tmp_path / "d", "bad.jinja", leak))
    bad_yaml = GOOD_HEADER.replace("variables: [", "variables: [[") + GOOD_BODY
    assert "bad.jinja:6: invalid header YAML" in error_of(folder_with(tmp_path / "e", "bad.jinja", bad_yaml))


def test_domains_file_checked(tmp_path):
    folder = folder_with(tmp_path, "bad.jinja", GOOD_HEADER + GOOD_BODY)
    text = (folder / prompts.DOMAINS_FILE).read_text().replace("  verb_past: played\n", "")
    (folder / prompts.DOMAINS_FILE).write_text(text)
    message = error_of(folder)
    assert "domain 'game' must define the same keys" in message and "verb_past" in message


def test_lint_collects_all_problems(tmp_path):
    folder = folder_with(tmp_path, "bad.jinja", GOOD_HEADER + GOOD_BODY.replace("{{ soft_prompt }}", ""),
                         keep_shipped=True)
    (folder / "lsr.jinja").unlink()
    problems = prompts.lint(folder)
    assert any("no template 'lsr.jinja'" in p for p in problems)
    assert any("bad.jinja" in p and "never uses it" in p for p in problems)
    assert any("bad.jinja has no soft-prompt slot" in p for p in problems)
    assert not any("ta.jinja" in p for p in problems)


# ----------------------------------------------------------------------------- CLI


def test_cli_list_render_lint(dataset, capsys, tmp_path):
    assert main(["prompts", "list", "--prompts_dir", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}.jinja" in out for name in prompts.TASKS) and "variables: " in out

    assert main(["prompts", "render", "lsr", "--data", str(dataset.path), "--index", "1", "--domain", "game",
                 "--soft-tokens", "10"]) == 0
    out = capsys.readouterr().out
    inst = dataset.instances("test")[1]
    assert dataset.titles[inst.history[0]] in out and "Candidate games:" in out
    assert "<|sp:0|>...<|sp:9|>" in out and "whitespace-separated words" in out
    assert out.split("----- completion -----\n")[1].startswith(dataset.titles[inst.target] + "\n")

    predictions = tmp_path / "pred.jsonl"
    predictions.write_text('{"id": 0, "items": [4, 8, 15, 16, 23, 42]}\n')
    assert main(["prompts", "render", "rps", "--data", str(dataset.path), "--predictions", str(predictions),
                 "--show-soft-tokens"]) == 0
    out = capsys.readouterr().out
    assert "<|sp:50|>" in out and "from the predictions file" in out

    assert main(["prompts", "lint", "--data", str(dataset.path), "--max-length", "5000"]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len(prompts.template_names(SHIPPED)) + 1


def test_cli_bad_folder_exit_2_one_line(tmp_path, capsys):
    body = GOOD_BODY.replace("{{ soft_prompt }}", "{{ soft_prompt }} {{ soft_prompt }}")
    folder = folder_with(tmp_path, "bad.jinja", GOOD_HEADER + body)
    assert main(["prompts", "list", "--prompts_dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jinja has 2 soft-prompt slots" in err
    assert main(["prompts", "lint", "--prompts_dir", str(folder)]) == 2
    captured = capsys.readouterr()
    assert "bad.jinja has 2 soft-prompt slots" in captured.out and "problems" in captured.err
    assert main(["prompts", "render", "nope", "--data", str(tmp_path), "--prompts_dir", str(SHIPPED)]) == 2
    assert "no template 'nope'" in capsys.readouterr().err
    assert main(["prompts", "list", "--prompts_dir", str(tmp_path / "missing")]) == 2
    assert "prompt template folder not found; pass --prompts_dir DIR" in capsys.readouterr().err


def test_copy_gives_an_editable_folder_and_never_writes_into_an_occupied_one(tmp_path, capsys):
    from delrec.cli import main

    assert main(["prompts", "copy", str(tmp_path / "mine")]) == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == sorted(p.name for p in SHIPPED.iterdir())
    assert prompts.lint(tmp_path / "mine") == []
    (tmp_path / "mine" / "plain.jinja").write_text("edited")
    capsys.readouterr()
    assert main(["prompts", "copy", str(tmp_path / "mine")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path / 'mine'} already exists and is not empty; copy the "
                                                    "templates into a new folder")
    assert (tmp_path / "mine" / "plain.jinja").read_text() == "edited"
