"""LLaRA's hybrid item tokens (delrec.llm.hybrid) in DELRec stage 2 and in ranking.

Tiny LLMs and synthetic data from tests/llm_fixtures.py, a one-epoch SASRec (d = 16) as the SR
model whose item embeddings the projector reads; a handful of training steps per run.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.llm import hybrid
from delrec.llm.stage_folder import load_delrec_model
from delrec.llm.instances import InstanceOptions, build_instances
from delrec.llm.loading import LoraSettings, ModelConfig, embeddings_tied
from delrec.llm.scoring import score_candidates
from delrec.llm.soft_prompt import SOFT_PROMPT_FILE
from delrec.llm.stage2 import FinetuneArguments, finetune
from delrec.llm.trainer import TrainingSettings
from delrec.prompts import get_template
from delrec.ranking.models import ModelSpec, describe_model
from delrec.ranking.requests import build_requests
from delrec.sr import PopConfig, SASRecConfig, TrainConfig, train_sr
from llm_fixtures import load_tiny

HIDDEN = 32
SR_DIM = 16
# A constant selection metric makes the first checkpoint (step 2) the best one, so the best is not the last (4).
SETTINGS = dict(per_device_train_batch_size=4, max_steps=4, eval_steps=2, logging_steps=2, progress=False,
                eval_batch_size=32, warmup_steps=0.0, learning_rate=1e-2, lr_scheduler_type="constant",
                metric_for_best_model="chance@1")
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def sasrec(tiny_llm_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sasrec") / "model"
    train_sr(tiny_llm_data, SASRecConfig(hidden_size=SR_DIM, num_layers=1, num_heads=1, inner_size=32),
             TrainConfig(epochs=1, progress=False, device="cpu"), folder)
    return folder


def finetune_args(data, out, sr_folder, **overrides) -> FinetuneArguments:
    values = dict(data=str(data), out=str(out), soft_prompt="none", template="plain", item_tokens=str(sr_folder),
                  item_projector_hidden=HIDDEN, max_train_instances=24, eval_max_instances=6, max_length=512)
    values.update(overrides)
    return FinetuneArguments(**values)


def run_stage2(args, llm, **settings):
    return finetune(args, ModelConfig(str(llm), dtype="float32", device="cpu"), LoraSettings(r=2, lora_alpha=4, lora_dropout=0.0),
                    TrainingSettings(**{**SETTINGS, **settings}))


@pytest.fixture(scope="module")
def trained(tiny_llm_data, tiny_llama, sasrec, tmp_path_factory):
    """A stage-2 run with item tokens (every test instance scored at the end), on its own copy of the SR folder."""
    root = tmp_path_factory.mktemp("hybrid")
    sr_folder = shutil.copytree(sasrec, root / "sr")
    out = root / "run"
    return out, sr_folder, run_stage2(finetune_args(tiny_llm_data, out, sr_folder), tiny_llama)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / ADAPTER), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def projector_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.rsplit(".", 1)[1]: value for key, value in tensors.items() if hybrid.PROJECTOR in key}


def live_projector(model) -> dict[str, torch.Tensor]:
    wrapper = model.get_input_embeddings().projector  # PEFT's ModulesToSaveWrapper: the trained copy runs
    return {k: v.detach() for k, v in wrapper.modules_to_save[wrapper.active_adapter].state_dict().items()}


def main_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- the embedding ------------------------------------------------------------------------------------


def test_item_tokens_embed_as_the_projected_sr_vector_and_other_ids_are_unchanged(tiny_llm, tiny_llm_data, sasrec):
    model, tokenizer = load_tiny(tiny_llm)
    table = hybrid.read_item_table(sasrec, PreparedDataset.load(tiny_llm_data))
    tied = embeddings_tied(model)
    ordinary = torch.tensor([[1, 5, 17, len(tokenizer) - 1]])
    with torch.no_grad():
        embeds_before, logits_before = model.get_input_embeddings()(ordinary), model(ordinary).logits

    first = hybrid.attach(model, tokenizer, table, HIDDEN)
    assert first == len(tokenizer) - table.shape[0]
    assert tokenizer.convert_tokens_to_ids([hybrid.item_token(k) for k in (0, 39)]) == [first, first + 39]
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, hybrid.HybridEmbedding) and embeddings_tied(model) == tied
    assert [name for name, _ in embedding.named_parameters()] == ["embedding.weight"]  # the projector is the model's
    mixed = torch.tensor([[1, first + 3, 5, first, first + 39]])
    projector = model.item_projector
    with torch.no_grad():
        assert torch.equal(embedding(ordinary), embeds_before)
        assert torch.equal(model(ordinary).logits, logits_before)
        out = embedding(mixed)
        expected = torch.nn.functional.gelu(table[[3, 0, 39]] @ projector.weight_in + projector.bias_in) \
            @ projector.weight_out + projector.bias_out
        assert torch.allclose(out[0, [1, 3, 4]], expected, rtol=1e-5, atol=1e-7)  # float32 rounding only
        assert torch.equal(out[0, [0, 2]], embeds_before[0, :2])
        assert torch.equal(projector.item_table, table)


def test_the_projector_starts_at_the_scale_the_embedding_module_outputs(tiny_llama, tiny_llm_data, sasrec):
    """Gemma multiplies looked-up rows by sqrt(d) inside its embedding module: the projector must match the
    module's OUTPUT scale, not the stored rows'."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    model, tokenizer = load_tiny(tiny_llama)
    plain = model.get_input_embeddings()
    scaled = Gemma3TextScaledWordEmbedding(plain.num_embeddings, plain.embedding_dim, 0, embed_scale=8.0)
    scaled.weight = plain.weight
    model.set_input_embeddings(scaled)
    special = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    with torch.no_grad():
        target = scaled(ids).pow(2).mean().sqrt().item()
    assert target == pytest.approx(8 * plain(ids).pow(2).mean().sqrt().item(), rel=1e-5)

    first = hybrid.attach(model, tokenizer, hybrid.read_item_table(sasrec, PreparedDataset.load(tiny_llm_data)), HIDDEN)
    with torch.no_grad():
        items = model.get_input_embeddings()(torch.arange(first, first + 40))
        assert items.pow(2).mean().sqrt().item() == pytest.approx(target, rel=1e-4)
        assert torch.equal(model.get_input_embeddings()(ids), scaled(ids))  # ordinary ids keep Gemma's scaling


