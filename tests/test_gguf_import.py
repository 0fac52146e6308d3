"""`delrec llm import` and `.gguf` model paths: what is refused, with one line and exit 2, before any conversion.

These need no real model (a few-byte GGUF is written here); the real import is tested in
tests/test_gemma.py.
"""

from __future__ import annotations

import importlib.util

import pytest

from delrec.cli import main
from delrec.llm import gguf_import
from delrec.llm.gguf_import import PACKAGED_MODELS, PackagedModel, bos_evidence
from llm_fixtures import load_tiny


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def tiny_gguf(path, architecture: str):
    """A valid GGUF header and one tensor, of any architecture name."""
    gguf = pytest.importorskip("gguf", reason="needs the gguf package: pip install 'delrec[gemma]'")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("command", ["import", "rank"])
def test_bad_gguf_sources_are_refused_in_one_line(command, tiny_llm_data, tmp_path, capsys):
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    unknown = tiny_gguf(tmp_path / "bogus.gguf", "bogusarch")

    def argv(source):
        if command == "import":
            return ["llm", "import", str(source), "--out", str(tmp_path / "out")]
        return ["rank", "--model", str(source), "--data", str(tiny_llm_data), "--out", str(tmp_path / "out")]

    assert "GGUF file not found" in one_line_error(capsys, argv(tmp_path / "missing.gguf"))
    assert "not a GGUF file (it starts with b'hell'" in one_line_error(capsys, argv(text))
    err = one_line_error(capsys, argv(unknown))
    assert "transformers cannot read this GGUF" in err and "bogusarch" in err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_import_refuses_unknown_names_occupied_outputs_and_a_missing_extra(tmp_path, capsys, monkeypatch):
    err = one_line_error(capsys, ["llm", "import", "gemma-4", "--out", str(tmp_path / "out")])
    assert "neither a file nor a packaged model" in err and "gemma-3-270m" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    err = one_line_error(capsys, ["llm", "import", "gemma-3-270m", "--out", str(tmp_path / "busy")])
    assert "already exists; pass --overwrite" in err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_error(capsys, ["llm", "import", "gemma-3-270m", "--out", str(tmp_path / "file" / "m")])
    monkeypatch.setitem(PACKAGED_MODELS, "gemma-3-270m", PackagedModel("no_such_module_here", "some-dist", "x.gguf"))
    err = one_line_error(capsys, ["llm", "import", "gemma-3-270m", "--out", str(tmp_path / "out")])
    assert "some-dist, which is not installed" in err and "pip install 'delrec[gemma]'" in err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else object())
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(20))
    err = one_line_error(capsys, ["llm", "import", str(gguf_file), "--out", str(tmp_path / "out")])
    assert "needs the gguf package" in err and "pip install 'delrec[gemma]'" in err
    assert not (tmp_path / "out").exists()


def test_import_refuses_to_write_over_its_own_gguf(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    source = tiny_gguf(folder / "m.gguf", "llama")
    err = one_line_error(capsys, ["llm", "import", str(source), "--out", str(folder), "--overwrite"])
    assert "holds the GGUF file" in err and source.is_file()


def test_bos_is_chosen_by_the_lower_loss(tiny_llama):
    model, tokenizer = load_tiny(tiny_llama)
    evidence = bos_evidence(model, tokenizer)
    losses = evidence["loss_nats_per_token"]
    assert evidence["add_bos"] == (losses["with_bos"] < losses["without_bos"])
    assert evidence["probes"] == len(gguf_import.BOS_PROBES)


def test_a_second_import_links_the_cached_weights_and_copies_the_text_files(tmp_path, monkeypatch):
    from delrec.io import write_json

    source = tiny_gguf(tmp_path / "model.gguf", "gemma3")
    conversions = []

    def convert(gguf_path, digest, out, packaged):  # stands in for transformers' 90 s conversion
        conversions.append(digest)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "tokenizer_config.json").write_text("{}")
        write_json(out / gguf_import.IMPORT_FILE, {"sha256": digest})

    monkeypatch.setattr(gguf_import, "_convert", convert)
    first, second = tmp_path / "first", tmp_path / "second"
    assert gguf_import.import_model(str(source), first)["sha256"] == conversions[0]
    gguf_import.import_model(str(source), second)
    cached = gguf_import.converted_folder(source)
    assert len(conversions) == 1
    for out in (first, second):
        assert (out / "model.safetensors").samefile(cached / "model.safetensors")
        assert not (out / "tokenizer_config.json").samefile(cached / "tokenizer_config.json")
    (first / "tokenizer_config.json").write_text('{"edited": true}')  # an edit in place stays in its folder
    assert (cached / "tokenizer_config.json").read_text() == "{}"
