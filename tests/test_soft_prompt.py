"""Soft prompts as added tokens, on a tiny Llama (untied LM head) and a tiny Qwen2 (tied embeddings)."""

import jinja2
import pytest
import torch

from delrec.errors import DelrecError
from delrec.llm.loading import LoraSettings, apply_lora, embeddings_tied
from delrec.llm.soft_prompt import SOFT_PROMPT_FILE, SoftPrompt
from llm_fixtures import load_tiny

P = 6
TEMPLATE = "The recommendation pattern of the SASRec model is: {{ soft_prompt }}. History: {{ history }}. Next:"


def render(prompt: SoftPrompt, history: str = "Crimson Voyage; Hollow Kingdom II") -> str:
    template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(TEMPLATE)
    return template.render(soft_prompt=prompt.placeholder_text(), history=history)


def encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_step(model, tokenizer, prompt: SoftPrompt, weight_decay: float = 0.0) -> None:
    ids = encode(tokenizer, render(prompt))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=weight_decay)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def logits(model, tokenizer, prompt: SoftPrompt) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=encode(tokenizer, render(prompt))).logits


def test_added_tokens_start_from_distinct_real_embeddings_and_keep_the_tie(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    vocab = len(tokenizer)
    tied = embeddings_tied(model)
    head_before = model.get_output_embeddings().weight.detach().clone()
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer, seed=3)

    assert prompt.token_ids == list(range(vocab, vocab + P))
    assert prompt.tokens[0] == "<|sp:sasrec:0|>"
    weight = model.get_input_embeddings().weight
    rows = prompt.rows(model)
    assert len({tuple(r.tolist()) for r in rows}) == P  # distinct
    for row in rows:  # each one a copy of some real token's embedding
        assert (weight[:vocab] == row).all(1).any()
    assert embeddings_tied(model) == tied and model.config.tie_word_embeddings == tied
    assert torch.equal(model.get_output_embeddings().weight[:vocab], head_before[:vocab])


def test_placeholder_renders_to_exactly_p_soft_token_ids(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer)
    ids = encode(tokenizer, render(prompt))[0].tolist()
    positions = [i for i, t in enumerate(ids) if t in prompt.token_ids]
    assert len(positions) == P and positions == list(range(positions[0], positions[0] + P))
    assert [ids[i] for i in positions] == prompt.token_ids
    assert "History: Crimson Voyage" in tokenizer.decode(ids)


def test_soft_only_step_changes_the_soft_rows_and_nothing_else(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer)
    before = snapshot(model)
    master = prompt.train_only_soft_prompt(model)
    assert master.dtype == torch.float32 and master.shape == (P, model.config.hidden_size)
    assert [p for p in model.parameters() if p.requires_grad] == [master]  # nothing of the [vocab, d] matrix
    train_step(model, tokenizer, prompt)
    assert model.get_input_embeddings().weight.grad is None
    logits(model, tokenizer, prompt)  # the matrix's rows follow the trained copy at the next pass

    soft = prompt.token_ids
    embedding_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    assert torch.equal(model.get_input_embeddings().weight[soft], master.detach())
    for name, value in model.named_parameters():
        if value is master:
            continue
        if name == embedding_name:
            others = torch.ones(value.shape[0], dtype=torch.bool)
            others[soft] = False
            assert torch.equal(value[others], before[name][others]), "a non-soft embedding row changed"
            assert (value[soft] != before[name][soft]).any(1).all(), "every soft row should move"
        else:
            assert torch.equal(value, before[name]), f"{name} changed"
    if not embeddings_tied(model):  # the untied LM head is its own parameter: checked above, and frozen
        assert not model.get_output_embeddings().weight.requires_grad


def test_weight_decay_is_refused(tiny_qwen2):
    model, tokenizer = load_tiny(tiny_qwen2)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer)
    weight = prompt.train_only_soft_prompt(model)
    with pytest.raises(DelrecError, match="weight_decay 0"):
        prompt.check_optimizer(torch.optim.AdamW([weight]), model)  # torch's default decay is 0.01
    prompt.check_optimizer(torch.optim.AdamW([weight], weight_decay=0.0), model)


def test_save_and_load_give_identical_logits(tiny_llm, tmp_path):
    model, tokenizer = load_tiny(tiny_llm)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer)
    prompt.train_only_soft_prompt(model)
    train_step(model, tokenizer, prompt)
    path = prompt.save(tmp_path, model)
    assert path == tmp_path / SOFT_PROMPT_FILE

    fresh, fresh_tokenizer = load_tiny(tiny_llm)
    loaded = SoftPrompt.load(tmp_path, fresh, fresh_tokenizer, num_tokens=P)
    assert (loaded.name, loaded.num_tokens, loaded.token_ids) == ("sasrec", P, prompt.token_ids)
    assert torch.equal(loaded.rows(fresh), prompt.rows(model))
    assert torch.equal(logits(fresh, fresh_tokenizer, loaded), logits(model, tokenizer, prompt))


def test_reload_into_a_tokenizer_that_already_has_the_tokens(tiny_qwen2, tmp_path):
    model, tokenizer = load_tiny(tiny_qwen2)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer, init="random", seed=1)
    prompt.save(tmp_path, model)
    size = len(tokenizer)
    again = SoftPrompt.load(tmp_path, model, tokenizer)
    assert again.token_ids == prompt.token_ids and len(tokenizer) == size