# --- the prompts ----------------------------------------------------------------------------------------


def test_prompts_show_title_and_item_token_and_answers_stay_plain_titles(tiny_llama, tiny_llm_data, sasrec, tmp_path):
    dataset = PreparedDataset.load(tiny_llm_data)
    model, tokenizer = load_tiny(tiny_llama)
    first = hybrid.attach(model, tokenizer, hybrid.read_item_table(sasrec, dataset), HIDDEN)
    template = get_template("plain")
    rows = build_instances(dataset, template, InstanceOptions(split="valid", item_tokens=True), tokenizer,
                           cache_dir=tmp_path / "cache").rows
    plain_rows = build_instances(dataset, template, InstanceOptions(split="valid"), tokenizer,
                                 cache_dir=tmp_path / "cache").rows
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the option is part of the cache key
    titles = dataset.titles
    for row, plain_row, inst, candidates in zip(rows, plain_rows, dataset.instances("valid"),
                                                dataset.candidates("valid")):
        for item in [*inst.history, *candidates]:
            assert f". {titles[item]} <|item_{item}|>\n" in row["prompt"]
        assert row["completion"] == titles[inst.target] and "<|item_" not in row["completion"]
        assert row["candidates"] == [titles[i] for i in candidates] == plain_row["candidates"]
        assert re.sub(r" <\|item_\d+\|>", "", row["prompt"]) == plain_row["prompt"]  # nothing else differs
        item_ids = [i - first for i in row["input_ids"] if i >= first]
        assert item_ids == [*inst.history, *candidates]  # one id per item token, in prompt order
        answer = [i for i, m in zip(row["input_ids"], row["completion_mask"]) if m]
        assert answer == [i for i, m in zip(plain_row["input_ids"], plain_row["completion_mask"]) if m]

    spec = ModelSpec("folder", "stage2", "plain", "item", "SASRec", None, item_tokens=True)
    requests = build_requests(dataset, "valid", spec, template, tokenizer, 512, lambda titles: 8)
    assert [r.prompt for r in requests] == list(rows["prompt"])  # ranking renders what stage 2 trained on
    assert [list(r.titles) for r in requests] == list(rows["candidates"])


