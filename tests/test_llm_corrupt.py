"""Corrupt files and full disks in the LLM stack (issue #36, item 5): one line naming the file, exit 2, nothing
written, and no partial checkpoint left for a re-run to resume from.

Stage-2 folders, base model folders and Trainer checkpoints are copies of the tiny session fixtures damaged in one
place each; GGUF headers are written here byte by byte. A full disk is a write that raises what the library
raises when the disk is full (measured on a full tmpfs): safetensors and tokenizers their own error ending in
"(os error 28)", torch's zip writer a RuntimeError without an errno, Python an OSError.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cli_checks import snapshot
from delrec.cli import main
from delrec.errors import DelrecError
from delrec.llm import gguf_import
from test_gguf_import import tiny_gguf

DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"  # torch.save's
# not the error: a progress bar (transformers draws one while loading) and transformers' own log lines (the Trainer
# warns once when two checkpoints are less than a second apart)
CHATTER = re.compile(r"\d+/\d+ \[[^]]*(it|inst)/s\]$|^\[transformers\] ")


def one_line_error(capsys, argv) -> str:
    """Run `delrec ARGV`: exit 2 and one line of error on stderr, no traceback; return the line."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not CHATTER.search(line)]
    assert len(lines) == 1 and lines[0].startswith("delrec ") and "Traceback" not in err, err
    return lines[0]




def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def drop_first_tensor(path: Path) -> None:
    tensors = load_file(path)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, path)


def pickled_object(marker: Path):
    class Payload:  # unpickling it would create `marker`
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    return {"state": Payload()}


def pickled_weights(path: Path) -> None:
    """Replace the weights at `path` by a pytorch_model.bin holding a pickled object (it would create `code-ran`)."""
    path.unlink()
    torch.save(pickled_object(path.parent / "code-ran"), path.parent / "pytorch_model.bin")


# ----------------------------------------------------------------------------- stage-2 and base model folders

STAGE2_DAMAGE = {
    "adapter-cut-short": ("adapter_model.safetensors", cut_short,
                          "adapter_model.safetensors: not a readable safetensors file"),
    "adapter-lacks-a-tensor": ("adapter_model.safetensors", drop_first_tensor,
                               "adapter_model.safetensors: lacks 1 of the adapter's tensors"),
    "adapter-config-cut-short": ("adapter_config.json", cut_short, "invalid JSON"),
    "adapter-config-not-lora": ("adapter_config.json", lambda p: edit_json(p, lambda d: d.update(peft_type="IA3")),
                                "adapter_config.json: not a LoRA adapter config (field 'peft_type'"),
    "adapter-config-other-rank": ("adapter_config.json", lambda p: edit_json(p, lambda d: d.update(r=8)),
                                  "adapter_model.safetensors: does not fit"),
    "soft-prompt-cut-short": ("soft_prompt.safetensors", cut_short,
                              "soft_prompt.safetensors: not a readable safetensors file"),
    "delrec-json-without-base": ("delrec.json", lambda p: edit_json(p, lambda d: d.pop("base_model")),
                                 "delrec.json: field 'base_model' must be an object"),
    "tokenizer-cut-short": ("tokenizer.json", cut_short, "invalid JSON"),
}


@pytest.mark.parametrize("case", list(STAGE2_DAMAGE))
def test_rank_names_the_damaged_file_of_a_stage2_folder(case, stage2_llama, tiny_llm_data, tmp_path, capsys):
    name, damage, expected = STAGE2_DAMAGE[case]
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    damage(folder / name)
    err = one_line_error(capsys, ["rank", "--model", folder, "--data", tiny_llm_data, "--out", tmp_path / "ranks",
                                  "--device", "cpu", "--max_instances", "2"])
    assert f"{folder / name}" in err and expected in err, err
    assert not (tmp_path / "ranks").exists()


BASE_DAMAGE = {
    "weights-cut-short": ("model.safetensors", cut_short, "model.safetensors: not a readable safetensors file"),
    "weights-lack-a-tensor": ("model.safetensors", drop_first_tensor, "model.safetensors: lacks 1 tensor(s)"),
    "config-of-another-size": ("config.json", lambda p: edit_json(p, lambda d: d.update(hidden_size=64)),
                               "model.safetensors: tensor"),
    "weights-of-pickled-objects": ("model.safetensors", pickled_weights,
                                   "pytorch_model.bin: holds pickled Python objects, which delrec does not load"),
    "config-cut-short": ("config.json", cut_short, "config.json:"),
    "tokenizer-config-cut-short": ("tokenizer_config.json", cut_short, "tokenizer_config.json:"),
}


