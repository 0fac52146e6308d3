"""bfloat16 compute on CPU (docs/methods.md, "Precision"): frozen weights in bfloat16, what trains in float32,
losses within a measured tolerance of float32 training on the same seed, and the choice of precision.

The suite pins float32 for `auto` (conftest.py: DELREC_CPU_BFLOAT16=0); these tests ask for bf16 explicitly, so
they run the same on a CPU with fast bfloat16 and on one without (slower there, not different).
"""

import pytest
import torch

from delrec.device import CPU_BFLOAT16_ENV, cpu_prefers_bfloat16
from delrec.errors import DelrecError
from delrec.llm.loading import LoraSettings, ModelConfig
from delrec.llm.stage1 import distill_pattern
from delrec.llm.stage2 import FinetuneArguments, finetune
from delrec.llm.trainer import TrainingSettings, training_model_config, training_precision
from test_delrec_training import FAST, stage1_args

# |bf16 - fp32| of the logged training losses of the tiny runs below measured at most 0.0009 (losses of about 7
# nats; AMD EPYC, 2026-12-06): ten times that, while a step of the learning rate moves the loss by 0.1 or more.
LOSS_TOLERANCE = 0.01


def losses(result) -> list[float]:
    return [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]


def auto_dtype(folder) -> ModelConfig:
    return ModelConfig(str(folder), dtype="auto", device="cpu")


@pytest.fixture(scope="module")
def stage2_runs(tiny_llm_data, tiny_llama, tmp_path_factory):
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path_factory.mktemp(f"stage2-{precision}") / "run"
        args = FinetuneArguments(data=str(tiny_llm_data), out=str(out), soft_prompt="random", soft_prompt_tokens=4,
                                 max_train_instances=24, eval_max_instances=6, test_max_instances=8, max_length=512)
        runs[precision] = finetune(args, auto_dtype(tiny_llama), LoraSettings(r=2, lora_alpha=4, lora_dropout=0.0),
                                   TrainingSettings(**{**FAST, "learning_rate": 1e-2, "mixed_precision": precision}))
    return runs


def test_bf16_stage2_keeps_frozen_weights_in_bf16_and_lora_in_float32(stage2_runs):
    model = stage2_runs["bf16"].trainer.model
    assert stage2_runs["bf16"].trainer.args.bf16 and not stage2_runs["no"].trainer.args.bf16
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained and all("lora_" in name for name in trained) and set(trained.values()) == {torch.float32}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in stage2_runs["no"].trainer.model.parameters()} == {torch.float32}


def test_bf16_stage2_losses_follow_float32_within_tolerance(stage2_runs):
    bf16, fp32 = losses(stage2_runs["bf16"]), losses(stage2_runs["no"])
    assert len(bf16) == len(fp32) == 2
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < LOSS_TOLERANCE, (bf16, fp32)
    assert bf16 != fp32  # the two runs did compute in different precisions


def test_bf16_stage1_trains_float32_rows_of_a_bf16_model(tiny_llm_data, tiny_llama, tiny_pop, tmp_path):
    results = {precision: distill_pattern(stage1_args(tiny_llm_data, tiny_pop, tmp_path / precision),
                                          auto_dtype(tiny_llama),
                                          TrainingSettings(**{**FAST, "mixed_precision": precision}))
               for precision in ("no", "bf16")}
    trainer = results["bf16"].trainer
    assert trainer.soft_prompt.master_rows.dtype == torch.float32
    assert trainer.model.get_input_embeddings().weight.dtype == torch.bfloat16
    bf16, fp32 = losses(results["bf16"]), losses(results["no"])
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < LOSS_TOLERANCE, (bf16, fp32)


def test_auto_precision_follows_the_cpu_measurement_or_its_override(monkeypatch):
    settings, config = TrainingSettings(), ModelConfig("unused", device="cpu")
    monkeypatch.setenv(CPU_BFLOAT16_ENV, "1")
    assert training_precision(settings, "cpu") == "bf16"
    assert training_model_config(config, "bf16").dtype == "bfloat16"
    assert training_model_config(ModelConfig("unused", dtype="float32", device="cpu"), "bf16").dtype == "float32"
    monkeypatch.setenv(CPU_BFLOAT16_ENV, "0")
    assert training_precision(settings, "cpu") == "no" and training_model_config(config, "no") is config
    assert training_precision(TrainingSettings(mixed_precision="bf16"), "cpu") == "bf16"  # asked for: kept
    monkeypatch.setenv(CPU_BFLOAT16_ENV, "yes")
    with pytest.raises(DelrecError, match=r"\$DELREC_CPU_BFLOAT16='yes': expected 1 .*, 0 .* or unset"):
        cpu_prefers_bfloat16()