# --- stage 2 --------------------------------------------------------------------------------------------


def test_stage2_trains_the_projector_and_lora_only_and_keeps_the_best_checkpoints_projector(
        trained, tiny_llama, tiny_llm_data, sasrec):
    out, sr_folder, result = trained
    model = result.trainer.model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or f"{hybrid.PROJECTOR}.modules_to_save." in n for n in trainable)
    assert any(hybrid.PROJECTOR in n for n in trainable)
    base, base_tokenizer = load_tiny(tiny_llama)
    base_params = dict(base.named_parameters())
    frozen = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and hybrid.PROJECTOR not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            frozen[key.replace("embed_tokens.embedding", "embed_tokens")] = p
    assert frozen.keys() == base_params.keys()
    assert all(torch.equal(frozen[name], p) for name, p in base_params.items())  # the LLM itself did not move

    summary = result.summary
    assert summary["best_checkpoint"].endswith("checkpoint-2") and summary["global_step"] == 4
    best, last = (adapter_tensors(out / "checkpoints" / f"checkpoint-{s}") for s in (2, 4))
    final = adapter_tensors(out)
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in best)
    live = live_projector(model)
    assert live.keys() == {"item_table", "weight_in", "bias_in", "weight_out", "bias_out"}
    assert all(torch.equal(live[k], v) for k, v in projector_of(best).items())  # the best checkpoint's, reloaded
    assert not torch.equal(projector_of(last)["weight_out"], live["weight_out"])
    table = hybrid.read_item_table(sr_folder, PreparedDataset.load(tiny_llm_data))
    assert torch.equal(live["item_table"], table) and torch.equal(projector_of(last)["item_table"], table)
    fresh, fresh_tokenizer = load_tiny(tiny_llama)
    hybrid.attach(fresh, fresh_tokenizer, table, HIDDEN)  # the initialisation (seeded) the run started from
    start = fresh.item_projector.state_dict()
    assert all(not torch.equal(live[k], start[k]) for k in ("weight_in", "weight_out", "bias_out"))
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    info = json.loads((out / "delrec.json").read_text())
    assert info["item_tokens"] == {"sr_model": str(sr_folder.resolve()), "num_items": 40, "sr_dim": SR_DIM,
                                   "hidden": HIDDEN, "first_token_id": len(base_tokenizer)}


def test_the_saved_folder_ranks_as_the_trainer_evaluated_it_also_after_a_move(trained, tiny_llm_data, tmp_path, capsys):
    out, sr_folder, result = trained
    assert main(["rank", "--model", str(out), "--data", str(tiny_llm_data), "--split", "test", "--readout", "score",
                 "--batch_size", "32", "--out", str(tmp_path / "rank"), "--progress", "false"]) == 0
    ranked = json.loads((tmp_path / "rank" / "metrics.json").read_text())
    expected = result.summary["test"]
    test_instances = len(PreparedDataset.load(tiny_llm_data).instances("test"))
    assert result.summary["instances"]["test"]["instances"] == test_instances  # the trainer scored them all
    assert {k: ranked["test"][k] for k in ("hr@1", "hr@5", "ndcg@5")} == pytest.approx(
        {k: expected[k] for k in ("hr@1", "hr@5", "ndcg@5")}, abs=1e-12)

    evaluator = result.trainer.evaluator
    prompts, candidates = evaluator.prompts, evaluator.candidates
    model, tokenizer = result.trainer.model, result.trainer.processing_class
    with torch.no_grad():
        reference = [s.logprob for s in score_candidates(model, tokenizer, prompts, candidates)]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    away = sr_folder.with_name("sr-away")
    sr_folder.rename(away)  # the folder needs the SR model no more: the table is in the adapter
    try:
        loaded, loaded_tokenizer, _ = load_delrec_model(moved, device="cpu", dtype="float32")
    finally:
        away.rename(sr_folder)
    with torch.no_grad():
        again = [s.logprob for s in score_candidates(loaded, loaded_tokenizer, prompts, candidates)]
    assert again == reference


