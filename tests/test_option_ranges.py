"""Numbers a user gives (flags, `--config` keys, `delrec run` sections) are range-checked where they are read.

The red-team findings each as a command: exit 2, one stderr line naming the option (and for a config file
the file and key) and the value, nothing written. Then a sweep: for every option of every command's config
dataclasses, values just outside the range the field declares (and NaN/inf for floats) are refused at parse
time, as a flag and as a `--config` key; the required paths point nowhere, so a value that slipped through
would fail on them with another message and the test would say so. Last: the library refuses a batch size
below 1 itself, and an allocation the machine refuses is one line. tests/test_shipped_configs.py parses every
shipped config, so their values are in range.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import torch

from cli_checks import one_line_error, run_cli, snapshot
from delrec.config import SEED, Bounds, memory_for, range_problem
from delrec.errors import DelrecError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- the findings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [["--split", "test", "--batch_size", "-1"], ["--split", "test", "--batch_size", "0"],
                                   ["--split", "train", "--batch_size", "-3", "--prefix_predictions", "true"]],
                         ids=["minus-1", "zero", "prefix-minus-3"])
def test_sr_predict_refuses_a_batch_size_below_1_and_writes_nothing(sr_model, tiny_llm_data, tmp_path, capsys, extra):
    out = tmp_path / "p.jsonl"
    code = run_cli(["sr", "predict", "--model", sr_model, "--data", tiny_llm_data, "--out", out, *extra])
    one_line_error(capsys, code, f"error: batch_size must be at least 1, got {extra[3]}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", ["0", "-1"])
def test_sr_evaluate_refuses_a_batch_size_below_1(sr_model, tiny_llm_data, capsys, size):
    before = snapshot(sr_model)
    code = run_cli(["sr", "evaluate", "--model", sr_model, "--data", tiny_llm_data, "--batch_size", size])
    one_line_error(capsys, code, f"error: batch_size must be at least 1, got {size}")
    assert snapshot(sr_model) == before


@pytest.mark.parametrize("argv, facts", [
    (["--seed", "-1"], ["seed must be between 0 and 4294967295, got -1"]),
    (["--seed", str(2**32)], [f"seed must be between 0 and 4294967295, got {2**32}"]),
    (["--synthetic_items", "1000000000"], ["synthetic_items must be between 2 and 57600, got 1000000000"]),
    (["--synthetic_users", "100000000"], ["synthetic_users must be between 1 and 1000000, got 100000000"]),
    (["--min_rating", "nan"], ["min_rating must be a finite number, got nan"]),
], ids=["seed-negative", "seed-2**32", "items-1e9", "users-1e8", "min-rating-nan"])
def test_data_prepare_refuses_out_of_range_numbers_before_generating(tmp_path, capsys, argv, facts):
    code = run_cli(["data", "prepare", "--format", "synthetic", "--out", tmp_path / "out", *argv])
    one_line_error(capsys, code, *facts)
    assert not (tmp_path / "out").exists()


def test_sr_train_refuses_a_negative_seed_and_huge_sizes_as_flags(tiny_llm_data, tmp_path, capsys):
    base = ["sr", "train", "--model", "sasrec", "--data", tiny_llm_data, "--out", tmp_path / "m"]
    one_line_error(capsys, run_cli([*base, "--seed", "-1"]), "seed must be between 0 and 4294967295, got -1")
    one_line_error(capsys, run_cli([*base, "--hidden_size", "1000000000"]),
                   "hidden_size must be between 1 and 65536, got 1000000000")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("text, key, value", [("seed: -1\n", "seed", "-1"), ("batch_size: -4\n", "batch_size", "-4"),
                                              ("max_length: 1000000000000\n", "max_length", "1000000000000")])
def test_sr_train_names_the_config_file_key_and_value(tiny_llm_data, tmp_path, capsys, text, key, value):
    config = write(tmp_path / "cfg.yaml", text)
    code = run_cli(["sr", "train", "--model", "sasrec", "--data", tiny_llm_data, "--out", tmp_path / "m",
                    "--config", config])
    one_line_error(capsys, code, f"{config}: key '{key}'", f"got {value}")
    assert not (tmp_path / "m").exists()


def test_teacher_export_and_student_train_refuse_a_negative_seed_and_an_infinite_weight(
        sr_model, sr_teacher, tiny_llm_data, tmp_path, capsys):
    code = run_cli(["teacher", "export", "--model", sr_model, "--data", tiny_llm_data, "--out", tmp_path / "t",
                    "--seed", "-1"])
    one_line_error(capsys, code, "seed must be between 0 and 4294967295, got -1")
    student = ["student", "train", "--model", "sasrec", "--data", tiny_llm_data, "--out", tmp_path / "s",
               "--teacher", sr_teacher]
    one_line_error(capsys, run_cli([*student, "--seed", "-1"]), "seed must be between 0 and 4294967295, got -1")
    one_line_error(capsys, run_cli([*student, "--lambda_d", "inf"]), "lambda_d must be a finite number, got inf")
    assert list(tmp_path.iterdir()) == []


def test_teacher_export_checks_the_embedding_layer_against_the_model(tiny_llama, tiny_llm_data, tmp_path, capsys):
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar, which --progress does not reach
    try:
        code = run_cli(["teacher", "export", "--model", tiny_llama, "--data", tiny_llm_data, "--out", tmp_path / "t",
                        "--mode", "embeddings", "--embedding_layer", "3", "--device", "cpu", "--progress", "false"])
    finally:
        transformers.utils.logging.enable_progress_bar()
    one_line_error(capsys, code, "--embedding_layer 3", f"{tiny_llama} has 2 layers", "-3..2")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("command", [["prompts", "render", "lsr", "--data", "DATA"], ["prompts", "lint"]])
def test_prompts_refuse_a_billion_soft_tokens_before_building_them(tiny_llm_data, capsys, command):
    argv = [str(tiny_llm_data) if part == "DATA" else part for part in command]
    code = run_cli([*argv, "--soft_tokens", "1000000000"])
    one_line_error(capsys, code, "soft_tokens must be between 1 and 100000, got 1000000000")


def test_prompts_lint_library_checks_the_soft_prompt_size_first():
    from delrec.prompts import lint_report

    with pytest.raises(DelrecError, match="soft prompt size must be between 1 and 100000 tokens, got 1000000000"):
        lint_report(soft_tokens=10**9)


@pytest.mark.parametrize("section, where, key, value", [
    ("sr: {sasrec: {model: sasrec, seed: -1}}", "section 'sr.sasrec'", "seed", "-1"),
    ("data: {num_candidates: 1}", "section 'data'", "num_candidates", "1"),
    ("stage1: {soft_prompt_tokens: 1000000000}", "section 'stage1'", "soft_prompt_tokens", "1000000000"),
    ("rank: {hf: {batch_size: 0}}", "section 'rank.hf'", "batch_size", "0"),
    ("teacher: {t: {model: sr/sasrec, topk: 0}}", "section 'teacher.t'", "topk", "0"),
    ("students: {epochs: 0}", "section 'students'", "epochs", "0"),
    ("students: {runs: {alone: {method: none, ed_weight: .nan}}}", "section 'students.runs.alone'", "ed_weight", "nan"),
    ("llm: {seed: 4294967296}", "section 'llm'", "seed", "4294967296"),
], ids=["sr-seed", "data-candidates", "stage1-soft-tokens", "rank-hf-batch", "teacher-topk", "students-epochs",
        "run-ed-weight-nan", "llm-seed"])
def test_delrec_run_names_the_file_section_key_and_value(tmp_path, capsys, section, where, key, value):
    config = write(tmp_path / "pipe.yaml", f"out: {tmp_path / 'run'}\n{section}\n")
    code = run_cli(["run", config, "--dry-run"])
    one_line_error(capsys, code, f"{config} {where}: key '{key}'", f"got {value}")
    assert not (tmp_path / "run").exists()


# --- every option of every command ----------------------------------------------------------------------


def command_variants():
    """(command words, config dataclasses) of every command, one variant per model, method and backend."""
    from delrec.cli import data, export, llm, prompts, serve, sr, student, teacher
    from delrec.data.preprocess import PreprocessConfig
    from delrec.distill.teacher_export import TeacherExportConfig
    from delrec.distill.student import METHODS
    from delrec.ranking.base import BACKENDS, ReadoutConfig, backend_module
    from delrec.ranking.runner import RankArguments
    from delrec.sr import MODELS

    yield ["data", "prepare"], [data.PrepareArguments, PreprocessConfig]
    yield ["data", "stats"], [data.StatsArguments]
    for model in MODELS:
        yield ["sr", "train", "--model", model], sr.train_classes(["--model", model])
    yield ["sr", "evaluate"], [sr.EvaluateArguments]
    yield ["sr", "predict"], [sr.PredictArguments]
    yield ["sr", "compile"], [sr.CompileArguments]
    yield ["llm", "import"], [llm.ImportArguments]
    yield ["llm", "build-tiny"], [llm.BuildTinyArguments, llm.TinyLLMConfig]
    yield ["llm", "distill-pattern"], llm.distill_classes()
    yield ["llm", "finetune"], llm.finetune_classes()
    yield ["prompts", "list"], [prompts.PromptsFolder]
    yield ["prompts", "render"], [prompts.RenderArguments, prompts.PromptsFolder]
    yield ["prompts", "lint"], [prompts.LintArguments, prompts.PromptsFolder]
    for backend in BACKENDS:
        yield ["rank", "--backend", backend], [RankArguments, ReadoutConfig, backend_module(backend).Options]
    for backend in typing.get_args(typing.get_type_hints(TeacherExportConfig)["backend"]):
        yield ["teacher", "export", "--backend", backend], teacher.export_classes(["--backend", backend])
    yield ["export"], [export.ExportArguments]
    for method in METHODS:
        yield (["student", "train", "--model", "sasrec", "--method", method],
               student.train_classes(["--model", "sasrec", "--method", method]))
    yield ["serve"], [serve.ServeArguments]


def numeric_kind(cls: type, field: dataclasses.Field) -> type | None:
    """int or float for a numeric option (or a list of numbers), else None."""
    kind = typing.get_type_hints(cls)[field.name]
    if type(None) in typing.get_args(kind):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    return kind if kind in (int, float) else None


def outside(bounds: Bounds | None, kind: type) -> list:
    """Values just outside `bounds` (and NaN/inf for a float option)."""
    values = [] if kind is int else [math.nan, math.inf, -math.inf]
    if bounds is not None and bounds.low is not None:
        values.append(kind(bounds.low if bounds.low_open else bounds.low - 1))
    if bounds is not None and bounds.high is not None:
        values.append(kind(bounds.high if bounds.high_open else bounds.high + 1))
    return values


def required_args(classes: list[type], given: list[str], tmp_path: Path) -> list[str]:
    """Every required option not in `given`, set to a path that does not exist (or a Literal's first choice)."""
    args = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            missing = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if field.init and missing and f"--{field.name}" not in given:
                choices = typing.get_args(hints[field.name]) if typing.get_origin(hints[field.name]) is typing.Literal \
                    else None
                args += [f"--{field.name}", str(choices[0]) if choices else str(tmp_path / f"missing-{field.name}")]
    return args


def sweep_cases():
    cases, seen = [], set()
    for words, classes in command_variants():
        command = " ".join(words[:next((i for i, w in enumerate(words) if w.startswith("--")), len(words))])
        for cls in classes:
            for field in dataclasses.fields(cls):
                kind = numeric_kind(cls, field) if field.init else None
                if kind is None or (command, cls, field.name) in seen:
                    continue
                seen.add((command, cls, field.name))
                bounds = field.metadata.get("range")
                for value in outside(bounds, kind):
                    finite = not isinstance(value, float) or math.isfinite(value)
                    refused = f"must be {bounds if finite or (bounds and bounds.text) else 'a finite number'}"
                    cases.append(pytest.param(words, classes, field.name, value, refused,
                                              id=f"{' '.join(words)}:{field.name}={value}"))
    return cases


def yaml_number(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return repr(value)


@pytest.mark.parametrize("words, classes, name, value, refused", sweep_cases())
def test_every_numeric_option_refuses_values_outside_its_range(tmp_path, capsys, words, classes, name, value, refused):
    """As a flag (`--name=value`, so that `-inf` is not read as a flag) and as a `--config` key."""
    base = [*words, *required_args(classes, words, tmp_path)]
    one_line_error(capsys, run_cli([*base, f"--{name}={value}"]), f"error: {name} {refused}", f"got {value}")
    config = write(tmp_path / "cfg.yaml", f"{name}: {yaml_number(value)}\n")
    one_line_error(capsys, run_cli([*base, "--config", config]), f"{config}: key '{name}' {refused}", f"got {value}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


# Classes of delrec/pipeline/options.py without declared ranges: their __post_init__ checks their numbers (and
# delrec.data.synthetic the synthetic sizes, before allocating). ReportOptions.full_k is a choice of cut-offs.
UNDECLARED = {"ReportOptions"}
# Ranges only the model knows: 1 to its catalogue size, checked (naming both) before anything is written.
CHECKED_AGAINST_THE_MODEL = {"PredictArguments.topk", "CompileArguments.topk"}


def test_every_int_option_declares_its_range_and_every_default_is_inside_it():
    from delrec.pipeline import options

    classes = {cls for _, found in command_variants() for cls in found}
    classes |= {c for c in vars(options).values() if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__name__ not in UNDECLARED}
    undeclared, outside_defaults = [], []
    for cls in classes:
        for field in dataclasses.fields(cls):
            kind = numeric_kind(cls, field) if field.init else None
            name = f"{cls.__name__}.{field.name}"
            if kind is int and "range" not in field.metadata and name not in CHECKED_AGAINST_THE_MODEL:
                undeclared.append(name)
            if field.default is not dataclasses.MISSING and range_problem(field, field.default):
                outside_defaults.append(name)
    assert not undeclared and not outside_defaults, (undeclared, outside_defaults)


def test_help_shows_the_range_beside_the_default(capsys):
    assert run_cli(["sr", "train", "--model", "sasrec", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(between {SEED.low} and {SEED.high}; default: 0)" in text
    assert "(at least 1; default: 64)" in text and "(above 0; default: 0.002)" in text


# --- the library, and allocations ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1])
def test_the_library_refuses_a_batch_size_below_1_and_never_returns_unscored_rows(sr_model, tiny_llm_data,
                                                                                  tmp_path, size):
    from delrec.data.dataset import PreparedDataset
    from delrec.sr import load_model, write_predictions
    from delrec.sr.evaluate import top_k

    model, dataset = load_model(sr_model, "cpu"), PreparedDataset.load(tiny_llm_data)
    with pytest.raises(DelrecError, match=f"batch size must be at least 1, got {size}"):
        top_k(model, [[1, 2], [3]], 5, True, size)
    with pytest.raises(DelrecError, match="batch size must be at least 1"):
        write_predictions(tmp_path / "p.jsonl", model, dataset, "test", 5, batch_size=size)
    assert list(tmp_path.iterdir()) == []


def test_an_allocation_the_machine_refuses_is_one_line_with_the_bytes_requested():
    import numpy as np

    for allocate in (lambda: torch.empty(2**50), lambda: np.empty(2**50, dtype=np.int64)):
        with pytest.raises(DelrecError, match=r"not enough memory for the table \(size 9\) \((4,503,599,627,370,496 "
                                              r"bytes|8.00 PiB) requested\); lower size"):
            with memory_for("the table (size 9)", "lower size"):
                allocate()
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through
        with memory_for("x", "y"):
            raise RuntimeError("unrelated")


def test_sr_train_names_the_model_sizes_when_the_model_does_not_fit(tiny_llm_data, tmp_path, monkeypatch):
    from delrec.sr import SASRecConfig, TrainConfig, train_sr
    from delrec.sr import trainer

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(trainer, "build_model", refuse)
    config = TrainConfig(epochs=1, progress=False, device="cpu")
    with pytest.raises(DelrecError, match=r"the sasrec model \(hidden_size 4096, .*max_length 50\) of 40 items "
                                          r"\(68,719,476,736 bytes requested\); lower those sizes"):
        train_sr(tiny_llm_data, SASRecConfig(hidden_size=4096), config, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_saved_model_config_out_of_range_is_refused_naming_the_file(tmp_path):
    from delrec.config import dataclass_from_dict
    from delrec.sr import SASRecConfig

    with pytest.raises(DelrecError, match="config.json: key 'max_length' must be between 1 and 100000, got 10000000"):
        dataclass_from_dict(SASRecConfig, {"max_length": 10**7}, str(tmp_path / "config.json"))


# --- shipped configs -------------------------------------------------------------------------------------


def test_every_shipped_config_is_parsed_by_test_shipped_configs():
    """tests/test_shipped_configs.py parses configs/*/*.yaml with every key (so every value is in range); the
    packaged delrec/configs are among them through the configs/pipeline links."""
    linked = {p.resolve() for p in (REPO / "configs" / "pipeline").glob("*.yaml")}
    assert {p.resolve() for p in (REPO / "delrec" / "configs").glob("*.yaml")} <= linked
