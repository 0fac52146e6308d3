"""Nothing silent on the LLM side (issue #36, red-team corpus B): weights that are NaN, files from different runs
mixed in one folder, checkpoints of another run, re-runs of a finished run, and inputs that only failed deep inside a
library. Each case is a CLI command on the tiny session fixtures (copies edited in one place): exit 2, one line naming
the file or option and the fact, nothing written and nothing changed; or, for a finished run, exit 0 and a one-line
notice on stdout.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_checks import snapshot
from delrec.cli import main
from delrec.errors import DelrecError
from delrec.llm.loading import LoraSettings, apply_lora
from delrec.llm.tiny import TinyLLMConfig, build_tiny_llm
from llm_fixtures import load_tiny
from ranking_fixtures import make_stage2
from test_gguf_import import tiny_gguf
from test_llm_corrupt import edit_json, finetune, one_line_error

ADAPTER = "adapter_model.safetensors"
SOFT_PROMPT = "soft_prompt.safetensors"


def rank(model, data, out) -> list[str]:
    return [str(a) for a in ("rank", "--model", model, "--data", data, "--out", out, "--device", "cpu",
                             "--max_instances", "2")]


def with_nan(path: Path, name: str | None = None) -> None:
    """Put one NaN into tensor `name` (default: the first) of the safetensors file at `path`, keeping its metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors[name or sorted(tensors)[0]].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def finished(tiny_llama, tiny_llm_data, tmp_path_factory) -> Path:
    """A finished stage-2 run (checkpoints 1 and 2, seed 0); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    assert main(finetune(out, tiny_llama, tiny_llm_data)) == 0
    return out


def stage1(out: Path, llm: Path, data: Path, predictions: Path) -> list:
    return ["llm", "distill-pattern", "--out", out, "--model_name_or_path", llm, "--data", data,
            "--train_predictions", predictions / "train.jsonl", "--valid_predictions", predictions / "valid.jsonl",
            "--soft_prompt_tokens", "2", "--max_train_instances", "8", "--eval_max_instances", "2", "--max_length",
            "512", "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_steps", "1", "--device", "cpu",
            "--dtype", "float32", "--num_threads", "1", "--no_progress"]


def started_but_not_trained(argv: list, monkeypatch) -> None:
    """Run `argv` up to the model load, which fails: OUT then holds the run's record (run.json) and nothing else,
    as after a run stopped before its first checkpoint."""
    def stop(config):
        raise DelrecError("stopped before loading the model")

    with monkeypatch.context() as patch:
        patch.setattr("delrec.llm.loading.load_model", stop)
        assert main([str(a) for a in argv]) == 2


# ----------------------------------------------------------------------------- 1. NaN in LLM weights


def test_build_tiny_refuses_a_pretraining_that_diverged(tiny_llm_data, tmp_path, capsys):
    """B10: learning rate 1e30 breaks every weight after a finite loss; build_info would have said all was well."""
    capsys.readouterr()
    assert main(["llm", "build-tiny", "--data", str(tiny_llm_data), "--out", str(tmp_path / "tiny"),
                 "--learning_rate", "1e30", "--pretrain_steps", "3", "--block_size", "32"]) == 2
    output = capsys.readouterr().err
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("pre-training:")]  # its bar
    assert len(lines) == 1 and "Traceback" not in output, output
    err = lines[0]
    assert "pre-training diverged with learning_rate 1e+30" in err and "holds NaN/inf values" in err, err
    assert "lower --learning_rate" in err and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("name", [ADAPTER, SOFT_PROMPT])
def test_rank_refuses_a_stage2_folder_whose_weights_hold_nan(name, stage2_llama, tiny_llm_data, tmp_path, capsys):
    """A08: one NaN in the adapter (or the soft prompt) made every score NaN, and rank wrote them."""
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    with_nan(folder / name)
    before = snapshot(folder)
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / name}:" in err and re.search(r"NaN(/inf| or inf) value", err), err
    assert not (tmp_path / "ranks").exists() and snapshot(folder) == before


def test_training_refuses_a_base_model_whose_weights_hold_nan(tiny_llama, tiny_llm_data, tmp_path, capsys):
    """D01: a NaN base ended in a traceback from resizing the embeddings."""
    base = shutil.copytree(tiny_llama, tmp_path / "base")
    with_nan(base / "model.safetensors", "model.norm.weight")
    err = one_line_error(capsys, finetune(tmp_path / "run", base, tiny_llm_data))
    assert f"{base / 'model.safetensors'}: tensor 'model.norm.weight' holds 1 NaN/inf value(s)" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- 2. mixed inputs


def test_rank_refuses_a_stage2_folder_whose_base_model_changed(stage2_llama, tiny_llama, tiny_llm_data, tmp_path,
                                                               capsys):
    """E03: the base at the recorded path was replaced by other (valid) weights after training."""
    base = shutil.copytree(tiny_llama, tmp_path / "base")
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    edit_json(folder / "delrec.json", lambda d: d["base_model"].update(model_name_or_path=str(base)))
    assert main(rank(folder, tiny_llm_data, tmp_path / "same")) == 0  # the same content at another path is fine
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.norm.weight"] *= 2
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / 'delrec.json'}: the base model {base} changed since this folder was trained" in err, err
    assert not (tmp_path / "ranks").exists()


def lora_adapter(base: Path, out: Path, r: int) -> Path:
    """A LoRA adapter of rank `r` on `base` (another run's), saved as the stages save theirs."""
    model, _ = load_tiny(base)
    adapted = apply_lora(model, LoraSettings(r=r, lora_alpha=2 * r, lora_dropout=0.0))
    adapted.save_pretrained(str(out), save_embedding_layers=False)
    return out


def test_rank_refuses_an_adapter_of_another_rank_copied_into_a_stage2_folder(stage2_llama, tiny_llama, tiny_llm_data,
                                                                             tmp_path, capsys):
    """A11: adapter_model.safetensors + adapter_config.json of an r=2 run, in a folder whose delrec.json says r=4."""
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    other = lora_adapter(tiny_llama, tmp_path / "other", r=2)
    for name in (ADAPTER, "adapter_config.json"):
        shutil.copyfile(other / name, folder / name)
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / 'adapter_config.json'}: LoRA r 2, but {folder / 'delrec.json'} records 4" in err, err
    assert not (tmp_path / "ranks").exists()


