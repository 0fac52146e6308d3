"""DELRec stage-2 folders and their exports on the tiny LLMs, for the ranking and export tests.

A stage-2 folder is written the way `delrec llm finetune` writes one (delrec.llm.stage2): the
base's tokenizer with the soft-prompt tokens, `soft_prompt.safetensors`, a PEFT LoRA adapter
saved with `save_embedding_layers=False`, and a delrec.json (`delrec.llm.stage_folder.write_info`).
Training is replaced by random perturbations of the soft rows and of LoRA's B matrices (zero at
initialisation), so the adapter and the soft prompt both change the logits, in a second.
Built once per session, whichever modules ask (the fixtures are registered by tests/conftest.py); tests
must not modify them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from delrec.data.dataset import PreparedDataset
from delrec.llm.merge import export_model
from delrec.llm.stage_folder import model_fingerprint, write_info
from delrec.llm.loading import LoraSettings, apply_lora
from delrec.llm.soft_prompt import SoftPrompt
from delrec.prompts import get_template
from llm_fixtures import load_tiny

SOFT_TOKENS = 6


def make_stage2(base: Path, data: Path, out: Path, soft_tokens: int | None = SOFT_TOKENS, seed: int = 0) -> Path:
    """Write a stage-2 folder on `base`; `soft_tokens=None`: the plain-template ablation (no soft prompt)."""
    generator = torch.Generator().manual_seed(seed)
    model, tokenizer = load_tiny(base)
    out.mkdir(parents=True)
    soft = None
    if soft_tokens:
        soft = SoftPrompt("sasrec", soft_tokens).add_to(model, tokenizer, seed=seed)
        rows = soft.rows(model)
        soft.set_rows(model, rows + 0.5 * rows.std() * torch.randn(rows.shape, generator=generator))
        soft.save(out, model)
    lora = LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0)
    peft_model = apply_lora(model, lora)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05, generator=generator)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    template = get_template("lsr" if soft else "plain")
    dataset = PreparedDataset.load(data)
    write_info(out, {
        "stage": "finetune",
        "base_model": {"model_name_or_path": str(base), "fingerprint": model_fingerprint(str(base)),
                       "load_in_4bit": False, "load_in_8bit": False, "trust_remote_code": False},
        "sr_model": {"name": "sasrec", "display_name": "SASRec"},
        "soft_prompt": None if soft is None else {"name": soft.name, "num_tokens": soft.num_tokens,
                                                  "source": "random", "stage1": None},
        "template": {"name": template.name, "fingerprint": template.fingerprint},
        "domain": "item",
        "dataset": {"path": str(dataset.path), "fingerprint": dataset.fingerprint},
        "lora": dataclasses.asdict(lora),
    })
    return out


def _stage2(base: Path, data: Path, tmp_path_factory, name: str, soft: bool = True) -> Path:
    return make_stage2(base, data, tmp_path_factory.mktemp("stage2") / name, SOFT_TOKENS if soft else None)


def _export(stage2: Path, tmp_path_factory, name: str) -> Path:
    out = tmp_path_factory.mktemp("export") / name
    export_model(stage2, out)
    return out


@pytest.fixture(scope="session")
def stage2_llama(tiny_llama, tiny_llm_data, tmp_path_factory) -> Path:
    return _stage2(tiny_llama, tiny_llm_data, tmp_path_factory, "stage2-llama")


@pytest.fixture(scope="session")
def stage2_qwen2(tiny_qwen2, tiny_llm_data, tmp_path_factory) -> Path:
    return _stage2(tiny_qwen2, tiny_llm_data, tmp_path_factory, "stage2-qwen2")


@pytest.fixture(scope="session")
def stage2_llama_plain(tiny_llama, tiny_llm_data, tmp_path_factory) -> Path:
    """The plain-template ablation: LoRA only, no soft prompt."""
    return _stage2(tiny_llama, tiny_llm_data, tmp_path_factory, "stage2-llama-plain", soft=False)


@pytest.fixture(scope="session")
def export_llama(stage2_llama, tmp_path_factory) -> Path:
    return _export(stage2_llama, tmp_path_factory, "export-llama")


@pytest.fixture(scope="session")
def export_qwen2(stage2_qwen2, tmp_path_factory) -> Path:
    return _export(stage2_qwen2, tmp_path_factory, "export-qwen2")
