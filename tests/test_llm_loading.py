"""Loading causal LMs (tiny Llama and Qwen2), pad tokens, LoRA, and the one-line errors for bad input."""

import json
import shutil

import pytest
import torch

from delrec.config import parse_command
from delrec.errors import DelrecError
from delrec.llm import loading
from delrec.llm.loading import LoraSettings, ModelConfig, apply_lora, embeddings_tied, load_model
from llm_fixtures import load_tiny


def one_line_error(config: ModelConfig) -> str:
    with pytest.raises(DelrecError) as info:
        load_model(config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_loads_both_families_on_cpu_with_a_pad_token(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert embeddings_tied(model) == (model.config.model_type == "qwen2")
    logits = model(**tokenizer(["Crimson Voyage II"], return_tensors="pt")).logits
    assert logits.shape[-1] == model.get_input_embeddings().num_embeddings


def test_dtype_option(tiny_qwen2):
    model, _ = load_model(ModelConfig(str(tiny_qwen2), dtype="bfloat16", device="cpu"))
    assert model.dtype == torch.bfloat16


def test_missing_pad_token_becomes_eos(tiny_llama, tmp_path):
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_llama, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token")
    config_file.write_text(json.dumps(config))
    model, tokenizer = load_tiny(folder)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.eos_token_id == model.generation_config.pad_token_id


def test_no_pad_and_no_eos_adds_a_pad_token_and_grows_the_embeddings(tiny_qwen2, monkeypatch):
    monkeypatch.setattr(loading, "FALLBACK_PAD_TOKEN", "<|new-pad|>")
    model, tokenizer = load_tiny(tiny_qwen2)
    rows = model.get_input_embeddings().num_embeddings
    tokenizer.pad_token = tokenizer.eos_token = None
    loading.ensure_pad_token(model, tokenizer)
    assert tokenizer.pad_token == "<|new-pad|>" and tokenizer.pad_token_id == rows
    assert model.get_input_embeddings().num_embeddings == rows + 1 and embeddings_tied(model)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_lora_trains_only_the_adapter(tiny_llm, targets):
    model, _ = load_tiny(tiny_llm)
    model = apply_lora(model, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    if targets == ["all-linear"]:
        assert any("mlp" in name for name in trainable) and not any("lm_head" in name for name in trainable)


def test_lora_with_unknown_target_is_a_one_line_error(tiny_llama):
    model, _ = load_tiny(tiny_llama)
    with pytest.raises(DelrecError, match="target_modules"):
        apply_lora(model, LoraSettings(target_modules=["no_such_proj"]))


def test_configs_work_as_cli_options():
    model, lora = parse_command(
        [ModelConfig, LoraSettings],
        ["--model_name_or_path", "m", "--dtype", "bfloat16", "--load_in_4bit", "--target_modules", "q_proj", "v_proj"],
        "test",
    )
    assert model.load_in_4bit and model.dtype == "bfloat16" and lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(DelrecError, match="not both"):
        parse_command([ModelConfig], ["--model_name_or_path", "m", "--load_in_4bit", "--load_in_8bit"], "test")
    with pytest.raises(DelrecError, match="all-linear"):
        parse_command([LoraSettings], ["--target_modules", "all-linear", "q_proj"], "test")


def test_missing_path(tmp_path):
    assert "model folder not found" in one_line_error(ModelConfig(str(tmp_path / "nope" / "model")))


def test_a_file_instead_of_a_folder(tiny_llama):
    assert "is a file" in one_line_error(ModelConfig(str(tiny_llama / "config.json")))


def test_folders_that_are_not_causal_lms_say_what_they_are(tiny_llama, tiny_llm_data, tmp_path):
    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, tokenizer_only)
    assert "tokenizer-only folder" in one_line_error(ModelConfig(str(tokenizer_only)))

    sr = tmp_path / "sr"
    sr.mkdir()
    (sr / "config.json").write_text(json.dumps({"model_type": "sasrec", "format_version": 1, "num_items": 40,
                                                "dataset_fingerprint": "x"}))
    assert "delrec SR model folder" in one_line_error(ModelConfig(str(sr)))

    assert "prepared delrec dataset" in one_line_error(ModelConfig(str(tiny_llm_data)))

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_llama / "config.json", no_weights)
    shutil.copy(tiny_llama / "tokenizer.json", no_weights)
    assert "no weights" in one_line_error(ModelConfig(str(no_weights)))


def test_peft_adapter_folder_names_its_base(tiny_llama, tmp_path):
    model, _ = load_tiny(tiny_llama)
    apply_lora(model, LoraSettings(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    message = one_line_error(ModelConfig(str(tmp_path / "adapter")))
    assert "PEFT adapter folder" in message and str(tiny_llama) in message


def test_encoder_model_folder(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "bert")
    assert "an encoder model (BertModel)" in one_line_error(ModelConfig(str(tmp_path / "bert")))


def test_hub_id_without_network_says_to_pass_a_local_folder(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = one_line_error(ModelConfig("some-org/some-model"))
    assert "offline" in message and "local model folder" in message


def test_quantisation_without_bitsandbytes_or_cuda(monkeypatch, tiny_llama):
    if loading.importlib.util.find_spec("bitsandbytes") is None:
        assert "not installed" in one_line_error(ModelConfig(str(tiny_llama), load_in_4bit=True))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object())
    message = one_line_error(ModelConfig(str(tiny_llama), load_in_8bit=True, device="cpu"))
    assert "8-bit" in message and "CUDA" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_llama):
    assert "CUDA is not available" in one_line_error(ModelConfig(str(tiny_llama), device="cuda"))