def test_rank_refuses_an_adapter_of_the_same_shape_from_another_run(stage2_llama, tiny_llama, tiny_llm_data, tmp_path,
                                                                    capsys):
    """Same rank, other weights: only the SHA-256 recorded in delrec.json tells them apart."""
    assert "sha256" in json.loads((stage2_llama / "delrec.json").read_text())  # recorded when the folder is written
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    other = make_stage2(tiny_llama, tiny_llm_data, tmp_path / "other", seed=1)
    shutil.copyfile(other / ADAPTER, folder / ADAPTER)
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / ADAPTER}: not the file {folder / 'delrec.json'} was written with" in err, err
    assert not (tmp_path / "ranks").exists()


def test_a_folder_written_before_the_digests_were_recorded_still_loads(stage2_llama, tiny_llm_data, tmp_path):
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    edit_json(folder / "delrec.json", lambda d: d.pop("sha256"))
    assert main(rank(folder, tiny_llm_data, tmp_path / "ranks")) == 0


@pytest.mark.parametrize("where", ["the-base", "a-parent-of-the-base"])
def test_export_refuses_to_write_over_the_base_model(where, stage2_llama, tiny_llama, tmp_path, capsys):
    """E02: --out tiny --overwrite true, where tiny is the stage-2 folder's base, replaced the base by the export."""
    base = shutil.copytree(tiny_llama, tmp_path / "models" / "base")
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    edit_json(folder / "delrec.json", lambda d: d["base_model"].update(model_name_or_path=str(base)))
    out = base if where == "the-base" else base.parent
    before = snapshot(base)
    err = one_line_error(capsys, ["export", "--model", folder, "--out", out, "--overwrite", "true"])
    assert f"--out {out}" in err and ("is the base model folder" in err or "holds the base model" in err), err
    assert snapshot(base) == before


