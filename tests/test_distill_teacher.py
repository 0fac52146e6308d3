"""Teacher folders: the format and its checks, and the SR, grounding and rerank teacher exports."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from delrec.cli import main
from delrec.config import parse_command
from delrec.data.dataset import Instance, PreparedDataset
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.distill import TeacherExportConfig, export_teacher, load_teacher, write_teacher
from delrec.distill.embedding import item_knn_hit_rate, standardized
from delrec.ranking.teacher_signals import embed_texts
from delrec.errors import DelrecError
from delrec.io import read_json, write_json
from delrec.llm.scoring import score_candidates
from delrec.metrics import history_mask
from delrec.prompts import get_template, task_variables
from delrec.ranking.hf import HFBackend, Options
from delrec.sr import load_model
from llm_fixtures import load_tiny


@pytest.fixture(scope="module")
def dataset(tiny_llm_data):
    return PreparedDataset.load(tiny_llm_data)


CPU = Options(device="cpu", dtype="float32", batch_size=8)


def export(model, data, out, **options):
    return export_teacher(TeacherExportConfig(model=str(model), data=str(data), out=str(out), progress=False,
                                              **options), CPU)


def test_sr_teacher_is_the_models_top_k_with_history_excluded(sr_model, sr_teacher, dataset):
    teacher = load_teacher(sr_teacher, dataset, min_topk=10)
    assert sorted(p.name for p in sr_teacher.iterdir()) == ["item_embeddings.safetensors", "rankings.safetensors",
                                                            "teacher.json"]
    train = dataset.instances("train")
    model = load_model(sr_model)
    with torch.no_grad():
        from delrec.sr import pad_histories

        scores = model.score_all(pad_histories([i.history for i in train], model.pad_id, model.context_length))
    scores = scores.masked_fill(history_mask([i.history for i in train], dataset.num_items), float("-inf"))
    values, items = scores.topk(10, dim=1)
    assert torch.equal(teacher.instance_ids, torch.arange(len(train)))
    assert torch.equal(teacher.items, items)
    assert torch.allclose(teacher.scores, values, atol=1e-5)
    assert torch.equal(teacher.embeddings, model.item_embeddings().detach())
    info = read_json(sr_teacher / "teacher.json")
    assert {k: info[k] for k in ("format", "format_version", "split", "num_instances", "num_items", "topk",
                                 "score_kind", "embedding_dim")} == {
        "format": "delrec-teacher", "format_version": 1, "split": "train", "num_instances": len(train),
        "num_items": dataset.num_items, "topk": 10, "score_kind": "score", "embedding_dim": 16}
    assert info["dataset_fingerprint"] == dataset.fingerprint and info["instances_per_second"] > 0
    targets = torch.tensor([i.target for i in train])
    assert info["source"]["kind"] == "sr"
    assert info["source"]["target_in_topk"] == pytest.approx((items == targets[:, None]).any(1).float().mean().item())


def test_item_knn_hit_rate_on_a_hand_computed_case():
    # standardised, items 0 and 1 are the vector (1, -1) and items 2 and 3 are (-1, 1)
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    users = [Instance(0, (0,), 1),  # nearest to 0 outside the history: 1 -> hit
             Instance(1, (2,), 1),  # nearest to 2: 3 -> miss
             Instance(2, (3, 0), 1),  # last item 0 -> 1 -> hit
             Instance(3, (1, 2), 1),  # the target is in the history: never a hit, no chance either
             Instance(4, (), 0)]  # no history: skipped
    assert item_knn_hit_rate(z, users, k=1) == {"k": 1, "users": 4, "hit_rate": 0.5,
                                                "chance": round((1 / 3 + 1 / 3 + 1 / 2) / 4, 6)}
    assert item_knn_hit_rate(z, users, k=3)["hit_rate"] == 0.75  # k past the items left: still only real hits
    assert item_knn_hit_rate(z, [Instance(0, (), 1)]) is None
    assert item_knn_hit_rate(z, [Instance(0, (0, 1, 2, 3), 1)], k=1) == {"k": 1, "users": 1, "hit_rate": 0.0,
                                                                       "chance": 0.0}  # no item left
    assert item_knn_hit_rate(z, users, k=1, max_users=2)["users"] == 2


def test_every_teacher_with_embeddings_reports_their_item_knn_hit_rate(sr_model, sr_teacher, dataset):
    unit = torch.nn.functional.normalize(standardized(load_model(sr_model).item_embeddings().detach()), dim=1)
    valid = [inst for inst in dataset.instances("valid") if inst.history]
    hits = 0
    for inst in valid:  # one user at a time, by the definition
        cosine = {item: float(unit[inst.history[-1]] @ unit[item]) for item in range(dataset.num_items)
                  if item not in inst.history}
        hits += inst.target in sorted(cosine, key=cosine.get, reverse=True)[:20]
    knn = read_json(sr_teacher / "teacher.json")["source"]["embedding_knn"]
    assert knn["split"] == "valid" and knn["k"] == 20 and knn["users"] == len(valid)
    assert knn["hit_rate"] == pytest.approx(hits / len(valid), abs=1e-6)


def test_write_then_load_gives_the_same_teacher_and_its_confidences_and_rows(sr_teacher, dataset, tmp_path):
    teacher = load_teacher(sr_teacher, dataset)
    out = write_teacher(tmp_path / "copy", dataset, teacher.instance_ids, teacher.items, teacher.scores, "score",
                        teacher.embeddings, {"kind": "external"}, seconds=2.0)
    again = load_teacher(out, dataset)
    for name in ("instance_ids", "items", "scores", "embeddings"):
        assert torch.equal(getattr(again, name), getattr(teacher, name)), name
    assert again.info["source"] == {"kind": "external"}
    assert again.info["instances_per_second"] == pytest.approx(len(teacher.instance_ids) / 2.0, abs=1e-3)
    assert torch.allclose(teacher.confidences(), torch.softmax(teacher.scores, -1))
    assert torch.allclose(teacher.confidences().sum(-1), torch.ones(len(teacher.items)))
    distance = write_teacher(tmp_path / "distance", dataset, teacher.instance_ids, teacher.items, -teacher.scores,
                             "distance")
    assert torch.allclose(load_teacher(distance, dataset).confidences(), teacher.confidences())
    assert torch.equal(teacher.rows(torch.tensor([5, 0, 5])), torch.tensor([5, 0, 5]))
    with pytest.raises(DelrecError, match=r"no row for train instance id\(s\) \[999\]"):
        teacher.rows(torch.tensor([1, 999]))


def edited(source, tmp_path, rankings=None, embeddings=None, info=None):
    """A copy of teacher folder `source` with some tensors or teacher.json fields replaced."""
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    if rankings:
        tensors = load_file(folder / "rankings.safetensors")
        save_file({**tensors, **rankings}, folder / "rankings.safetensors")
    if embeddings is not None:
        save_file({"embeddings": embeddings}, folder / "item_embeddings.safetensors")
    if info:
        write_json(folder / "teacher.json", {**read_json(folder / "teacher.json"), **info})
    return folder


def bad_scores(teacher):
    scores = teacher.scores.clone()
    scores[3, 2] = float("nan")
    scores[7, 0] = float("inf")
    return scores


def unsorted(teacher):
    scores = teacher.scores.clone()
    scores[4] = scores[4].flip(0)
    return scores


def repeated(teacher):
    items = teacher.items.clone()
    items[2, 1] = items[2, 0]
    return items


@pytest.mark.parametrize("case, message", [
    ("no folder", r"teacher folder not found"),
    ("no teacher.json", r"not a teacher folder \(no teacher.json\)"),
    ("no rankings", r"teacher folder is missing rankings.safetensors"),
    ("no embeddings", r"teacher folder is missing item_embeddings.safetensors \(teacher.json says embedding_dim 16\)"),
    ("version", r"teacher format version 2, this delrec reads 1"),
    ("split", r"teacher for split 'valid'"),
    ("other dataset", r"teacher was made on dataset"),
    ("rows", r"80 rows for 60 instance ids"),
    ("ids", r"row 79 holds instance id 0 after 79; instance ids must be strictly increasing"),
    ("unknown id", r"row 79 holds instance id 1000, which is not a train instance"),
    ("item range", r"row 1 holds item id 40, outside the catalogue 0..39"),
    ("repeat", r"row 2 lists an item twice"),
    ("nan", r"2 NaN/inf scores \(first in row 3, train instance 3\)"),
    ("unsorted", r"row 4 is not sorted best first \(scores: highest first\)"),
    ("embedding rows", r"embedding matrix of shape \[39, 16\], expected \[40, D\]"),
    ("dtype", r"tensor 'items' has dtype torch.float32, expected integer"),
    ("missing tensor", r"no tensor 'scores'"),
    ("topk", r"the loss needs K=20, the teacher has 10; re-export with --topk 20"),
])
def test_bad_teacher_folders_are_refused_with_one_line(case, message, sr_teacher, dataset, tmp_path):
    teacher = load_teacher(sr_teacher, dataset)
    folder, data, min_topk = sr_teacher, dataset, None
    if case == "no folder":
        folder = tmp_path / "missing"
    elif case == "no teacher.json":
        folder = edited(sr_teacher, tmp_path)
        (folder / "teacher.json").unlink()
    elif case in ("no rankings", "no embeddings"):
        folder = edited(sr_teacher, tmp_path)
        (folder / ("rankings.safetensors" if case == "no rankings" else "item_embeddings.safetensors")).unlink()
    elif case == "version":
        folder = edited(sr_teacher, tmp_path, info={"format_version": 2})
    elif case == "split":
        folder = edited(sr_teacher, tmp_path, info={"split": "valid"})
    elif case == "other dataset":
        raw = make_synthetic(num_users=30, num_items=40, min_length=5, max_length=12, seed=3)
        data = prepare_dataset(raw, PreprocessConfig(num_candidates=8), tmp_path / "other")
    elif case == "rows":
        folder = edited(sr_teacher, tmp_path, rankings={"instance_ids": teacher.instance_ids[:60]})
    elif case == "ids":
        folder = edited(sr_teacher, tmp_path, rankings={"instance_ids": teacher.instance_ids.roll(-1)})
    elif case == "unknown id":
        ids = teacher.instance_ids.clone()
        ids[-1] = 1000
        folder = edited(sr_teacher, tmp_path, rankings={"instance_ids": ids})
    elif case == "item range":
        items = teacher.items.clone()
        items[1, 9] = 40
        folder = edited(sr_teacher, tmp_path, rankings={"items": items})
    elif case == "repeat":
        folder = edited(sr_teacher, tmp_path, rankings={"items": repeated(teacher)})
    elif case == "nan":
        folder = edited(sr_teacher, tmp_path, rankings={"scores": bad_scores(teacher)})
    elif case == "unsorted":
        folder = edited(sr_teacher, tmp_path, rankings={"scores": unsorted(teacher)})
    elif case == "embedding rows":
        folder = edited(sr_teacher, tmp_path, embeddings=teacher.embeddings[:39].contiguous())
    elif case == "dtype":
        folder = edited(sr_teacher, tmp_path, rankings={"items": teacher.items.float()})
    elif case == "missing tensor":
        folder = tmp_path / "edited"
        shutil.copytree(sr_teacher, folder)
        tensors = load_file(folder / "rankings.safetensors")
        del tensors["scores"]
        save_file(tensors, folder / "rankings.safetensors")
    elif case == "topk":
        min_topk = 20
    with pytest.raises(DelrecError, match=message) as error:
        load_teacher(folder, data, min_topk=min_topk)
    assert "\n" not in str(error.value)


def test_write_teacher_checks_what_it_writes_and_never_replaces_another_folder(sr_teacher, dataset, tmp_path):
    teacher = load_teacher(sr_teacher, dataset)
    with pytest.raises(DelrecError, match=r"2 NaN/inf scores"):
        write_teacher(tmp_path / "t", dataset, teacher.instance_ids, teacher.items, bad_scores(teacher), "score")
    assert not (tmp_path / "t").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DelrecError, match=r"already exists and is not a teacher folder"):
        write_teacher(tmp_path / "other", dataset, teacher.instance_ids, teacher.items, teacher.scores, "score")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_cli_exports_an_sr_teacher_and_refuses_bad_input(sr_model, tiny_llm_data, dataset, tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["teacher", "export", "--model", str(sr_model), "--data", str(tiny_llm_data), "--out", str(out),
                 "--topk", "5", "--device", "cpu", "--no_progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "sr" and summary["topk"] == 5 and summary["num_instances"] == 80
    assert load_teacher(out, dataset).topk == 5
    for argv, message in [
        (["--topk", "41"], "--topk 41 exceeds the catalogue size (40 items)"),
        (["--topk", "35"], "--topk needs 35 items per instance, but train instance"),
        (["--mode", "grounding"], "is an SR model folder; --mode grounding needs an LLM"),
        (["--mode", "rerank"], "is an SR model folder; --mode rerank needs an LLM"),
        (["--out", str(sr_model)], "is the model folder; write the teacher to a folder of its own"),
    ]:
        base = {"--model": str(sr_model), "--data": str(tiny_llm_data), "--out": str(tmp_path / "bad")}
        flags = [x for key, value in base.items() if key not in argv for x in (key, value)]
        assert main(["teacher", "export", *flags, *argv]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


# ----------------------------------------------------------------------------- LLM teachers


def test_embed_texts_batches_like_one_text_at_a_time(tiny_llama):
    model, tokenizer = load_tiny(tiny_llama)
    texts = ["The Hollow Echo", "Endless Compass II of the North", "", "a"]
    batched = embed_texts(model, tokenizer, texts, batch_size=4)
    alone = torch.cat([embed_texts(model, tokenizer, [t], batch_size=1) for t in texts])
    assert batched.shape == (4, model.config.hidden_size)
    assert torch.allclose(batched, alone, atol=1e-5)
    with torch.no_grad():
        ids = tokenizer("Endless Compass II of the North", add_special_tokens=True)["input_ids"]
        direct = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    assert torch.allclose(batched[1], direct, atol=1e-5)


def test_grounding_teacher_ranks_all_items_by_distance_to_the_generated_title(tiny_llama, tiny_llm_data, dataset,
                                                                            tmp_path, monkeypatch):
    out = export(tiny_llama, tiny_llm_data, tmp_path / "grounding", topk=8)
    teacher = load_teacher(out, dataset, min_topk=8)
    model, tokenizer = load_tiny(tiny_llama)
    titles = embed_texts(model, tokenizer, dataset.titles, batch_size=8)
    assert teacher.score_kind == "distance" and torch.allclose(teacher.embeddings, titles, atol=1e-5)
    train = dataset.instances("train")
    for row, inst in enumerate(train):
        assert not set(teacher.items[row].tolist()) & set(inst.history)
    source = teacher.info["source"]
    assert source["kind"] == "llm-grounding" and source["model"]["template"] == "teacher"
    assert source["backend"]["name"] == "hf" and teacher.info["instances_per_second"] > 0

    # a generation that IS the target's title grounds to the target, at distance 0
    targets = iter([dataset.titles[inst.target] for inst in train])
    monkeypatch.setattr(HFBackend, "generate", lambda self, prompts, budget: [next(targets) for _ in prompts])
    exact = load_teacher(export(tiny_llama, tiny_llm_data, tmp_path / "exact", topk=3), dataset)
    assert torch.equal(exact.items[:, 0], torch.tensor([inst.target for inst in train]))
    assert torch.allclose(exact.scores[:, 0], torch.zeros(len(train)), atol=1e-3)
    assert exact.info["source"]["target_in_topk"] == 1.0
    assert exact.info["source"]["generated_catalogue_titles"] == len(train)


def test_rerank_teacher_scores_the_sr_models_top_m_by_title_likelihood(tiny_llama, tiny_llm_data, sr_model, sr_teacher,
                                                                     dataset, tmp_path):
    out = export(tiny_llama, tiny_llm_data, tmp_path / "rerank", mode="rerank", sr_model=str(sr_model), topk=4,
                 sr_topm=4, num_random=0, template="teacher")
    teacher = load_teacher(out, dataset)
    sr = load_teacher(sr_teacher, dataset)
    assert teacher.score_kind == "score" and teacher.embeddings.shape == (40, 128)
    for row in range(len(teacher.items)):  # only the SR top-4 were scored: the same items, re-ordered
        assert sorted(teacher.items[row].tolist()) == sorted(sr.items[row, :4].tolist())
    # the teacher template lists no candidates, so each score is log P(title + EOS | history prompt)
    model, tokenizer = load_tiny(tiny_llama)
    template = get_template("teacher")
    for inst in dataset.instances("train")[:3]:
        prompt = template.render(task_variables("teacher", [dataset.titles[i] for i in inst.history], ""),
                                 with_completion=False).prompt
        items = teacher.items[inst.id].tolist()
        expected = score_candidates(model, tokenizer, [prompt], [[dataset.titles[i] for i in items]])[0].logprob
        assert teacher.scores[inst.id].tolist() == pytest.approx(expected, abs=1e-4)
    source = teacher.info["source"]
    assert source["kind"] == "llm-rerank" and source["sr_topm"] == 4 and source["num_random"] == 0

    mixed = load_teacher(export(tiny_llama, tiny_llm_data, tmp_path / "mixed", mode="rerank", sr_model=str(sr_model),
                                topk=10, sr_topm=5, num_random=6, seed=1), dataset)
    for row, inst in enumerate(dataset.instances("train")):
        assert not set(mixed.items[row].tolist()) & set(inst.history)
    assert 0 < mixed.info["source"]["target_in_candidates"] <= 1


def test_embeddings_teacher_holds_the_title_embeddings_and_no_rankings(tiny_llama, tiny_llm_data, dataset, tmp_path):
    out = export(tiny_llama, tiny_llm_data, tmp_path / "emb", mode="embeddings")
    assert not (out / "rankings.safetensors").exists()
    teacher = load_teacher(out, dataset, min_topk=10)  # no ranking loss can ask it for K: nothing to check
    model, tokenizer = load_tiny(tiny_llama)
    assert not teacher.has_rankings and teacher.topk is None and teacher.info["num_instances"] == 0
    assert torch.allclose(teacher.embeddings, embed_texts(model, tokenizer, dataset.titles, 8), atol=1e-5)
    assert teacher.info["source"]["embeddings"] == {"text": "each item title", "layer": -1, "pooling": "last"}

    middle = load_teacher(export(tiny_llama, tiny_llm_data, tmp_path / "mean", mode="embeddings", embedding_layer=1,
                                 embedding_pooling="mean"), dataset)
    ids = tokenizer(dataset.titles[3], add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
    kept = [i for i, token in enumerate(ids) if token != tokenizer.bos_token_id]
    assert torch.allclose(middle.embeddings[3], states[kept].mean(0), atol=1e-5)


def test_a_subset_of_instances_is_seeded_and_in_dataset_order(tiny_llama, tiny_llm_data, sr_model, dataset, tmp_path):
    options = dict(mode="rerank", sr_model=str(sr_model), topk=4, sr_topm=4, num_random=2, max_instances=25)
    first = load_teacher(export(tiny_llama, tiny_llm_data, tmp_path / "a", **options), dataset)
    again = load_teacher(export(tiny_llama, tiny_llm_data, tmp_path / "b", **options), dataset)
    full = load_teacher(export(tiny_llama, tiny_llm_data, tmp_path / "c", **{**options, "max_instances": None}),
                        dataset)
    ids = first.instance_ids.tolist()
    assert len(ids) == 25 and ids == sorted(set(ids)) and torch.equal(first.instance_ids, again.instance_ids)
    assert first.info["num_instances"] == 25 and first.info["num_train_instances"] == len(dataset.instances("train"))
    assert first.info["source"]["subset"] == {"max_instances": 25, "seed": 0, "instances": 25}
    assert set(ids) < set(full.instance_ids.tolist())
    with pytest.raises(DelrecError, match=r"no row for train instance id"):
        first.rows(torch.tensor([i for i in full.instance_ids.tolist() if i not in ids][:1]))
    assert first.rows(torch.tensor([ids[3], -5]), missing_ok=True).tolist() == [3, -1]


def test_llm_teachers_read_delrec_stage2_folders(stage2_llama, tiny_llm_data, sr_model, dataset, tmp_path):
    grounding = load_teacher(export(stage2_llama, tiny_llm_data, tmp_path / "grounding", topk=5), dataset)
    rerank = load_teacher(export(stage2_llama, tiny_llm_data, tmp_path / "rerank", mode="rerank",
                                 sr_model=str(sr_model), topk=5, sr_topm=6, num_random=2), dataset)
    assert grounding.info["source"]["model"]["template"] == "teacher"
    model = rerank.info["source"]["model"]
    assert model["kind"] == "stage2" and model["template"] == "lsr" and model["soft_prompt"] is True
    assert torch.allclose(grounding.embeddings, rerank.embeddings)


def test_llm_teacher_modes_refuse_what_does_not_fit(tiny_llama, tiny_llm_data, sr_model, tmp_path):
    cases = [
        (dict(mode="rerank"), "--mode rerank needs --sr_model DIR"),
        (dict(mode="rerank", sr_model=str(sr_model), topk=12, sr_topm=5, num_random=6),
         "--topk 12 exceeds the re-ranked list of --sr_topm 5 + --num_random 6 items"),
        (dict(mode="grounding", template="plain"), "--mode grounding renders a template without candidates"),
        (dict(mode="sr"), "--mode sr needs an SR model folder"),
        (dict(mode="grounding", backend="vllm"), "only the hf backend gives"),
        (dict(mode="embeddings", backend="vllm"), "--mode embeddings needs the LLM's hidden states"),
    ]
    for options, message in cases:
        with pytest.raises(DelrecError, match=message.replace("+", r"\+")):
            export(tiny_llama, tiny_llm_data, tmp_path / "bad", **options)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "distill").glob("teacher-*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_teacher_configs_parse(path):
    config, options = parse_command([TeacherExportConfig, Options], ["--config", str(path)], "delrec teacher export")
    assert config.mode in ("sr", "rerank", "embeddings") and config.topk == 10
    assert (config.sr_model is not None) == (config.mode == "rerank")
    assert config.max_instances is None or config.mode != "sr"  # a budget is for the LLM modes
