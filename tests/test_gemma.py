"""Every LLM path on the real pretrained LLM: Gemma 3 270M imported from its GGUF packages (issue #12).

Import (plain folder, BOS decided by loss, provenance), a `.gguf` file as `model_name_or_path`,
zero-shot ranking, stage 1 on Gemma's tied and sqrt(hidden)-scaled embeddings, stage 2 LoRA, the
merged export, teacher export and the prompt tools with Gemma's tokenizer. The vLLM side is
tests/test_gemma_vllm.py. Folders come from tests/gemma_fixtures.py (built once per session);
without the `[gemma]` extra these tests skip with the install hint.
"""

from __future__ import annotations


import pytest
import torch
from safetensors import safe_open

from delrec.cli import main
from delrec.io import read_json, read_jsonl
from delrec.llm.stage_folder import load_delrec_model
from delrec.llm.gguf_import import IMPORT_FILE, PACKAGED_MODELS
from delrec.llm.loading import load_model, resolve_source
from delrec.llm.soft_prompt import SOFT_PROMPT_FILE, SoftPrompt
from delrec.llm.tokenization import encode_prompt
from gemma_fixtures import SOFT_TOKENS, model_config, run_stage1, run_stage2

pytestmark = [pytest.mark.gemma, pytest.mark.slow]

SENTENCE = "My grandmother grew tomatoes, beans and sunflowers in the small garden behind her house."


@pytest.fixture(scope="module")
def base(gemma):
    """The imported model through delrec's loader, read-only."""
    return load_model(model_config(gemma))