def test_stage2_resumes_the_projector_from_its_checkpoint(trained, tiny_llm_data, tiny_llama, tmp_path):
    out, sr_folder, _ = trained
    args = finetune_args(tiny_llm_data, tmp_path / "run", sr_folder)
    run_stage2(args, tiny_llama, max_steps=2)
    resumed = run_stage2(args, tiny_llama)
    assert resumed.summary["global_step"] == 4
    straight, again = (adapter_tensors(folder / "checkpoints" / "checkpoint-4") for folder in (out, tmp_path / "run"))
    assert straight.keys() == again.keys() and any(hybrid.PROJECTOR in k for k in straight)
    assert all(torch.allclose(straight[k], again[k], atol=1e-6) for k in straight)


def test_a_soft_prompt_and_item_tokens_coexist_on_tied_embeddings(tiny_llm_data, tiny_qwen2, sasrec, tmp_path):
    p = 4
    args = finetune_args(tiny_llm_data, tmp_path / "run", sasrec, soft_prompt="random", template="lsr",
                         soft_prompt_tokens=p, soft_prompt_name="sasrec")
    result = run_stage2(args, tiny_qwen2, max_steps=2)
    model, tokenizer = result.trainer.model, result.trainer.processing_class
    base, _ = load_tiny(tiny_qwen2)
    vocab = base.get_input_embeddings().num_embeddings
    soft_ids = tokenizer.convert_tokens_to_ids([f"<|sp:sasrec:{i}|>" for i in range(p)])
    info = json.loads((tmp_path / "run" / "delrec.json").read_text())
    assert soft_ids == list(range(vocab, vocab + p)) and info["item_tokens"]["first_token_id"] == vocab + p
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight and weight.shape[0] == vocab + p  # no rows for items
    with safe_open(str(tmp_path / "run" / SOFT_PROMPT_FILE), "pt") as handle:
        assert torch.equal(weight[soft_ids], handle.get_tensor("embeddings"))  # the soft rows stayed frozen
    assert torch.equal(weight[:vocab], base.get_input_embeddings().weight)
    prompt = result.trainer.evaluator.prompts[0]
    assert "<|sp:sasrec:0|>" in prompt and "<|item_" in prompt

    loaded, loaded_tokenizer, _ = load_delrec_model(tmp_path / "run", device="cpu", dtype="float32")
    prompts, candidates = result.trainer.evaluator.prompts[:4], result.trainer.evaluator.candidates[:4]
    with torch.no_grad():
        expected = [s.logprob for s in score_candidates(model, tokenizer, prompts, candidates)]
        again = [s.logprob for s in score_candidates(loaded, loaded_tokenizer, prompts, candidates)]
    assert again == expected


# --- what is refused ------------------------------------------------------------------------------------


