"""`delrec llm build-tiny`: a plain Hugging Face folder, loadable with no delrec code."""

import json

import pytest
from safetensors.torch import load_file

from delrec.cli import main
from delrec.errors import DelrecError
from delrec.llm.tiny import (
    FALLBACK_PROMPT_TEXT,
    TinyLLMConfig,
    build_tiny_llm,
    history_texts,
    tokenizer_corpus,
)


def test_folder_loads_with_plain_transformers(tiny_llm, tiny_llm_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    info = json.loads((tiny_llm / "build_info.json").read_text())
    arch = info["arch"]
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    config = model.config
    assert config.hidden_size // config.num_attention_heads == 64  # the vLLM CPU build needs head_dim 64
    assert config.tie_word_embeddings == (arch == "qwen2")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (arch == "qwen2")
    assert config.vocab_size == len(tokenizer) == info["vocab_size"]
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["final_loss"] < info["first_loss"] and info["seconds"] > 0
    assert (tiny_llm / "generation_config.json").is_file()
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {
        "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"}

    title = "Café Björk: Deluxe Edition (1999)"  # byte-level BPE: any text round-trips, digits one by one
    ids = tokenizer(title).input_ids
    assert (ids[0] == tokenizer.bos_token_id) == (arch == "llama")  # as in the real families
    assert tokenizer.decode(ids, skip_special_tokens=True) == title
    assert tokenizer.tokenize("1999") == ["1", "9", "9", "9"]


def test_cli_builds_pretrains_and_refuses_to_overwrite(tiny_llm_data, tmp_path, capsys):
    out = tmp_path / "llm"
    argv = ["llm", "build-tiny", "--data", str(tiny_llm_data), "--out", str(out), "--arch", "qwen2",
            "--pretrain-steps", "3", "--batch-size", "2", "--block-size", "32", "--max_position_embeddings", "256"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["arch"] == "qwen2" and summary["parameters"] > 0 and "final_loss" in summary
    weights = load_file(out / "model.safetensors")

    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0  # same seed: the same weights
    again = load_file(out / "model.safetensors")
    assert weights.keys() == again.keys() and all((weights[k] == again[k]).all() for k in weights)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_bad_options_are_one_line_errors(tiny_llm_data, tmp_path, capsys):
    assert main(["llm", "build-tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["llm", "build-tiny", "--data", str(tiny_llm_data), "--out", str(tmp_path / "o"), "--block_size", "4096"]) == 2
    assert "block_size" in capsys.readouterr().err
    with pytest.raises(DelrecError, match="prompt template folder not found"):
        build_tiny_llm(tiny_llm_data, tmp_path / "o", TinyLLMConfig(prompts_dir=str(tmp_path / "none")))


def test_tokenizer_corpus_reads_every_template_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jinja").write_text("Zephyrine {{ history }}")
    (tmp_path / "sub" / "b.yaml").write_text("noun: quokka")
    texts = tokenizer_corpus(["Title One"], str(tmp_path))
    assert texts[0] == "Title One" and texts[-1] == FALLBACK_PROMPT_TEXT
    assert "Zephyrine {{ history }}" in texts and "noun: quokka" in texts
    shipped = tokenizer_corpus([], None)  # the repository's templates by default
    assert any("{% block prompt %}" in text for text in shipped)


def test_history_texts_read_each_rows_user_once():
    from delrec.data.dataset import Instance

    class Rows:  # rows data: each user as every prefix, then sliding windows, plus the next item
        titles = ["A", "B", "C", "D", "E"]

        def instances(self, split):
            rows = [((), 0), ((0,), 1), ((0, 1), 2), ((1, 2), 3)]  # A B C D (windows of 2 from the 4th row)
            rows += [((), 4), ((4,), 2), ((4, 2), 0)]  # E C A
            return [Instance(i, history, target) for i, (history, target) in enumerate(rows)]

    assert history_texts(Rows()) == ["A; B; C; D", "E; C; A"]