# ----------------------------------------------------------------------------- 3. checkpoints and re-runs


def test_rerunning_a_finished_run_does_nothing_and_says_so(finished, tiny_llama, tiny_llm_data, capsys):
    """K10-K12: each re-run trained one more step and rewrote metrics.json."""
    before = snapshot(finished)
    capsys.readouterr()
    assert main(finetune(finished, tiny_llama, tiny_llm_data)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["global_step"] == 2  # stdout: the recorded summary as JSON, as after training
    first = captured.err.splitlines()[0]
    assert f"{finished}: this finetune run already finished with the same configuration (global_step 2)" in first
    assert "nothing to do" in first and snapshot(finished) == before


def test_a_run_stopped_after_its_last_checkpoint_finishes_without_another_step(finished, tiny_llama, tiny_llm_data,
                                                                               tmp_path):
    """Killed between the last checkpoint and its outputs, the re-run must not train step max_steps + 1 (the
    Trainer resumed at the last step trains one more before it checks)."""
    out = shutil.copytree(finished, tmp_path / "run", ignore=shutil.ignore_patterns("metrics.json", "delrec.json"))
    edit_json(out / "run.json", lambda d: (d.pop("finished"), d["config"].update(out=str(out))))
    argv = finetune(out, tiny_llama, tiny_llm_data)
    assert main(argv) == 0
    done, original = (json.loads((run / "metrics.json").read_text()) for run in (out, finished))
    assert done["global_step"] == 2 and done["test"] == original["test"] and done["valid"] == original["valid"]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert load_file(str(out / ADAPTER)).keys() == load_file(str(finished / ADAPTER)).keys()


def test_resuming_refuses_a_checkpoint_of_another_run(finished, tiny_llama, tiny_llm_data, tmp_path, capsys,
                                                      monkeypatch):
    """K0e: checkpoint-2 of the seed-0 run copied into a seed-1 run was resumed, silently."""
    out = tmp_path / "seed1"
    argv = [*finetune(out, tiny_llama, tiny_llm_data), "--seed", "1"]
    started_but_not_trained(argv, monkeypatch)
    shutil.copytree(finished / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    before = snapshot(out)
    err = one_line_error(capsys, argv)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert f"{checkpoint / 'delrec_run.json'}: this checkpoint was written by a run with seed = 0, not 1" in err, err
    assert f"delete {checkpoint}" in err and snapshot(out) == before


def test_resuming_refuses_a_checkpoint_of_the_other_stage(finished, tiny_llama, tiny_llm_data, tiny_pop, tmp_path,
                                                          capsys, monkeypatch):
    """K08: a stage-2 checkpoint in a stage-1 run failed with "loaded state dict has a different number of parameter
    groups"."""
    out = tmp_path / "stage1"
    argv = stage1(out, tiny_llama, tiny_llm_data, tiny_pop)
    started_but_not_trained(argv, monkeypatch)
    shutil.copytree(finished / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    before = snapshot(out)
    err = one_line_error(capsys, argv)
    assert "this checkpoint was written by a finetune run, not this distill-pattern run" in err, err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 4. one line, not a traceback


def test_finetune_names_target_modules_the_model_does_not_have(tiny_llama, tiny_llm_data, tmp_path, capsys):
    """F06: PEFT's NoMatchingPeftModuleError, raised from inside the Trainer's constructor."""
    err = one_line_error(capsys, [*finetune(tmp_path / "run", tiny_llama, tiny_llm_data), "--target_modules",
                                  "q_proj", "nosuch"])
    assert "LoRA target_modules: 'nosuch' names no module of" in err and "q_proj" in err and "down_proj" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_finetune_refuses_instances_longer_than_the_model_positions(tiny_llm_data, tmp_path, capsys):
    """F08: a 64-position model and the default max_length 1024 only got a transformers warning."""
    short = tmp_path / "short"
    build_tiny_llm(tiny_llm_data, short, TinyLLMConfig(max_position_embeddings=64, block_size=32), progress=False)
    flags = finetune(tmp_path / "run", short, tiny_llm_data)
    del flags[flags.index("--max_length"):flags.index("--max_length") + 2]  # the default, 1024
    err = one_line_error(capsys, flags)
    assert ("lsr instances (train) are longer than the model's length limit of 64 tokens (max_position_embeddings)"
            in err), err
    assert "the longest needs" in err and "allow_truncation" in err


def test_finetune_refuses_more_candidates_than_the_catalogue_has(tiny_llama, tiny_llm_data, tmp_path, capsys):
    err = one_line_error(capsys, [*finetune(tmp_path / "run", tiny_llama, tiny_llm_data), "--num_candidates", "1000"])
    assert "num_candidates 1000 exceeds the 40 items of" in err and "choose at most 40" in err, err


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_without_a_tokenizer_is_one_line(private_cache, tmp_path, capsys):
    """G1/G2: transformers' ValueError "Cannot build a tokenizer from a GGUF file stating tokenizer None"."""
    gguf = tiny_gguf(tmp_path / "bare.gguf", "llama")
    err = one_line_error(capsys, ["llm", "import", gguf, "--out", tmp_path / "out"])
    assert f"{gguf}: holds no tokenizer transformers can build" in err, err
    assert not (tmp_path / "out").exists()


def test_a_gguf_whose_tensors_do_not_fit_its_config_is_one_line(private_cache, tmp_path, capsys):
    """G3: a model missing its layers ended in an IndexError while measuring the BOS rule."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "badshapes.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for key, value in (("llama.context_length", 64), ("llama.embedding_length", 8), ("llama.feed_forward_length", 16),
                       ("llama.attention.head_count", 2), ("llama.attention.head_count_kv", 2)):
        writer.add_uint32(key, value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "</s>", "a", "b", "c", "ab"])
    writer.add_token_types([3, 3, 1, 1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    capsys.readouterr()
    assert main(["llm", "import", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("delrec llm import")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{path}: lacks" in lines[0] and "tensor(s) of the model" in lines[0], err
    assert not (tmp_path / "out").exists() and not any(p.is_file() for p in private_cache.rglob("*"))


# ----------------------------------------------------------------------------- 5, 6. what a folder says


def test_a_stage_folder_without_its_delrec_json_says_so(stage2_llama, tiny_llm_data, tmp_path, capsys):
    """A07: it was called "a PEFT adapter folder; load its base model and then the adapter"."""
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    (folder / "delrec.json").unlink()
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder} is a DELRec stage folder (it holds {SOFT_PROMPT}) without its delrec.json" in err, err
    assert "PEFT adapter" not in err


def test_a_template_recorded_as_a_path_is_refused(stage2_llama, tiny_llm_data, tmp_path, capsys):
    """S10: delrec.json's template name ../../../../tmp/x made rank read any .jinja file on disk."""
    outside = tmp_path / "outside.jinja"
    outside.write_text("{% block prompt %}{{ history }}{% endblock %}")
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    name = "../" * 12 + str(outside.with_suffix("")).lstrip("/")
    edit_json(folder / "delrec.json", lambda d: d["template"].update(name=name))
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / 'delrec.json'}: field 'template' must be" in err and "not a path" in err, err
    err = one_line_error(capsys, [*rank(stage2_llama, tiny_llm_data, tmp_path / "ranks"), "--template", name])
    assert "is not a template name but a path" in err and "--prompts_dir" in err, err
    assert not (tmp_path / "ranks").exists()


# ----------------------------------------------------------------------------- 7. issue #36, round C


@pytest.mark.parametrize("metric", ["bogus_metric", "hr@1000"])
def test_an_unknown_best_model_metric_is_refused_before_anything_loads(metric, tiny_llama, tiny_llm_data, tmp_path,
                                                                       capsys):
    """c85/c86: transformers' KeyError 'eval_bogus_metric' came after training, leaving OUT behind."""
    err = one_line_error(capsys, [*finetune(tmp_path / "run", tiny_llama, tiny_llm_data), "--metric_for_best_model",
                                  metric])
    assert f"--metric_for_best_model '{metric}' is not a metric this stage reports" in err, err
    assert "hr@1, hr@5, ndcg@5, chance@1" in err and not (tmp_path / "run").exists()


def test_a_stage_folder_passed_as_the_base_model_says_what_to_pass(stage2_llama, tiny_llama, tiny_llm_data, tmp_path,
                                                                   capsys):
    """c59: a stage-2 folder with its delrec.json was said to be "without its delrec.json"."""
    err = one_line_error(capsys, finetune(tmp_path / "run", stage2_llama, tiny_llm_data))
    assert f"{stage2_llama} is a DELRec stage 2 (finetune) folder" in err and "not a base model" in err, err
    assert "without its" not in err and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("field, value", [("format_version", "1"), ("item_tokens", "yes"), ("domain", 7),
                                          ("base_model", {"model_name_or_path": "x", "trust_remote_code": "false"})])
def test_a_stage2_description_with_a_field_of_the_wrong_type_names_it(field, value, stage2_llama, tiny_llm_data,
                                                                      tmp_path, capsys):
    """V3: wrong types in delrec.json met misleading messages (or none)."""
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    edit_json(folder / "delrec.json", lambda d: d.update({field: value}))
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / 'delrec.json'}: field '{field}' must be" in err, err
    assert not (tmp_path / "ranks").exists()


@pytest.mark.parametrize("name", [ADAPTER, SOFT_PROMPT])
def test_rank_refuses_integer_weights_that_would_be_cast_without_a_word(name, stage2_llama, tiny_llm_data, tmp_path,
                                                                       capsys):
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    with safe_open(str(folder / name), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(folder / name))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].to(torch.int64)
    save_file(tensors, str(folder / name), metadata=metadata)
    before = snapshot(folder)
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / name}:" in err and ("int64" in err or "I64" in err) and "floating-point" in err, err
    assert not (tmp_path / "ranks").exists() and snapshot(folder) == before


