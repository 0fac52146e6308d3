"""Bad input across every `delrec` command: exit code 2, one line naming the problem, no traceback, nothing lost.

Each case runs `delrec.cli.main` in-process on the tiny session fixtures (a prepared synthetic
dataset, a tiny Llama, a stage-2 folder, a SASRec and its teacher) plus a second, smaller dataset,
and asserts that stderr is exactly one line holding the case's key fact (the file, the field, the
expected value), so a vaguer message fails here. Every case also checks that no input folder, and
none of the finished output folders some cases aim `--out` at, changed by a single byte. Two cases
run the console script itself in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import reseal_dataset
from cli_checks import run_cli, snapshot
from delrec.data.dataset import PreparedDataset
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.sr import PopConfig, TrainConfig, load_model, train_sr, write_predictions
from distill_fixtures import TINY_SASREC, write_sr_teacher

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")


@pytest.fixture(scope="module")
def w(tiny_llm_data, tiny_llama, stage2_llama, sr_model, sr_teacher, tmp_path_factory):
    """The folders the cases read, and copies of finished folders the cases aim `--out` at."""
    root = tmp_path_factory.mktemp("cli-errors")
    other = prepare_dataset(make_synthetic(num_users=30, num_items=20, min_length=4, max_length=8, seed=5),
                            PreprocessConfig(num_candidates=5), root / "other").path
    train_sr(other, PopConfig(), TrainConfig(epochs=1, progress=False, device="cpu"), root / "other-pop")
    preds = root / "predictions"
    model, dataset = load_model(sr_model, "cpu"), PreparedDataset.load(tiny_llm_data)
    for split in ("train", "valid"):
        write_predictions(preds / f"{split}.jsonl", model, dataset, split, 10, prefix_predictions=True)
    write_predictions(preds / "no-prefix-train.jsonl", model, dataset, "train", 10)
    write_predictions(preds / "other-train.jsonl", load_model(root / "other-pop", "cpu"), PreparedDataset.load(other),
                      "train", 10, prefix_predictions=True)
    copies = {name: shutil.copytree(source, root / name)
              for name, source in (("finished_sr", sr_model), ("finished_stage2", stage2_llama),
                                   ("base_llm", tiny_llama), ("same_size", tiny_llm_data), ("emptied", tiny_llm_data),
                                   ("moved_base_stage2", stage2_llama))}
    items = (copies["same_size"] / "items.jsonl").read_text().replace('"title": "', '"title": "The ', 1)
    (copies["same_size"] / "items.jsonl").write_text(items)  # another dataset with as many items
    reseal_dataset(copies["same_size"])
    (copies["emptied"] / "train.jsonl").write_text("")  # emptied by hand: meta.json no longer matches
    info = json.loads((copies["moved_base_stage2"] / "delrec.json").read_text())
    info["base_model"]["model_name_or_path"] = str(root / "moved-away")
    (copies["moved_base_stage2"] / "delrec.json").write_text(json.dumps(info))
    foreign = root / "foreign"  # a user's own folder: config.yaml and data/important.txt
    write(foreign / "data" / "important.txt", "keep me\n")
    write(foreign / "config.yaml", "mine: true\n")
    return SimpleNamespace(foreign=foreign,
        data=tiny_llm_data, llm=tiny_llama, stage2=stage2_llama, sr=sr_model, teacher=sr_teacher, other=other,
        other_teacher=write_sr_teacher(other, root / "other-pop", root / "other-teacher"), preds=preds, root=root,
        **copies,
    )




def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def rows_folder(t: Path, train: str) -> Path:
    """A rows-format raw dataset whose train file is `train` (JSON lines)."""
    row = '{"seq": [1, 2, 0], "len_seq": 2, "next": 3}\n'
    for split, text in (("train", train), ("valid", row), ("test", row)):
        write(t / "rows" / f"{split}.jsonl", text)
    write(t / "rows" / "id2name.txt", "1::One\n2::Two\n3::Three\n")
    return t / "rows"


def csv_folder(t: Path, items: str, interactions: str) -> Path:
    write(t / "csv" / "items.csv", items)
    write(t / "csv" / "interactions.csv", interactions)
    return t / "csv"


def recbole_folder(t: Path, inter: str) -> Path:
    write(t / "rb" / "rb.item", "item_id:token\ttitle:token_seq\n1\tOne\n")
    write(t / "rb" / "rb.inter", inter)
    return t / "rb"


def prompts_folder(t: Path, file: str, old: str | None = None, new: str = "") -> Path:
    """A copy of the shipped templates with `old` replaced by `new` in `file` (all of it when `old` is None)."""
    folder = shutil.copytree(REPO / "delrec" / "prompts" / "templates", t / "prompts")
    text = (folder / file).read_text(encoding="utf-8")
    assert old is None or old in text
    write(folder / file, new if old is None else text.replace(old, new))
    return folder


def distill(w, t, *extra, train="train.jsonl", model=None):
    return ["llm", "distill-pattern", "--data", w.data, "--train_predictions", w.preds / train,
            "--valid_predictions", w.preds / "valid.jsonl", "--out", t / "stage1", "--soft_prompt_tokens", "2",
            "--model_name_or_path", model or w.llm, *extra]


def rank(w, t, *extra, model=None):
    return ["rank", "--model", model or w.stage2, "--data", w.data, "--out", t / "ranks", "--device", "cpu", *extra]


def teacher(w, t, *extra):
    return ["teacher", "export", "--model", w.sr, "--data", w.data, "--out", t / "teacher", *extra]


def student(w, t, *extra):
    return ["student", "train", "--data", w.data, "--model", "sasrec", "--out", t / "student", *extra]


TINY_SASREC_FLAGS = ["--hidden_size", str(TINY_SASREC.hidden_size), "--num_layers", str(TINY_SASREC.num_layers),
                     "--num_heads", str(TINY_SASREC.num_heads), "--inner_size", str(TINY_SASREC.inner_size),
                     "--max_length", str(TINY_SASREC.max_length), "--dropout", str(TINY_SASREC.dropout),
                     "--batch_size", "32", "--no_progress"]
SYNTAX_ERROR = "format: synthetic\nout: [x\n"
CASES = {
    "unknown-command": (lambda w, t: ["recommend"], "unknown command 'recommend'"),
    # data prepare / stats: malformed raw files, configs, flags
    "prepare/bad-format": (lambda w, t: ["data", "prepare", "--format", "parquet", "--out", t / "o"],
                           "invalid choice: 'parquet'"),
    "prepare/yaml-syntax-error": (lambda w, t: ["data", "prepare", "--config", write(t / "bad.yaml", SYNTAX_ERROR)],
                                  "bad.yaml:3: invalid YAML"),
    "prepare/yaml-wrong-type": (
        lambda w, t: ["data", "prepare", "--config",
                      write(t / "c.yaml", "format: synthetic\nout: o\nnum_candidates: ten\n")],
        "c.yaml: key 'num_candidates' expects int, got 'ten'"),
    "prepare/broken-jsonl-line": (
        lambda w, t: ["data", "prepare", "--format", "rows", "--out", t / "o",
                      "--input", rows_folder(t, '{"seq": [1, 2, 0], "len_seq": 2, "next": 3}\n{"seq": [1,\n')],
        "train.jsonl:2: invalid JSON"),
    "prepare/unknown-item-id": (
        lambda w, t: ["data", "prepare", "--format", "rows", "--out", t / "o",
                      "--input", rows_folder(t, '{"seq": [1, 2, 3], "len_seq": 3, "next": 9}\n')],
        "train.jsonl:1 field 'next': item '9' has no title in"),
    "prepare/missing-title": (
        lambda w, t: ["data", "prepare", "--format", "csv", "--out", t / "o", "--input",
                      csv_folder(t, "item,title\n1,One\n2,\n", "user,item,timestamp\n1,1,1\n1,2,2\n")],
        "items.csv:3 field 'title': empty title for item '2'"),
    "prepare/empty-histories": (
        lambda w, t: ["data", "prepare", "--format", "csv", "--out", t / "o", "--input",
                      csv_folder(t, "item,title\n1,One\n2,Two\n", "user,item,timestamp\n1,1,1\n2,2,2\n")],
        "no user has 3 or more interactions"),
    "prepare/synthetic-catalogue-too-small": (
        lambda w, t: ["data", "prepare", "--format", "synthetic", "--synthetic_items", "20", "--out", t / "o"],
        "--synthetic_items 20"),
    "prepare/out-is-the-raw-data": (
        lambda w, t: ["data", "prepare", "--format", "rows", "--input", rows_folder(t, ""), "--out", t / "rows",
                      "--overwrite"],
        "is the raw data folder"),
    "prepare/input-with-synthetic": (
        lambda w, t: ["data", "prepare", "--format", "synthetic", "--input", w.foreign, "--out", t / "o"],
        "is given with --format synthetic, which reads no files"),
    "prepare/negative-kcore": (lambda w, t: ["data", "prepare", "--format", "synthetic", "--kcore", "-3",
                                             "--out", t / "o"], "kcore must be 0 (off) or a positive count"),
    "prepare/csv-unclosed-quote": (
        lambda w, t: ["data", "prepare", "--format", "csv", "--out", t / "o", "--input",
                      csv_folder(t, 'item,title\n1,One\n2,"Two\n3,Three\n', "user,item,timestamp\n1,1,1\n")],
        'items.csv:3: a quote (") opened in the row on this line is never closed'),
    "prepare/recbole-header-typo": (
        lambda w, t: ["data", "prepare", "--format", "recbole", "--out", t / "o", "--input", recbole_folder(
            t, "user_id:token\titme_id:token\ttimestamp:float\n1\t1\t1\n")],
        "missing column 'item_id'; expected columns user_id, item_id, timestamp (found user_id, itme_id, timestamp); "
        "is 'itme_id' a typo of it?"),
    "prepare/out-under-a-file": (
        lambda w, t: ["data", "prepare", "--format", "synthetic", "--out", w.foreign / "config.yaml" / "o"],
        "config.yaml is a file, not a folder"),
    "stats/model-folder": (lambda w, t: ["data", "stats", w.sr], "not a prepared dataset (no meta.json)"),
    "stats/sr-model-folder-is-named": (lambda w, t: ["data", "stats", w.sr],
                                       "it is a model folder (config.json); pass the prepared dataset folder instead"),
    "stats/emptied-train-file": (lambda w, t: ["data", "stats", w.emptied],
                                 "the dataset files changed since `delrec data prepare` wrote them"),
    # sr train / evaluate / predict
    "sr-train/unknown-flag": (
        lambda w, t: ["sr", "train", "--data", w.data, "--model", "caser", "--out", t / "o", "--num_heads", "2"],
        "unrecognized arguments: --num_heads 2"),
    "sr-train/model-folder-as-data": (
        lambda w, t: ["sr", "train", "--data", w.sr, "--model", "sasrec", "--out", t / "o"],
        "sasrec: not a prepared dataset (no meta.json)"),
    "sr-train/cuda-on-cpu": (
        lambda w, t: ["sr", "train", "--data", w.data, "--model", "sasrec", "--out", t / "o", "--device", "cuda"],
        "--device cuda was requested but CUDA is not available", NO_CUDA),
    "sr-train/resume-with-another-config": (
        lambda w, t: ["sr", "train", "--data", w.data, "--model", "sasrec", "--out", w.finished_sr, *TINY_SASREC_FLAGS,
                      "--lr", "0.5"],
        "cannot resume, its checkpoint was written with a different configuration (lr: 0.01 -> 0.5)"),
    "sr-train/out-is-a-dataset": (
        lambda w, t: ["sr", "train", "--data", w.data, "--model", "pop", "--out", w.other],
        "other already holds files but no training checkpoint"),
    "sr-train/emptied-train-file": (
        lambda w, t: ["sr", "train", "--data", w.emptied, "--model", "pop", "--out", t / "o"],
        "emptied: the dataset files changed since `delrec data prepare` wrote them"),
    "sr-train/negatives-above-catalogue": (
        lambda w, t: ["sr", "train", "--data", w.data, "--model", "sasrec", "--loss", "bce", "--num_negatives",
                      "100000", "--out", t / "o"],
        "--num_negatives 100000"),
    "sr-train/out-under-a-file": (
        lambda w, t: ["sr", "train", "--data", w.data, "--model", "pop", "--out", w.foreign / "config.yaml" / "o"],
        "config.yaml is a file, not a folder"),
    "sr-evaluate/llm-folder": (lambda w, t: ["sr", "evaluate", "--model", w.llm, "--data", w.data],
                               "a Hugging Face model folder (model_type 'llama'), not a delrec SR model"),
    "sr-evaluate/stage2-folder": (lambda w, t: ["sr", "evaluate", "--model", w.stage2, "--data", w.data],
                                  "not an SR model folder, it is a PEFT adapter folder"),
    "sr-evaluate/other-dataset": (lambda w, t: ["sr", "evaluate", "--model", w.sr, "--data", w.other],
                                  "the SR model scores 40 items but the dataset"),
    "sr-evaluate/same-size-other-dataset": (
        lambda w, t: ["sr", "evaluate", "--model", w.sr, "--data", w.same_size],
        "was trained on dataset"),
    "sr-predict/same-size-other-dataset": (
        lambda w, t: ["sr", "predict", "--model", w.sr, "--data", w.same_size, "--split", "test", "--out", t / "p.jsonl"],
        "was trained on dataset"),
    "sr-predict/out-is-the-dataset-file": (
        lambda w, t: ["sr", "predict", "--model", w.sr, "--data", w.data, "--split", "test", "--out", w.data / "train.jsonl"],
        "train.jsonl is inside the dataset folder"),
    "sr-predict/out-is-a-foreign-file": (
        lambda w, t: ["sr", "predict", "--model", w.sr, "--data", w.data, "--split", "test", "--out", w.foreign / "config.yaml"],
        "config.yaml already exists and is not a predictions file written by delrec"),
    "sr-predict/out-is-a-folder": (
        lambda w, t: ["sr", "predict", "--model", w.sr, "--data", w.data, "--split", "test", "--out", w.foreign / "data"],
        "data names a folder; expected the path of a predictions file to write"),
    "sr-predict/out-under-a-file": (
        lambda w, t: ["sr", "predict", "--model", w.sr, "--data", w.data, "--split", "test", "--out", w.foreign / "config.yaml" / "p"],
        "config.yaml is a file, not a folder"),
    "sr-evaluate/out-under-a-file": (
        lambda w, t: ["sr", "evaluate", "--model", w.sr, "--data", w.data, "--out", w.foreign / "config.yaml" / "e"],
        "config.yaml is a file, not a folder"),
    "sr-evaluate/out-is-another-model": (
        lambda w, t: ["sr", "evaluate", "--model", w.sr, "--data", w.data, "--out", w.finished_stage2],
        "finished_stage2 already holds other files (README.md, adapter_config.json"),
    "sr-predict/topk-above-catalogue": (
        lambda w, t: ["sr", "predict", "--model", w.sr, "--data", w.data, "--split", "test", "--topk", "41",
                      "--out", t / "p.jsonl"],
        "--topk 41 must be between 1 and the catalogue size (40 items)"),
    "sr-predict/bad-split": (
        lambda w, t: ["sr", "predict", "--model", w.sr, "--data", w.data, "--split", "dev", "--out", t / "p.jsonl"],
        "argument --split: invalid choice: 'dev'"),
    "sr-predict/missing-model-folder": (
        lambda w, t: ["sr", "predict", "--model", t / "nomodel", "--data", w.data, "--split", "test",
                      "--out", t / "p.jsonl"],
        "nomodel: model folder not found; expected an SR model folder"),
    # llm build-tiny / distill-pattern / finetune
    "build-tiny/out-is-the-dataset": (
        lambda w, t: ["llm", "build-tiny", "--data", w.data, "--out", w.data, "--overwrite"], "is the dataset folder"),
    "build-tiny/out-under-a-file": (
        lambda w, t: ["llm", "build-tiny", "--data", w.data, "--out", w.foreign / "config.yaml" / "o"], "config.yaml is a file, not a folder"),
    "distill-pattern/out-under-a-file": (
        lambda w, t: [*distill(w, t), "--out", w.foreign / "config.yaml" / "o"], "config.yaml is a file, not a folder"),
    "distill-pattern/predictions-of-another-dataset": (
        lambda w, t: distill(w, t, train="other-train.jsonl"), "other-train.jsonl: predictions were made on dataset"),
    "distill-pattern/no-prefix-predictions": (
        lambda w, t: distill(w, t, train="no-prefix-train.jsonl"),
        "no-prefix-train.jsonl: has no prefix predictions, which Temporal Analysis needs"),
    "distill-pattern/sr-folder-as-llm": (lambda w, t: distill(w, t, model=w.sr),
                                         "is a delrec SR model folder (sasrec), not an LLM"),
    "distill-pattern/cuda-on-cpu": (lambda w, t: distill(w, t, "--device", "cuda"),
                                    "--device cuda was requested but CUDA is not available", NO_CUDA),
    "finetune/stage2-folder-as-stage1": (
        lambda w, t: ["llm", "finetune", "--data", w.data, "--out", t / "o", "--model_name_or_path", w.llm,
                      "--stage1", w.stage2],
        "a finetune folder, not a stage-1 soft prompt"),
    "finetune/out-is-the-base-model": (
        lambda w, t: ["llm", "finetune", "--data", w.data, "--out", w.base_llm, "--model_name_or_path", w.base_llm,
                      "--soft_prompt", "random"],
        "base_llm already exists and is not a finetune run folder (no run.json)"),
    "finetune/out-under-a-file": (
        lambda w, t: ["llm", "finetune", "--data", w.data, "--out", w.foreign / "config.yaml" / "o",
                      "--model_name_or_path", w.llm, "--soft_prompt", "random"], "config.yaml is a file, not a folder"),
    "finetune/yaml-list-for-an-int": (
        lambda w, t: ["llm", "finetune", "--config", write(t / "ft.yaml", f"data: {w.data}\nout: {t / 'o'}\n"
                                                              f"model_name_or_path: {w.llm}\nr: [4, 8]\n")],
        "ft.yaml: key 'r' expects a single int, got [4, 8]"),
    # prompts: templates with a missing or unknown placeholder, predictions and tokenizers of the wrong kind
    "prompts-render/undeclared-placeholder": (
        lambda w, t: ["prompts", "render", "plain", "--data", w.data, "--prompts_dir",
                      prompts_folder(t, "plain.jinja", "Answer:", "{{ cnadidates }}\nAnswer:")],
        "template plain.jinja uses variable 'cnadidates' but does not declare it"),
    "prompts-render/unknown-placeholder": (
        lambda w, t: ["prompts", "render", "plain", "--data", w.data, "--prompts_dir",
                      prompts_folder(t, "plain.jinja", "variables: [history,", "variables: [user_age, history,")],
        "plain.jinja: declares unknown variable 'user_age'"),
    "prompts-render/index-out-of-range": (
        lambda w, t: ["prompts", "render", "plain", "--data", w.data, "--index", "999"],
        "--index 999 is out of range: split 'test' has 80 instances"),
    "prompts-render/predictions-of-another-dataset": (
        lambda w, t: ["prompts", "render", "rps", "--data", w.data, "--split", "train",
                      "--predictions", w.preds / "other-train.jsonl"],
        "other-train.jsonl: predictions were made on dataset"),
    "prompts-render/tokenizer-of-an-sr-model": (
        lambda w, t: ["prompts", "render", "plain", "--data", w.data, "--tokenizer", w.sr],
        "sasrec is a delrec SR model folder (sasrec), not an LLM"),
    "prompts-lint/undeclared-placeholder": (
        lambda w, t: ["prompts", "lint", "--prompts_dir",
                      prompts_folder(t, "lsr.jinja", "Answer:", "{{ cnadidates }}\nAnswer:")],
        "uses variable 'cnadidates' but does not declare it"),
    "prompts-lint/completion-with-more-than-the-target": (
        lambda w, t: ["prompts", "lint", "--prompts_dir",
                      prompts_folder(t, "plain.jinja", "{{ target }}", "The answer is {{ target }}")],
        "the completion block must be '{{ target }}' alone"),
    "prompts-list/domains-yaml-syntax-error": (
        lambda w, t: ["prompts", "list", "--prompts_dir",
                      prompts_folder(t, "domains.yaml", None, "item: {item_noun: [x\n")],
        "domains.yaml:2: invalid YAML"),
    # rank / export
    "rank/sr-folder": (lambda w, t: rank(w, t, model=w.sr), "is a delrec SR model folder (sasrec), not an LLM"),
    "rank/dataset-as-model": (lambda w, t: rank(w, t, model=w.data),
                              "is a prepared delrec dataset folder, not a model folder"),
    "rank/vllm-on-a-stage2-folder": (
        lambda w, t: rank(w, t, "--backend", "vllm"),
        "is a DELRec stage-2 folder (LoRA adapter + soft prompt), which vLLM cannot load; merge it first with "
        "`delrec export"),
    "rank/out-is-a-finished-model": (
        lambda w, t: [*rank(w, t), "--out", w.finished_sr],
        "finished_sr already holds other files (checkpoint, config.json, log.jsonl, ...)"),
    "rank/template-without-its-target": (
        lambda w, t: rank(w, t, "--prompts_dir", prompts_folder(t, "plain.jinja", "{{ target }}"), model=w.llm),
        "plain.jinja: template plain.jinja declares variable 'target' but never uses it"),
    "rank/stage2-of-another-dataset": (
        lambda w, t: rank(w, t, "--data", w.same_size), "was fine-tuned on dataset"),
    "rank/out-under-a-file": (lambda w, t: [*rank(w, t), "--out", w.foreign / "config.yaml" / "o"], "config.yaml is a file, not a folder"),
    "rank/soft-prompt-template-on-a-plain-model": (
        lambda w, t: rank(w, t, "--template", "lsr", model=w.llm), "template 'lsr' needs a soft prompt"),
    "rank/cuda-on-cpu": (lambda w, t: [*rank(w, t), "--device", "cuda"],
                         "--device cuda was requested but CUDA is not available", NO_CUDA),
    "export/sr-folder": (lambda w, t: ["export", "--model", w.sr, "--out", t / "e"],
                         "not a DELRec stage-2 folder (no delrec.json)"),
    "export/out-exists": (lambda w, t: ["export", "--model", w.stage2, "--out", w.finished_sr],
                          "finished_sr already exists; pass --overwrite to replace it"),
    "export/moved-base-model": (
        lambda w, t: ["export", "--model", w.moved_base_stage2, "--out", t / "e"],
        "moved-away, which is not there any more; put it back, or pass its new path with --base_model"),
    "export/another-base-model": (
        lambda w, t: ["export", "--model", w.moved_base_stage2, "--out", t / "e", "--base_model", w.sr],
        "is not the base model"),
    "export/out-under-a-file": (
        lambda w, t: ["export", "--model", w.stage2, "--out", w.foreign / "config.yaml" / "e"], "config.yaml is a file, not a folder"),
    # teacher export / student train
    "teacher/topk-above-catalogue": (lambda w, t: teacher(w, t, "--topk", "41"),
                                     "--topk 41 exceeds the catalogue size (40 items)"),
    "teacher/rerank-without-sr-model": (
        lambda w, t: [*teacher(w, t, "--mode", "rerank"), "--model", w.stage2], "--mode rerank needs --sr_model"),
    "teacher/llm-on-another-dataset": (
        lambda w, t: [*teacher(w, t, "--mode", "grounding", "--data", w.same_size), "--model", w.stage2],
        "was fine-tuned on dataset"),
    "teacher/out-is-a-dataset": (lambda w, t: [*teacher(w, t), "--out", w.other],
                                 "other already exists and is not a teacher folder (no teacher.json)"),
    "teacher/out-under-a-file": (lambda w, t: [*teacher(w, t), "--out", w.foreign / "config.yaml" / "o"],
                                 "config.yaml is a file, not a folder"),
    "student/out-under-a-file": (lambda w, t: [*student(w, t, "--teacher", w.teacher), "--out", w.foreign / "config.yaml" / "o"],
                                 "config.yaml is a file, not a folder"),
    "student/dllm2rec-without-teacher": (
        lambda w, t: student(w, t, "--method", "dllm2rec"),
        "--method dllm2rec distils a teacher: give one with --teacher"),
    "student/teacher-of-another-dataset": (lambda w, t: student(w, t, "--teacher", w.other_teacher),
                                           "other-teacher/teacher.json: teacher was made on dataset"),
    "student/sr-folder-as-teacher": (lambda w, t: student(w, t, "--teacher", w.sr),
                                     "sasrec: not a teacher folder (no teacher.json)"),
    "student/pop-model": (lambda w, t: [*student(w, t, "--teacher", w.teacher), "--model", "pop"],
                          "--model pop: a student is one of sasrec, gru4rec, caser"),
    # run / demo: the pipeline config and flags
    "run/missing-config": (lambda w, t: ["run", t / "nope.yaml"], "nope.yaml: config file not found"),
    "run/unknown-section": (
        lambda w, t: ["run", write(t / "run.yaml", "data:\n  format: synthetic\nstage3: {}\n"), "--dry-run"],
        "run.yaml: unknown key 'stage3'; did you mean 'stage2'?"),
    "run/yaml-syntax-error": (
        lambda w, t: ["run", write(t / "run.yaml", "data:\n  format: synthetic\n   seed: 1\n"), "--dry-run"],
        "run.yaml:3: invalid YAML"),
    "run/wrong-type": (
        lambda w, t: ["run", write(t / "run.yaml", "data:\n  num_candidates: many\n"), "--dry-run"],
        "run.yaml section 'data': key 'num_candidates' expects int, got 'many'"),
    "run/unknown-stage": (
        lambda w, t: ["run", write(t / "run.yaml", "data:\n  format: synthetic\n"), "--only", "stage3", "--dry-run"],
        "--only stage3: unknown stage; expected one of: data, sr,"),
    "run/out-is-a-foreign-folder": (
        lambda w, t: ["run", write(t / "run.yaml", "data:\n  format: synthetic\n"), "--out", w.foreign],
        "foreign is not empty and is not a delrec run folder"),
    "run/out-under-a-file": (
        lambda w, t: ["run", write(t / "run.yaml", "data:\n  format: synthetic\n"), "--out",
                      w.foreign / "config.yaml" / "run"], "config.yaml is a file, not a folder"),
    "demo/unknown-stage": (lambda w, t: ["demo", "--from", "training", "--dry-run", "--out", t / "demo"],
                           "--from training: unknown stage"),
}




def guarded(w) -> dict[str, dict[str, str]]:
    """Every folder of the fixture world: none may change when a command fails."""
    folders = [w.data, w.llm, w.stage2, w.sr, w.teacher, w.other, w.other_teacher, w.preds, w.finished_sr,
               w.finished_stage2, w.base_llm, w.same_size, w.emptied, w.moved_base_stage2, w.foreign]
    return {str(folder): snapshot(folder) for folder in folders}


@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=entry[2:]) for name, entry in CASES.items()], ids=list(CASES)
)
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(case, w, tmp_path, capsys, monkeypatch):
    build, expected = CASES[case][:2]
    if "vllm" in case:  # the stage-2 refusal comes before vLLM is needed: a stand-in module suffices
        monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    argv = build(w, tmp_path)
    before = guarded(w)
    capsys.readouterr()
    code = run_cli(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].strip() and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("delrec")
    assert guarded(w) == before


def test_a_failed_attempt_does_not_block_the_corrected_command(w, tmp_path, capsys):
    """A stage that failed before its first checkpoint leaves a run.json; the corrected command replaces it
    instead of refusing 'another configuration'."""
    assert run_cli(distill(w, tmp_path, "--max_length", "20")) == 2
    assert "longer than max_length 20" in capsys.readouterr().err
    assert (tmp_path / "stage1" / "run.json").is_file()
    assert run_cli(distill(w, tmp_path, "--max_length", "512", model=w.sr)) == 2  # gets past the old record
    assert "is a delrec SR model folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["data", "prepare", "--format", "synthetic", "--synthetic_items", "5", "--out", "{tmp}/o"], "--synthetic_items 5"),
    (["sr", "predict", "--model", "{sr}", "--data", "{data}", "--split", "test", "--topk", "41", "--out", "{tmp}/p"],
     "--topk 41 must be between 1"),
], ids=["prepare", "predict"])
def test_the_console_script_exits_2_without_a_traceback(argv, expected, w, tmp_path):
    script = Path(sys.executable).with_name("delrec")
    argv = [a.format(tmp=tmp_path, sr=w.sr, data=w.data) for a in argv]
    done = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and expected in lines[0], done.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("argv", [
    ["data", "prepare", "--format", "synthetic", "--out", "{tmp}/prepared"],
    ["sr", "train", "--data", "{data}", "--model", "sasrec", "--out", "{tmp}/sasrec", *TINY_SASREC_FLAGS],
], ids=["prepare", "sr-train"])
def test_a_full_disk_is_one_line_and_leaves_no_half_written_folder(argv, w, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # every atomic write syncs before its rename
    assert run_cli([str(a).format(tmp=tmp_path, data=w.data) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device; no space left on the device; free some space" in err, err
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name == "checkpoint"]
    assert leftovers == [], leftovers