def mean_nll(model, ids: list[int], skip: int) -> float:
    """Mean next-token loss over `ids[skip + 1:]` (the same targets with or without a BOS in front)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, skip:-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[skip + 1:])).item()


def test_import_writes_a_plain_folder_whose_tokenizer_adds_bos_as_the_loss_demands(gemma, base):
    from transformers import AutoModelForCausalLM

    info = read_json(gemma / IMPORT_FILE)
    packaged = PACKAGED_MODELS["gemma-3-270m"]
    expected_sha = __import__(packaged.module).EXPECTED_SHA256
    assert info["sha256"] == expected_sha and info["package"].startswith(f"{packaged.distribution}==")
    assert info["file_name"] == packaged.file_name and info["bytes"] > 200_000_000
    assert info["model_type"] == "gemma3_text" and info["bos"]["add_bos"] is True
    losses = info["bos"]["loss_nats_per_token"]
    assert losses["with_bos"] < losses["without_bos"] - 2
    config = read_json(gemma / "config.json")
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (gemma / "model.safetensors").is_file() and (gemma / "tokenizer.json").is_file()

    plain = AutoModelForCausalLM.from_pretrained(str(gemma))  # transformers alone
    assert type(plain).__name__ == "Gemma3ForCausalLM" and plain.dtype == torch.float32
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    model, tokenizer = base
    ids = tokenizer(SENTENCE)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert encode_prompt(tokenizer, SENTENCE) == ids
    # a sentence the import did not probe: the saved BOS rule is the one with the much lower loss
    assert mean_nll(model, ids, skip=1) < mean_nll(model, ids[1:], skip=0) - 2


def test_a_gguf_file_as_model_name_is_converted_once_then_read_from_the_cache(gemma, tmp_path, monkeypatch):
    import delrec.llm.gguf_import as gguf_import

    packaged = PACKAGED_MODELS["gemma-3-270m"]
    gguf = __import__(packaged.module).assemble(output_path=tmp_path / packaged.file_name)
    folder = resolve_source(str(gguf))  # the import above already converted this file
    assert read_json(gemma / IMPORT_FILE)["sha256"] == read_json(f"{folder}/{IMPORT_FILE}")["sha256"]

    def convert_again(*args):
        raise AssertionError("converted a GGUF file the cache already holds")

    monkeypatch.setattr(gguf_import, "_convert", convert_again)
    assert resolve_source(str(gguf)) == folder
    with open(f"{folder}/model.safetensors", "rb") as a, open(gemma / "model.safetensors", "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)


def test_the_pipeline_llm_stage_imports_a_packaged_model_by_name(gemma, tmp_path, monkeypatch):
    import delrec.llm.gguf_import as gguf_import
    from delrec.pipeline import load_config
    from delrec.pipeline.layout import Layout
    from delrec.pipeline.stages import Context, stage_llm

    def convert_again(*args):
        raise AssertionError("the llm stage converted a GGUF file the cache already holds")

    monkeypatch.setattr(gguf_import, "_convert", convert_again)
    (tmp_path / "run.yaml").write_text("data: {format: synthetic}\nllm: {model: gemma-3-270m}\n")
    context = Context(load_config(tmp_path / "run.yaml"), Layout(tmp_path / "run"))
    outputs = stage_llm(context)
    folder = tmp_path / "run" / "llm" / "model"
    assert context.model_path() == str(folder) and context.model_config().model_name_or_path == str(folder)
    assert outputs["imported"] == "gemma-3-270m" and outputs["model"] == "llm/model" and not outputs["built"]
    assert outputs["sha256"] == read_json(gemma / IMPORT_FILE)["sha256"] == read_json(folder / IMPORT_FILE)["sha256"]
    with open(folder / "model.safetensors", "rb") as a, open(gemma / "model.safetensors", "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)


def test_zero_shot_ranking_on_the_real_model(gemma, gemma_data, tmp_path):
    out = tmp_path / "rank"
    argv = ["rank", "--model", str(gemma), "--data", str(gemma_data), "--split", "test", "--readout", "score",
            "--max_instances", "6", "--device", "cpu", "--no_progress", "--out", str(out)]
    assert main(argv) == 0
    rows = [row for _, row in read_jsonl(out / "rankings.jsonl")]
    metrics = read_json(out / "metrics.json")
    assert len(rows) == 6 and metrics["model"]["kind"] == "plain"
    for row in rows:
        assert sorted(row["items"]) == sorted(set(row["items"])) and len(row["items"]) == 6
        assert all(torch.isfinite(torch.tensor(row["scores"]))) and max(row["scores"]) < 0
        assert row["scores"] == sorted(row["scores"], reverse=True)
    assert 0 <= metrics["test"]["hr@1"] <= 1


def test_prompts_longer_than_the_sliding_window_are_scored_exactly(base):
    """Gemma's sliding layers see the last 512 tokens: packed scoring keeps the whole prompt cached and puts the
    window into those layers' masks, so the HF backend takes Gemma's whole context and a prompt beyond the window
    scores as the reference read-out does (one full forward per candidate)."""
    from delrec.llm.scoring import score_candidates, score_candidates_naive, sliding_window
    from delrec.ranking.hf import HFBackend

    model, tokenizer = base
    backend = HFBackend(model, tokenizer)
    assert backend.max_length == model.config.get_text_config().max_position_embeddings
    prompt = " ".join([SENTENCE] * 45)  # about 720 tokens: past the window
    assert len(encode_prompt(tokenizer, prompt)) > sliding_window(model) + 100
    fast = score_candidates(model, tokenizer, [prompt], [["tomatoes", "a garden"]])[0].logprob
    slow = score_candidates_naive(model, tokenizer, [prompt], [["tomatoes", "a garden"]])[0].logprob
    assert fast == pytest.approx(slow, abs=1e-3)


def test_stage1_on_tied_scaled_embeddings_moves_only_the_soft_rows(gemma_stage1_run, base):
    """Gemma ties the LM head to the embedding and multiplies looked-up rows by sqrt(hidden) = 25.3."""
    original, _ = base
    gemma_stage1, trainer = gemma_stage1_run.folder, gemma_stage1_run.result.trainer
    model, tokenizer = trainer.model, trainer.processing_class
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight
    vocab = original.get_input_embeddings().num_embeddings
    ids = tokenizer.convert_tokens_to_ids(SoftPrompt("pop", SOFT_TOKENS).tokens)
    assert ids == list(range(vocab, vocab + SOFT_TOKENS))
    assert torch.equal(weight[:vocab], original.get_input_embeddings().weight)
    embedding = original.get_input_embeddings().weight
    trained = dict(model.named_parameters())
    assert all(torch.equal(trained[n], p) for n, p in original.named_parameters() if p is not embedding)
    rows = weight[ids].detach()
    with safe_open(str(gemma_stage1 / SOFT_PROMPT_FILE), "pt") as handle:
        assert torch.equal(handle.get_tensor("embeddings"), rows)
    # initialised from real vocabulary rows (stored unscaled, so the model scales them like any token),
    # then moved by training: no row is still a copy, and they keep the vocabulary's scale
    assert not any((embedding == row).all(1).any() for row in rows)
    sample = embedding[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:4096]]
    ratio = rows.norm(dim=1).mean() / sample.norm(dim=1).mean()
    assert 0.5 < ratio < 2.0, ratio
    metrics = read_json(gemma_stage1 / "metrics.json")
    assert metrics["valid"]["rps_chance"] == pytest.approx(1 / 6)


def test_stage2_trains_lora_only_and_keeps_the_soft_rows(gemma_stage1, gemma_stage2_run):
    gemma_stage2, trainer = gemma_stage2_run.folder, gemma_stage2_run.result.trainer
    model, tokenizer = trainer.model, trainer.processing_class
    ids = tokenizer.convert_tokens_to_ids(SoftPrompt("pop", SOFT_TOKENS).tokens)
    with safe_open(str(gemma_stage1 / SOFT_PROMPT_FILE), "pt") as handle:
        stage1_rows = handle.get_tensor("embeddings")
    assert torch.equal(model.get_input_embeddings().weight[ids].detach(), stage1_rows)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 18 * 2 and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    with safe_open(str(gemma_stage2 / "adapter_model.safetensors"), "pt") as handle:
        assert all("lora_" in key for key in handle.keys())
    metrics = read_json(gemma_stage2 / "metrics.json")
    assert {"hr@1", "ndcg@5"} <= set(metrics["test"]) and metrics["protocol"] == "candidates"


# |bf16 - fp32| of the logged losses of these two-step runs (losses of 1.5-4 nats), measured at most 0.032 on an AMD
# EPYC (2026-12-06): Gemma's 18 layers round more than the tiny models' 2 (tests/test_mixed_precision.py: 0.01)
GEMMA_LOSS_TOLERANCE = 0.15


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_bf16_training_on_the_real_model_follows_float32(stage, gemma, gemma_data, gemma_pop, gemma_stage1, request,
                                                         tmp_path_factory):
    """The same run as the float32 fixture with `mixed_precision: bf16`: bfloat16 base weights, float32 trainables."""
    reference = request.getfixturevalue(f"gemma_{stage}_run").result
    config = model_config(gemma)
    config.dtype = "auto"
    out = tmp_path_factory.mktemp("gemma-bf16") / stage
    if stage == "stage1":
        result = run_stage1(out, config, gemma_data, gemma_pop, mixed_precision="bf16")
    else:
        result = run_stage2(out, config, gemma_data, gemma_stage1, mixed_precision="bf16")
    model = result.trainer.model
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16} and trained == {torch.float32}
    losses = [[e["loss"] for e in r.trainer.state.log_history if "loss" in e] for r in (result, reference)]
    assert len(losses[0]) == len(losses[1]) == 2
    assert max(abs(a - b) for a, b in zip(*losses)) < GEMMA_LOSS_TOLERANCE, losses


def test_export_logits_equal_the_unmerged_stage2_model(gemma_stage2, gemma_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unmerged, tokenizer, _ = load_delrec_model(gemma_stage2, device="cpu", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(str(gemma_export))
    exported_tokenizer = AutoTokenizer.from_pretrained(str(gemma_export))
    soft = SoftPrompt("pop", SOFT_TOKENS).placeholder_text()
    prompt = f"The pattern {soft} of a user who played these games:\n1. {SENTENCE}\nAnswer:"
    ids = encode_prompt(tokenizer, prompt)
    assert ids == encode_prompt(exported_tokenizer, prompt) and ids[0] == tokenizer.bos_token_id
    with torch.inference_mode():
        expected = unmerged(input_ids=torch.tensor([ids])).logits
        got = exported(input_ids=torch.tensor([ids])).logits
    assert (got - expected).abs().max().item() < 1e-4
    info = read_json(gemma_export / "delrec.json")
    assert info["kind"] == "delrec-export" and info["max_abs_logit_diff"] < 1e-4
    assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight


@pytest.mark.parametrize("mode", ["grounding", "rerank"])
def test_teacher_export_from_the_real_model(mode, gemma_export, gemma_data, gemma_pop, tmp_path):
    from delrec.data.dataset import PreparedDataset
    from delrec.distill import load_teacher

    out = tmp_path / mode
    argv = ["teacher", "export", "--model", str(gemma_export), "--data", str(gemma_data), "--mode", mode,
            "--topk", "4", "--device", "cpu", "--no_progress", "--out", str(out)]
    if mode == "rerank":
        argv += ["--sr_model", str(gemma_pop / "model"), "--sr_topm", "4",
                 "--num_random", "2"]
    assert main(argv) == 0
    dataset = PreparedDataset.load(gemma_data)
    teacher = load_teacher(out, dataset, min_topk=4)
    train = dataset.instances("train")
    assert teacher.items.shape == (len(train), 4) and torch.isfinite(teacher.scores).all()
    for instance, items in zip(train, teacher.items.tolist()):
        assert len(set(items)) == 4 and not set(items) & set(instance.history)
    if mode == "grounding":  # item embeddings: the last-layer hidden state of each title, Gemma's width
        assert teacher.embeddings.shape == (dataset.num_items, 640)


def test_prompt_render_and_lint_with_gemmas_tokenizer(gemma, gemma_data, capsys):
    assert main(["prompts", "render", "lsr", "--data", str(gemma_data), "--index", "1", "--soft-tokens",
                 str(SOFT_TOKENS), "--tokenizer", str(gemma)]) == 0
    out = capsys.readouterr().out
    assert "whitespace-separated words" not in out and "tokens" in out
    assert main(["prompts", "lint", "--data", str(gemma_data), "--tokenizer", str(gemma), "--max-length", "512"]) == 0
    assert ": ok" in capsys.readouterr().out
    assert main(["prompts", "lint", "--data", str(gemma_data), "--tokenizer", str(gemma), "--max-length", "20"]) == 2
    assert "exceed max length 20" in capsys.readouterr().out
