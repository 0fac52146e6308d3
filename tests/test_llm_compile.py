"""Compiled decoder layers (`torch_compile`, delrec.llm.trainer.compile_layers): the same losses and gradients as
eager execution, the same saved weights, and auto compiling only where it pays (a large model on CPU)."""

import pytest
import torch

from delrec.errors import DelrecError
from delrec.llm import trainer
from delrec.llm.loading import LoraSettings, ModelConfig, apply_lora, load_model
from delrec.llm.trainer import TrainingSettings, compile_layers, compiles_layers


def lora_model(folder):
    torch.manual_seed(0)
    model, _ = load_model(ModelConfig(str(folder), dtype="float32", device="cpu"))
    model = apply_lora(model, LoraSettings(r=2, lora_alpha=4, lora_dropout=0.0))
    for name, parameter in model.named_parameters():  # LoRA's B starts at 0: make the adapters act
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def loss_and_gradients(model, lengths=(7, 12)):
    """The mean next-token loss of two padded batches of different lengths (one compilation must serve both)."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for length in lengths:
        ids = torch.arange(2 * length).reshape(2, length) % 50 + 3
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding in the second row
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_match_eager_losses_gradients_and_state(tiny_llama):
    model = lora_model(tiny_llama)
    keys = list(model.state_dict())
    eager_loss, eager_grads = loss_and_gradients(model)
    assert compile_layers(model) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in model.get_base_model().model.layers)
    compiled_loss, compiled_grads = loss_and_gradients(model)
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-4)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert list(model.state_dict()) == keys  # what save_pretrained writes is unchanged


def test_auto_compiles_large_models_on_cpu_where_a_compiler_is_installed(tiny_llama, monkeypatch):
    model, _ = load_model(ModelConfig(str(tiny_llama), dtype="float32", device="cpu"))
    auto = TrainingSettings()
    assert not compiles_layers(auto, model)  # a tiny model: compilation would never pay back
    assert compiles_layers(TrainingSettings(torch_compile="yes"), model)
    monkeypatch.setattr(trainer, "COMPILE_MIN_PARAMETERS", 0)
    monkeypatch.setattr(trainer.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert compiles_layers(auto, model)
    assert not compiles_layers(TrainingSettings(torch_compile="no"), model)
    monkeypatch.setattr(trainer.shutil, "which", lambda name: None)
    assert not compiles_layers(auto, model)  # inductor's CPU backend needs a C++ compiler


def test_a_model_without_repeated_blocks_is_refused_in_one_line():
    with pytest.raises(DelrecError, match="declares no repeated blocks.*torch_compile: no"):
        compile_layers(torch.nn.Linear(2, 2))


def test_cached_candidate_passes_run_eager_beside_compiled_layers(tiny_llama):
    """Layers read the KV cache by their own index, so compiled layers made a graph per layer and pass (past torch's
    recompile limit on Gemma's 18 layers): the candidate passes run eager, with the same log-likelihoods."""
    from torch._dynamo.utils import counters

    from delrec.llm.scoring import candidate_log_likelihoods

    model = lora_model(tiny_llama)
    prompts = [list(range(10, 30)), list(range(40, 55))]
    candidates = [[[5, 6, 7], [8, 9]], [[11, 12], [13, 14, 15, 16]]]
    eager = candidate_log_likelihoods(model, prompts, candidates, batch_size=2)
    compile_layers(model)
    graphs = counters["stats"]["unique_graphs"]
    compiled = candidate_log_likelihoods(model, prompts, candidates, batch_size=2)
    assert counters["stats"]["unique_graphs"] == graphs
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)