def test_two_soft_prompts_coexist_independently(tiny_llm, tmp_path):
    model, tokenizer = load_tiny(tiny_llm)
    sasrec = SoftPrompt("sasrec", P).add_to(model, tokenizer, seed=0)
    gru = SoftPrompt("gru4rec", P + 2).add_to(model, tokenizer, seed=1)
    assert not set(sasrec.token_ids) & set(gru.token_ids)
    gru_before = gru.rows(model)
    sasrec.train_only_soft_prompt(model)
    train_step(model, tokenizer, sasrec)
    assert torch.equal(gru.rows(model), gru_before)
    sasrec.save(tmp_path / "a", model)
    gru.save(tmp_path / "b", model)

    fresh, fresh_tokenizer = load_tiny(tiny_llm)
    gru_loaded = SoftPrompt.load(tmp_path / "b", fresh, fresh_tokenizer)  # the other order: other ids, same rows
    sasrec_loaded = SoftPrompt.load(tmp_path / "a", fresh, fresh_tokenizer)
    assert torch.equal(gru_loaded.rows(fresh), gru.rows(model))
    assert torch.equal(sasrec_loaded.rows(fresh), sasrec.rows(model))
    text = render(sasrec_loaded) + render(gru_loaded)
    ids = encode(fresh_tokenizer, text)[0].tolist()
    assert sum(t in sasrec_loaded.token_ids for t in ids) == P and sum(t in gru_loaded.token_ids for t in ids) == P + 2


def test_lora_on_top_trains_while_the_soft_rows_stay_frozen(tiny_llm):
    model, tokenizer = load_tiny(tiny_llm)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer)
    model = apply_lora(model, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0))
    prompt.freeze(model)
    embedding_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)

    with torch.no_grad():  # LoRA B starts at zero; make the adapter active so every LoRA matrix gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_step(model, tokenizer, prompt)
    assert torch.equal(model.get_input_embeddings().weight, embedding_before)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_freeze_refuses_lora_on_the_embedding_layer(tiny_llama):
    model, tokenizer = load_tiny(tiny_llama)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer)
    model = apply_lora(model, LoraSettings(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(DelrecError, match="embed_tokens"):
        prompt.freeze(model)


def test_load_errors_name_the_file_and_the_mismatch(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tokenizer = load_tiny(tiny_llama)
    SoftPrompt("sasrec", P).add_to(model, tokenizer).save(tmp_path, model)
    file = str(tmp_path / SOFT_PROMPT_FILE)

    fresh, fresh_tokenizer = load_tiny(tiny_llama)
    with pytest.raises(DelrecError, match=f"{file}: soft prompt 'sasrec' has {P} tokens, expected 100"):
        SoftPrompt.load(tmp_path, fresh, fresh_tokenizer, num_tokens=100)

    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=len(fresh_tokenizer), hidden_size=64, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=1, head_dim=64))
    with pytest.raises(DelrecError, match=f"{file}: soft prompt hidden size 128, but the model's is 64"):
        SoftPrompt.load(tmp_path, narrow, fresh_tokenizer)

    SoftPrompt("sasrec", P + 1).add_to(fresh, fresh_tokenizer)
    with pytest.raises(DelrecError, match=f"already holds {P + 1} tokens of soft prompt 'sasrec'"):
        SoftPrompt.load(tmp_path, fresh, fresh_tokenizer)
    with pytest.raises(DelrecError, match="already holds soft prompt 'sasrec'"):
        SoftPrompt("sasrec", P).add_to(fresh, fresh_tokenizer)

    with pytest.raises(DelrecError, match="soft prompt file not found"):
        SoftPrompt.load(tmp_path / "elsewhere", fresh, fresh_tokenizer)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SOFT_PROMPT_FILE).write_bytes(b"not safetensors")
    with pytest.raises(DelrecError, match="not a readable safetensors file"):
        SoftPrompt.load(tmp_path / "bad", fresh, fresh_tokenizer)


def test_bad_names_and_sizes():
    with pytest.raises(DelrecError, match="name"):
        SoftPrompt("sas rec", 4)
    with pytest.raises(DelrecError, match="at least 1"):
        SoftPrompt("sasrec", 0)
    with pytest.raises(RuntimeError, match="not attached"):
        SoftPrompt("sasrec", 2).token_ids


def test_repository_templates_hold_exactly_p_soft_token_ids(tiny_llm, tiny_llm_data):
    from delrec.data.dataset import PreparedDataset
    from delrec.prompts import list_templates, preview_variables

    model, tokenizer = load_tiny(tiny_llm)
    prompt = SoftPrompt("sasrec", P).add_to(model, tokenizer)
    dataset = PreparedDataset.load(tiny_llm_data)
    templates = [t for t in list_templates() if t.requires_soft_prompt]
    assert templates
    for template in templates:
        values, _ = preview_variables(template, dataset, soft_prompt=prompt.placeholder_text())
        ids = encode(tokenizer, template.render(values).prompt)[0].tolist()
        positions = [i for i, t in enumerate(ids) if t in prompt.token_ids]
        assert [ids[i] for i in positions] == prompt.token_ids, template.file
        assert positions == list(range(positions[0], positions[0] + P)), template.file
