"""`delrec export`: a stage-2 folder (LoRA + soft prompt) merged into a plain Hugging Face folder.

The exported model, loaded by transformers alone, must score candidates as the unmerged stage-2
model does (within 1e-4), on a tiny Llama (untied head) and a tiny Qwen2 (tied embeddings).
"""

import json
import shutil

import pytest
import torch

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.io import read_json
from delrec.llm.stage_folder import load_delrec_model
from delrec.llm.scoring import score_candidates
from delrec.llm.soft_prompt import SoftPrompt
from delrec.prompts import get_template
from delrec.ranking.models import describe_model
from delrec.ranking.requests import build_requests
from ranking_fixtures import SOFT_TOKENS


def lsr_requests(model_folder, data, tokenizer, count=6):
    spec = describe_model(str(model_folder))
    return build_requests(PreparedDataset.load(data), "test", spec, get_template(spec.template), tokenizer, 512,
                          lambda titles: 16, count)


@pytest.mark.parametrize("arch,soft", [("llama", True), ("qwen2", True), ("llama", False)])
def test_exported_model_scores_like_the_unmerged_one(arch, soft, request, tmp_path_factory, tiny_llm_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage2 = request.getfixturevalue(f"stage2_{arch}" + ("" if soft else "_plain"))
    out = request.getfixturevalue(f"export_{arch}") if soft else tmp_path_factory.mktemp("export") / "plain"
    if not soft:
        main(["export", "--model", str(stage2), "--out", str(out)])
    unmerged, tokenizer, _ = load_delrec_model(stage2, device="cpu", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(out)  # transformers alone, no delrec code
    exported_tokenizer = AutoTokenizer.from_pretrained(out)

    requests = lsr_requests(out, tiny_llm_data, exported_tokenizer)
    assert (SoftPrompt("sasrec", SOFT_TOKENS).placeholder_text() in requests[0].prompt) == soft
    prompts, titles = [r.prompt for r in requests], [list(r.titles) for r in requests]
    expected = score_candidates(unmerged, tokenizer, prompts, titles)
    got = score_candidates(exported, exported_tokenizer, prompts, titles)
    for a, b in zip(got, expected):
        assert a.num_tokens == b.num_tokens
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)

    info = read_json(out / "delrec.json")
    assert info["kind"] == "delrec-export" and info["template"] == ("lsr" if soft else "plain")
    assert info["max_abs_logit_diff"] < 1e-4
    assert (info["soft_prompt"] is not None) == soft
    tied = arch == "qwen2"
    assert exported.config.tie_word_embeddings == tied
    assert (exported.get_output_embeddings().weight is exported.get_input_embeddings().weight) == tied
    if soft:  # the soft rows are ordinary vocabulary rows of the export
        ids = exported_tokenizer.convert_tokens_to_ids(SoftPrompt("sasrec", SOFT_TOKENS).tokens)
        base = unmerged.get_base_model().get_input_embeddings().weight
        assert torch.equal(exported.get_input_embeddings().weight[ids], base[ids])


def test_ranking_a_stage2_folder_equals_ranking_its_export(stage2_llama, export_llama, tiny_llm_data, tmp_path):
    rows = {}
    for name, model in (("stage2", stage2_llama), ("export", export_llama)):
        argv = ["rank", "--model", str(model), "--data", str(tiny_llm_data), "--out", str(tmp_path / name),
                "--max_instances", "5", "--device", "cpu", "--no_progress"]
        assert main(argv) == 0
        rows[name] = (tmp_path / name / "rankings.jsonl").read_text().splitlines()
        metrics = read_json(tmp_path / name / "metrics.json")
        assert metrics["model"]["kind"] == name and metrics["model"]["template"] == "lsr"
    for a, b in zip(*(map(json.loads, rows[k]) for k in ("stage2", "export"))):
        assert a["items"] == b["items"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def broken_copy(folder, tmp_path, remove: str):
    copy = tmp_path / f"without-{remove}"
    shutil.copytree(folder, copy)
    for path in copy.glob(remove):
        path.unlink()
    return copy


@pytest.mark.parametrize("remove,message", [
    ("adapter_model.safetensors", "missing the adapter weights"),
    ("adapter_config.json", "missing the LoRA adapter"),
    ("soft_prompt.safetensors", "missing the soft prompt"),
    ("tokenizer*", "missing tokenizer files"),
    ("delrec.json", "not a DELRec stage-2 folder"),
])
def test_export_refuses_an_incomplete_stage2_folder(remove, message, stage2_llama, tmp_path, capsys):
    source = broken_copy(stage2_llama, tmp_path, remove)
    assert message in one_line_error(capsys, ["export", "--model", str(source), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_export_refuses_the_wrong_kind_of_folder(tiny_llama, tiny_llm_data, export_llama, stage2_llama, tmp_path,
                                                 capsys):
    def export(model, out=tmp_path / "out"):
        return one_line_error(capsys, ["export", "--model", str(model), "--out", str(out)])

    assert "not a DELRec stage-2 folder" in export(tiny_llama)
    assert "dataset" in export(tiny_llm_data)
    assert "already an exported model" in export(export_llama)
    assert "not found" in export(tmp_path / "nowhere")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert "--overwrite" in export(stage2_llama, tmp_path / "taken")


def test_export_finds_a_moved_base_model_by_its_content(stage2_llama, tiny_llama, tiny_llm_data, tmp_path, capsys):
    """The base moved: `--base_model NEW_PATH` is accepted because its files are the recorded ones, and the
    export scores as the one merged into the base at its old path."""
    stage2 = shutil.copytree(stage2_llama, tmp_path / "stage2")
    moved = shutil.copytree(tiny_llama, tmp_path / "moved-base")
    info = read_json(stage2 / "delrec.json")
    info["base_model"]["model_name_or_path"] = str(tmp_path / "gone")
    (stage2 / "delrec.json").write_text(json.dumps(info))
    assert "--base_model" in one_line_error(capsys, ["export", "--model", str(stage2), "--out", str(tmp_path / "o")])
    assert main(["export", "--model", str(stage2), "--out", str(tmp_path / "moved"), "--base_model", str(moved)]) == 0
    assert main(["export", "--model", str(stage2_llama), "--out", str(tmp_path / "original")]) == 0
    assert (tmp_path / "moved" / "model.safetensors").read_bytes() == (tmp_path / "original" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("remove,message", [
    ("model.safetensors", "missing the model weights"),
    ("tokenizer*", "missing tokenizer files"),
])
def test_rank_refuses_an_incomplete_export(remove, message, export_llama, tiny_llm_data, tmp_path, capsys):
    source = broken_copy(export_llama, tmp_path, remove)
    argv = ["rank", "--model", str(source), "--data", str(tiny_llm_data), "--out", str(tmp_path / "out")]
    assert message in one_line_error(capsys, argv)