@pytest.mark.parametrize("case", list(BASE_DAMAGE))
def test_a_damaged_base_model_is_one_line_naming_the_file(case, tiny_llama, tiny_llm_data, tmp_path, capsys):
    name, damage, expected = BASE_DAMAGE[case]
    folder = shutil.copytree(tiny_llama, tmp_path / "base")
    damage(folder / name)
    err = one_line_error(capsys, ["rank", "--model", folder, "--data", tiny_llm_data, "--out", tmp_path / "ranks",
                                  "--device", "cpu", "--max_instances", "2"])
    assert expected in err and str(folder) in err, err
    assert not (tmp_path / "ranks").exists() and not (folder / "code-ran").exists()


def test_a_stage2_folder_on_a_damaged_base_names_the_base_file(stage2_llama, tiny_llama, tiny_llm_data, tmp_path,
                                                                capsys):
    base = shutil.copytree(tiny_llama, tmp_path / "base")
    cut_short(base / "model.safetensors")
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    edit_json(folder / "delrec.json", lambda d: d["base_model"].update(model_name_or_path=str(base)))
    err = one_line_error(capsys, ["export", "--model", folder, "--out", tmp_path / "merged"])
    assert f"{base / 'model.safetensors'}: not a readable safetensors file" in err, err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", [
    ["teacher", "export", "--model", "{model}", "--data", "{data}", "--out", "{out}", "--device", "cpu",
     "--max_instances", "2"],
    ["export", "--model", "{model}", "--out", "{out}"],
], ids=["teacher-export", "export"])
def test_teacher_export_and_export_name_a_damaged_adapter(command, stage2_llama, tiny_llm_data, tmp_path, capsys):
    folder = shutil.copytree(stage2_llama, tmp_path / "stage2")
    cut_short(folder / "adapter_model.safetensors")
    argv = [a.format(model=folder, data=tiny_llm_data, out=tmp_path / "out") for a in command]
    err = one_line_error(capsys, argv)
    assert f"{folder / 'adapter_model.safetensors'}: not a readable safetensors file" in err, err
    assert not (tmp_path / "out").exists()


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(stage2_llama, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    err = one_line_error(capsys, ["export", "--model", stage2_llama, "--out", tmp_path / "merged"])
    assert f"{tmp_path / 'merged'}: No space left on device" in err and "free some space" in err, err
    assert list(tmp_path.iterdir()) == []  # neither the export nor its staging folder


# ----------------------------------------------------------------------------- GGUF headers


def gguf(version: int = 3, tensors: int = 0, entries: int = 0, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, entries) + body + bytes(64)


def string(text: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text


ARCH = string(b"general.architecture")
HUGE_HEADERS = {
    "2^62-tensors": (gguf(tensors=2**62), "claims 4611686018427387904 tensors"),
    "2^62-entries": (gguf(entries=2**62), "claims 4611686018427387904 metadata entries"),
    "2^40-byte-key": (gguf(entries=1, body=string(b"general", 2**40)), "claims 1099511627776 bytes"),
    "2^40-byte-value": (gguf(entries=1, body=ARCH + struct.pack("<I", 8) + string(b"llama", 2**40)),
                        "the value of 'general.architecture' at byte"),
    "2^62-strings": (gguf(entries=1, body=ARCH + struct.pack("<IIQ", 9, 8, 2**62)),
                     "claims 4611686018427387904 strings"),
    "2^40-numbers": (gguf(entries=1, body=ARCH + struct.pack("<IIQ", 9, 4, 2**40)), "claims 4398046511104 bytes"),
    "2^32-dimensions": (gguf(tensors=1, body=string(b"w") + struct.pack("<I", 2**32 - 1)),
                        "tensor 'w' claims 4294967295 dimensions"),
    "version-1": (gguf(version=1), "GGUF version 1; delrec reads versions 2 and 3"),
}




@pytest.fixture()
def private_cache(tmp_path, monkeypatch) -> Path:
    pytest.importorskip("gguf", reason="needs the gguf package: pip install 'delrec[gemma]'")
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("case", list(HUGE_HEADERS))
def test_a_gguf_header_claiming_more_than_its_file_holds_is_one_line(case, private_cache, tmp_path, capsys):
    content, expected = HUGE_HEADERS[case]
    source = tmp_path / "model.gguf"
    source.write_bytes(content)
    err = one_line_error(capsys, ["llm", "import", source, "--out", tmp_path / "out"])
    assert f"{source}: " in err and expected in err, err
    assert not (tmp_path / "out").exists() and not private_cache.exists()


def test_gguf_counts_and_lengths_are_bounded_by_the_file_before_anything_is_allocated(tmp_path):
    pytest.importorskip("gguf")  # imported before measuring: the import itself allocates
    for case, (content, _) in HUGE_HEADERS.items():
        source = tmp_path / f"{case}.gguf"
        source.write_bytes(content)
        tracemalloc.start()
        with pytest.raises(DelrecError):
            gguf_import.check_gguf_file(source)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, (case, peak)


def test_a_gguf_cut_short_in_its_tensor_data_is_one_line(private_cache, tmp_path, capsys):
    source = tiny_gguf(tmp_path / "model.gguf", "llama")
    source.write_bytes(source.read_bytes()[:-16])
    err = one_line_error(capsys, ["llm", "import", source, "--out", tmp_path / "out"])
    assert f"{source}: cut short: the data of tensor 'token_embd.weight' ends at byte" in err, err
    assert not (tmp_path / "out").exists() and not private_cache.exists()


def test_a_full_disk_while_converting_a_gguf_leaves_no_cache_folder(private_cache, tmp_path, capsys, monkeypatch):
    def convert(gguf_path, digest, out, packaged):
        (out / "config.json").write_text("{}")
        raise SafetensorError(DISK_FULL)  # what model.save_pretrained raises on a full disk

    monkeypatch.setattr(gguf_import, "_convert", convert)
    source = tiny_gguf(tmp_path / "model.gguf", "llama")
    err = one_line_error(capsys, ["llm", "import", source, "--out", tmp_path / "out"])
    assert f"{private_cache / 'gguf'}" in err and "No space left on device" in err, err
    assert not (tmp_path / "out").exists()
    assert [p for p in private_cache.rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------- stage-2 checkpoints

STAGE2_FLAGS = ["--model_name_or_path", "{llm}", "--data", "{data}", "--soft_prompt", "random",
                "--soft_prompt_tokens", "2", "--r", "2", "--lora_alpha", "4", "--max_train_instances", "8",
                "--eval_max_instances", "2", "--test_max_instances", "2", "--max_length", "512",
                "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_steps", "1", "--logging_steps", "1",
                "--warmup_steps", "0", "--device", "cpu", "--dtype", "float32", "--num_threads", "1", "--no_progress"]


def finetune(out: Path, llm: Path, data: Path) -> list[str]:
    return ["llm", "finetune", "--out", str(out), *[a.format(llm=llm, data=data) for a in STAGE2_FLAGS]]


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tiny_llm_data, tmp_path_factory) -> Path:
    """A finished stage-2 run: checkpoints/checkpoint-1 and checkpoint-2, the adapter, metrics.json. A run folder
    remembers its path (run.json), so tests damage files in place with `restored`, which puts them back."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    assert main(finetune(out, tiny_llama, tiny_llm_data)) == 0
    return out


@contextlib.contextmanager
def restored(*paths: Path):
    """Put the files at `paths` back as they were after the block."""
    saved = {path: path.read_bytes() for path in paths}
    try:
        yield
    finally:
        for path, content in saved.items():
            path.write_bytes(content)


CHECKPOINT_DAMAGE = {
    "optimizer-cut-short": ("optimizer.pt", cut_short, "optimizer.pt: not a readable PyTorch file"),
    "optimizer-pickled-object": ("optimizer.pt", None, "optimizer.pt: holds pickled Python objects, which delrec does "
                                                       "not load (they could run code): Trying to load unsupported "
                                                       "GLOBAL os.makedirs"),
    "rng-state-cut-short": ("rng_state.pth", cut_short, "rng_state.pth: not a readable PyTorch file"),
    "trainer-state-cut-short": ("trainer_state.json", cut_short, "trainer_state.json:"),
    "trainer-state-of-another-kind": ("trainer_state.json", lambda p: p.write_text('{"epochs": 3}'),
                                      "trainer_state.json: not a Trainer state"),
    "adapter-cut-short": ("adapter_model.safetensors", cut_short,
                          "adapter_model.safetensors: not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_resuming_from_a_damaged_checkpoint_is_one_line_and_changes_nothing(case, finished_run, tiny_llama,
                                                                            tiny_llm_data, tmp_path, capsys):
    name, damage, expected = CHECKPOINT_DAMAGE[case]
    checkpoint = finished_run / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "code-ran"
    with restored(checkpoint / name):
        if damage is None:
            torch.save(pickled_object(marker), checkpoint / name)
        else:
            damage(checkpoint / name)
        before = snapshot(finished_run)
        err = one_line_error(capsys, finetune(finished_run, tiny_llama, tiny_llm_data))
        assert snapshot(finished_run) == before
    assert f"{checkpoint}/{expected}" in err, err
    assert f"delete {checkpoint} to resume from the checkpoint before it" in err, err
    assert not marker.exists()


def test_a_damaged_best_checkpoint_is_named_before_resuming(finished_run, tiny_llama, tiny_llm_data, capsys):
    best, last = finished_run / "checkpoints" / "checkpoint-1", finished_run / "checkpoints" / "checkpoint-2"
    with restored(last / "trainer_state.json", best / "adapter_model.safetensors"):
        edit_json(last / "trainer_state.json", lambda state: state.update(best_model_checkpoint=str(best)))
        cut_short(best / "adapter_model.safetensors")
        err = one_line_error(capsys, finetune(finished_run, tiny_llama, tiny_llm_data))
    assert f"{best / 'adapter_model.safetensors'}: not a readable safetensors file" in err, err
    assert f"this is the best checkpoint so far, which training loads at its end: delete {best}" in err, err


def fail_in(folder_name: str, write, error: Exception):
    """`write(obj, path)`, except that a write into a folder whose name holds `folder_name` writes part of the file
    and raises `error`."""
    def patched(obj, path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and folder_name in Path(path).parent.name:
            Path(path).write_bytes(b"\0" * 64)
            raise error
        return write(obj, path, *args, **kwargs)

    return patched


def disk_full_at(stage: str, folder_name: str, monkeypatch) -> None:
    """Make the write of `stage` fail as on a full disk inside a folder whose name holds `folder_name`."""
    import peft.peft_model
    from transformers.trainer_callback import TrainerState

    if stage == "adapter":  # PEFT's save_pretrained, through safetensors
        monkeypatch.setattr(peft.peft_model, "safe_save_file",
                            fail_in(folder_name, peft.peft_model.safe_save_file, SafetensorError(DISK_FULL)))
    elif stage == "optimizer":  # the Trainer's torch.save of the optimizer state
        monkeypatch.setattr(torch, "save", fail_in(folder_name, torch.save, RuntimeError(TORCH_DISK_FULL)))
    else:  # the trainer state, written last: a half-written one must not count as a complete checkpoint
        def save_to_json(state, path):
            if folder_name in Path(path).parent.name:
                Path(path).write_text('{"global_step": ')  # what the disk took before it was full
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(state, path)

        original = TrainerState.save_to_json
        monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)


@pytest.mark.parametrize("stage", ["adapter", "optimizer", "trainer-state"])
def test_a_full_disk_while_checkpointing_leaves_no_partial_checkpoint(stage, tiny_llama, tiny_llm_data, tmp_path,
                                                                      capsys, monkeypatch):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    with monkeypatch.context() as patch:
        disk_full_at(stage, "checkpoint-2", patch)
        err = one_line_error(capsys, finetune(out, tiny_llama, tiny_llm_data))
    assert str(checkpoints / "checkpoint-2") in err, err
    assert "No space left on device" in err or "most likely the disk is full" in err, err
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-1"]  # no partial, no staging
    assert (checkpoints / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    assert main(finetune(out, tiny_llama, tiny_llm_data)) == 0  # the same command resumes from checkpoint-1
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    state = json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_ndcg@5" in e][:2] == [0, 1]  # step 1 kept from the first


def test_a_full_disk_while_writing_the_final_adapter_keeps_the_folder_resumable(tiny_llama, tiny_llm_data, tmp_path,
                                                                                capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        disk_full_at("adapter", ".run.", patch)  # the staging folder beside OUT, where the final files are written
        err = one_line_error(capsys, finetune(out, tiny_llama, tiny_llm_data))
    assert f"{out}: No space left on device" in err and "free some space and re-run the same command" in err, err
    assert not any((out / name).exists() for name in ("adapter_model.safetensors", "delrec.json", "metrics.json"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left beside it
    assert main(finetune(out, tiny_llama, tiny_llm_data)) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "delrec.json").is_file()