def test_a_stage_folder_whose_base_was_moved_names_the_record_and_the_path(stage2_llama, tiny_llm_data, tmp_path,
                                                                          capsys):
    """V4: 'model folder not found: /abs/path' named neither the folder that points there nor what to do."""
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    gone = str(tmp_path / "moved-away")
    edit_json(folder / "delrec.json", lambda info: info["base_model"].update(model_name_or_path=gone))
    err = one_line_error(capsys, rank(folder, tiny_llm_data, tmp_path / "ranks"))
    assert f"{folder / 'delrec.json'} field 'base_model': the base model {gone} it was trained on is not there" in err
    assert not (tmp_path / "ranks").exists()


def test_a_checkpoint_written_before_an_option_existed_resumes_while_the_option_is_unset(tmp_path):
    """Adding `listwise_negatives` to stage 2 changed every run's identity hash, so the checkpoints of runs started
    before it (hours of games LoRA) could not be resumed; options are compared by name, a missing one as unset."""
    from delrec.errors import DelrecError
    from delrec.llm.run_folder import RUN_IDENTITY_FILE, _check_identity, run_identity

    before = {"seed": 0, "objective": "listwise", "out": "a"}
    checkpoint = tmp_path / "checkpoint-96"
    checkpoint.mkdir()
    (checkpoint / RUN_IDENTITY_FILE).write_text(json.dumps(run_identity("finetune", before)))
    now = run_identity("finetune", {**before, "listwise_negatives": None})
    assert now["sha256"] != json.loads((checkpoint / RUN_IDENTITY_FILE).read_text())["sha256"]
    _check_identity(checkpoint, now, "remedy")  # accepted
    with pytest.raises(DelrecError, match="written by a run with listwise_negatives = None, not 7; remedy"):
        _check_identity(checkpoint, run_identity("finetune", {**before, "listwise_negatives": 7}), "remedy")