def test_an_sr_folder_that_does_not_fit_the_dataset_is_refused_in_one_line(tiny_llm_data, tiny_llama, sasrec, tmp_path,
                                                                          capsys):
    def edited(name: str, **changes) -> Path:
        folder = shutil.copytree(sasrec, tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    pop = tmp_path / "pop"
    train_sr(tiny_llm_data, PopConfig(), TrainConfig(epochs=1, progress=False, device="cpu"), pop)
    cases = [
        (edited("fewer", num_items=39), "the SR model has 39 items, the dataset"),
        (edited("other", dataset_fingerprint="0123456789abcdef"), "was trained on dataset 0123456789abcdef, not on"),
        (pop, "a 'pop' model has no item embeddings"),
        (tiny_llm_data, "not an SR model folder"),
    ]
    for folder, message in cases:
        err = main_error(["llm", "finetune", "--data", str(tiny_llm_data), "--out", str(tmp_path / "o"),
                          "--model_name_or_path", str(tiny_llama), "--soft_prompt", "none", "--template", "plain",
                          "--item_tokens", str(folder)], capsys)
        assert message in err and str(folder) in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_export_and_vllm_refuse_item_tokens_and_a_missing_projector_is_caught(trained, tmp_path, capsys):
    from delrec.ranking.vllm import Options, open_backend

    out, _, _ = trained
    err = main_error(["export", "--model", str(out), "--out", str(tmp_path / "export")], capsys)
    assert "hybrid item tokens need the hf backend" in err and not (tmp_path / "export").exists()
    spec = describe_model(str(out))
    assert spec.kind == "stage2" and spec.item_tokens
    with pytest.raises(DelrecError, match="hybrid item tokens need the hf backend; .*--backend hf"):
        open_backend(spec, Options())

    no_weights = shutil.copytree(out, tmp_path / "no-weights", ignore=shutil.ignore_patterns("checkpoints", "cache"))
    save_file({k: v for k, v in adapter_tensors(out).items() if hybrid.PROJECTOR not in k}, str(no_weights / ADAPTER))
    no_adapter = shutil.copytree(no_weights, tmp_path / "no-adapter")
    for name in (ADAPTER, "adapter_config.json"):
        (no_adapter / name).unlink()
    # without the projector's tensors PEFT fails with a KeyError; without an adapter the NaN placeholder shows
    for damaged in (no_weights, no_adapter):
        with pytest.raises(DelrecError, match="the adapter holds no trained item projector"):
            load_delrec_model(damaged, device="cpu", dtype="float32")


def test_a_hybrid_stage2_folder_reranks_as_a_teacher_with_its_item_tokens(trained, tiny_llm_data, tmp_path):
    """A stage-2 model as DLLM2Rec's ranking teacher scores the prompts it trained on: titles and item tokens."""
    import dataclasses

    from delrec.distill import load_teacher
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher, rerank_candidates, sampled_instances
    from delrec.ranking.requests import requests_for

    out, sr_folder, result = trained
    dataset = PreparedDataset.load(tiny_llm_data)
    config = TeacherExportConfig(model=str(out), data=str(tiny_llm_data), out=str(tmp_path / "teacher"), topk=3,
                                 mode="rerank", sr_model=str(sr_folder), sr_topm=4, num_random=2, max_instances=3,
                                 progress=False)
    info = json.loads((export_teacher(config) / "teacher.json").read_text())
    assert info["source"]["model"]["kind"] == "stage2" and info["source"]["model"]["template"] == "plain"
    exported = load_teacher(config.out, dataset, min_topk=3)

    instances = sampled_instances(dataset.instances("train"), 3, config.seed)
    candidate_sets, _ = rerank_candidates(config, dataset, instances, "cpu")
    spec = describe_model(str(out))
    model, tokenizer = result.trainer.model, result.trainer.processing_class
    scores = {}
    for shown in (spec, dataclasses.replace(spec, item_tokens=False)):
        requests = requests_for(instances, candidate_sets, dataset.titles, "train", shown, get_template("plain"),
                                tokenizer, 512, lambda titles: 8)
        with torch.no_grad():
            scores[shown.item_tokens] = [s.logprob for s in score_candidates(
                model, tokenizer, [r.prompt for r in requests], [list(r.titles) for r in requests])]
    assert all("<|item_" in r.prompt for r in requests_for(instances, candidate_sets, dataset.titles, "train", spec,
                                                           get_template("plain"), tokenizer, 512, lambda t: 8))
    rows = exported.rows(torch.tensor([inst.id for inst in instances]))
    for inst_scores, plain_scores, candidates, row in zip(scores[True], scores[False], candidate_sets, rows.tolist()):
        best = sorted(range(len(candidates)), key=lambda j: -inst_scores[j])[:3]
        assert exported.items[row].tolist() == [candidates[j] for j in best]
        assert exported.scores[row].tolist() == pytest.approx([inst_scores[j] for j in best], abs=1e-4)
        assert plain_scores != pytest.approx(inst_scores, abs=1e-4)  # the item tokens changed what it read


@pytest.mark.slow  # about 40 s on 2 cores
def test_stage2_with_item_tokens_under_ddp_matches_one_process(tiny_llm_data, tiny_llama, sasrec, tmp_path):
    """Two CPU processes (DDP over gloo) train the projector like one process accumulating two batches."""
    from test_distributed import assert_same_run, launch

    config = [f"data: {tiny_llm_data}", f"model_name_or_path: {tiny_llama}", "soft_prompt: none", "template: plain",
              f"item_tokens: {sasrec}", f"item_projector_hidden: {HIDDEN}", "r: 2", "lora_alpha: 4", "lora_dropout: 0.0",
              "learning_rate: 0.01", "test_max_instances: 8"]
    two = launch("finetune.py", config, tmp_path / "two", processes=2, batch=2)
    one = launch("finetune.py", config, tmp_path / "one", processes=1, batch=2, accumulation=2)
    assert any(hybrid.PROJECTOR in key for key in adapter_tensors(two))
    assert_same_run(two, one, ADAPTER)
