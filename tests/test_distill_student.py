"""`delrec student train` end to end on synthetic data with an SR teacher written by `write_teacher`."""

import json
from pathlib import Path

import pytest
import torch

from delrec.cli import main
from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.distill.dllm2rec import DLLM2RecConfig
from delrec.distill.rd import RDConfig
from delrec.distill.rrd import RRDConfig
from delrec.distill.student import train_student
from delrec.distill.teacher_folder import write_teacher
from delrec.sr import ItemEmbedding, SASRecConfig, TrainConfig, evaluate_model, load_model, pad_histories, predict, train_sr

SMALL = SASRecConfig(hidden_size=16, num_layers=1, num_heads=1, inner_size=32, dropout=0.1, max_length=16)
FLAGS = ["--model", "sasrec", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "1", "--inner_size", "32",
         "--max_length", "16", "--epochs", "2", "--lr", "0.01", "--batch_size", "32", "--no_progress",
         "--num_threads", "1", "--weight_search", "1"]  # the papers' fixed weights; the search has its own tests
PAPERS = [1.0]


def run(args):
    try:
        return main(args)
    except SystemExit as exc:  # argparse errors
        return exc.code


def sr_teacher(dataset, model, out, topk, embeddings=True):
    """A teacher folder from an SR model's top-K over the train split (history excluded)."""
    rows = list(predict(model, dataset, "train", topk))
    return write_teacher(
        out, dataset, torch.tensor([r["id"] for r in rows]), torch.tensor([r["items"] for r in rows]),
        torch.tensor([r["scores"] for r in rows]), "score",
        model.item_embeddings().detach() if embeddings else None, {"kind": "sr", "note": "test"},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    raw = make_synthetic(num_users=200, num_items=50, min_length=6, max_length=16, seed=3)
    dataset = prepare_dataset(raw, PreprocessConfig(num_candidates=10), root / "data")
    model = train_sr(dataset, SMALL, TrainConfig(epochs=3, lr=0.01, batch_size=32, progress=False), root / "sasrec").model
    teacher = sr_teacher(dataset, model, root / "teacher", 10)
    short = sr_teacher(dataset, model, root / "teacher-k5", 5, embeddings=False)
    other_raw = make_synthetic(num_users=120, num_items=50, min_length=6, max_length=16, seed=9)
    other = prepare_dataset(other_raw, PreprocessConfig(num_candidates=10), root / "other-data")
    foreign = sr_teacher(other, train_sr(other, SMALL, TrainConfig(epochs=1, progress=False), root / "o").model,
                         root / "foreign-teacher", 10)
    return {"root": root, "dataset": dataset, "teacher": teacher, "short": short, "foreign": foreign}


@pytest.mark.parametrize("method", ["dllm2rec", "rd", "rrd", "none"])
def test_each_method_trains_writes_metrics_and_a_student_that_reloads(setup, method, capsys):
    out = setup["root"] / f"cli-{method}"
    teacher = [] if method == "none" else ["--teacher", str(setup["teacher"])]
    assert run(["student", "train", "--data", str(setup["dataset"].path), *FLAGS, "--method", method,
                "--out", str(out), *teacher]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed["method"] == method and metrics["epochs_run"] == 2 and metrics["protocol"] == "full"
    assert metrics["distillation"]["method"] == method
    assert len(metrics["distillation"]["teachers"]) == (0 if method == "none" else 1)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(("extra_loss" in entry) == (method != "none") for entry in log)
    reloaded = evaluate_model(load_model(out), setup["dataset"])
    for split in ("valid", "test"):
        assert reloaded[split] == metrics[split]
    assert reloaded["candidates"] == metrics["candidates"]


def test_embedding_distillation_saves_a_plain_student_with_identical_scores(setup, tmp_path):
    result = train_student(setup["dataset"], SMALL, TrainConfig(epochs=1, progress=False), [setup["teacher"]],
                           "dllm2rec", DLLM2RecConfig(), tmp_path / "ed", embedding_distillation=True,
                           weight_search=PAPERS)
    assert type(result.model.item_embedding) is ItemEmbedding  # baked
    reloaded = load_model(tmp_path / "ed")
    histories = pad_histories([inst.history for inst in setup["dataset"].instances("test")], reloaded.pad_id)
    with torch.no_grad():
        assert torch.equal(reloaded.score_all(histories), result.model.cpu().score_all(histories))
    assert result.metrics["distillation"]["embedding_distillation"] is True


def test_several_teachers_are_combined(setup, capsys):
    out = setup["root"] / "two-teachers"
    assert run(["student", "train", "--data", str(setup["dataset"].path), *FLAGS, "--method", "rd", "--topk", "5",
                "--teacher", str(setup["teacher"]), "--teacher", str(setup["short"]), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["distillation"]["teachers"]) == 2
    assert [t["folder"] for t in metrics["distillation"]["teachers"]] == [str(setup["teacher"]), str(setup["short"])]


def test_resuming_with_another_teacher_is_refused(setup, capsys):
    out = setup["root"] / "resume"
    base = ["student", "train", "--data", str(setup["dataset"].path), *FLAGS, "--method", "rd", "--topk", "5",
            "--out", str(out)]
    assert run(base + ["--teacher", str(setup["teacher"])]) == 0
    capsys.readouterr()
    assert run(base + ["--teacher", str(setup["short"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err


@pytest.mark.parametrize("method,config", [
    ("dllm2rec", DLLM2RecConfig(lambda_d=5.0)), ("rd", RDConfig(rd_weight=5.0, beta=5.0)), ("rrd", RRDConfig(rrd_weight=2.0))
])
def test_distillation_pulls_the_student_towards_the_teachers_lists(setup, tmp_path, method, config):
    """A teacher that lists the same 10 arbitrary items for everyone: the distilled student ranks
    them far higher than the student alone does."""
    dataset = setup["dataset"]
    train = dataset.instances("train")
    favourites = torch.arange(40, 50)
    items = favourites.repeat(len(train), 1)
    scores = torch.linspace(1.0, 0.1, 10).repeat(len(train), 1)
    folder = write_teacher(tmp_path / "odd-teacher", dataset, torch.tensor([i.id for i in train]), items, scores, "score")
    options = TrainConfig(epochs=1, lr=0.01, batch_size=32, progress=False)

    def share_in_top10(result):
        rows = list(predict(result.model.cpu(), dataset, "valid", 10))
        return sum(len(set(r["items"]) & set(favourites.tolist())) for r in rows) / (10 * len(rows))

    alone = train_student(dataset, SMALL, options, [], "none", None, tmp_path / "alone")
    distilled = train_student(dataset, SMALL, options, [folder], method, config, tmp_path / method,
                              weight_search=PAPERS)
    assert share_in_top10(distilled) > share_in_top10(alone) + 0.3


@pytest.mark.parametrize("extra,message", [
    (["--method", "dllm2rec"], "--teacher DIR"),
    (["--method", "rrd", "--topk", "20", "--teacher", "{teacher}"], "the loss needs K=20, the teacher has 10"),
    (["--method", "rd", "--teacher", "{foreign}"], "teacher was made on dataset"),
    (["--method", "rd", "--topk", "5", "--teacher", "{short}", "--embedding_distillation"], "no item embeddings"),
    (["--method", "none", "--teacher", "{teacher}"], "drop --teacher"),
    (["--method", "rd", "--teacher", "{root}/missing"], "teacher folder not found"),
    (["--method", "bogus", "--teacher", "{teacher}"], "unknown distillation method 'bogus'"),
    (["--method", "rd", "--teacher", "{teacher}", "--gamma_position", "0.5"], "unrecognized arguments"),
    (["--teacher", "{teacher}", "--weight_search", "0", "-1"], "weight_search must be at least 0.0, got -1.0"),
])
def test_bad_input_exits_2_with_one_line(setup, capsys, extra, message):
    paths = {k: str(setup[k]) for k in ("teacher", "short", "foreign", "root")}
    extra = [a.format(**paths) for a in extra]
    out = setup["root"] / "bad"
    assert run(["student", "train", "--data", str(setup["dataset"].path), *FLAGS, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_pop_is_not_a_student(setup, capsys):
    args = ["student", "train", "--data", str(setup["dataset"].path), "--model", "pop", "--method", "none",
            "--out", str(setup["root"] / "pop")]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sasrec, gru4rec" in err


@pytest.mark.parametrize("name", ["student-games.yaml", "student-lastfm.yaml"])
def test_example_configs_run(setup, name):
    config = Path(__file__).resolve().parents[1] / "configs" / "distill" / name
    out = setup["root"] / f"yaml-{name}"
    assert run(["student", "train", "--config", str(config), "--data", str(setup["dataset"].path),
                "--teacher", str(setup["teacher"]), "--out", str(out), "--epochs", "1", "--no_progress",
                "--num_threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["method"] == "dllm2rec" and metrics["distillation"]["embedding_distillation"]


def test_a_subset_teacher_distils_its_instances_and_leaves_the_others_to_the_students_own_loss(setup):
    """The term on a batch = the method's mean over the covered instances x their share of the batch."""
    from delrec.distill.student import METHODS, DistillationLoss
    from delrec.distill.teacher_folder import load_teacher
    from delrec.sr import build_model
    from delrec.sr.trainer import TrainBatch

    dataset = setup["dataset"]
    full = load_teacher(setup["teacher"], dataset)
    half = full.instance_ids[::2]
    subset = write_teacher(setup["root"] / "teacher-half", dataset, half, full.items[::2], full.scores[::2], "score")
    partial_teacher = load_teacher(subset, dataset)
    config = DLLM2RecConfig()
    model = build_model(SMALL, dataset.num_items)
    inputs = pad_histories([dataset.instances("train")[i].history for i in range(8)], dataset.num_items)
    labels = torch.tensor([[dataset.instances("train")[i].target] for i in range(8)])
    batch = TrainBatch(torch.arange(8), inputs, labels, None, None)
    states = model.encode(inputs)
    torch.manual_seed(0)
    partial = DistillationLoss(partial_teacher, METHODS["dllm2rec"], config)(model, batch, states)
    covered = TrainBatch(torch.arange(0, 8, 2), inputs[::2], labels[::2], None, None)
    torch.manual_seed(0)
    alone = DistillationLoss(full, METHODS["dllm2rec"], config)(model, covered, states[::2])
    assert partial.item() == pytest.approx(alone.item() * 4 / 8, rel=1e-5)
    none_covered = TrainBatch(torch.tensor([1, 3]), inputs[1:4:2], labels[1:4:2], None, None)
    zero = DistillationLoss(partial_teacher, METHODS["dllm2rec"], config)(model, none_covered, states[1:4:2])
    assert zero.item() == 0.0 and zero.requires_grad

    result = train_student(dataset, SMALL, TrainConfig(epochs=1, lr=0.01, batch_size=32, progress=False),
                           [subset], "dllm2rec", config, setup["root"] / "student-half", weight_search=PAPERS)
    assert result.metrics["distillation"]["teachers"][0]["instances"] == len(half)


def test_an_embeddings_only_teacher_serves_embedding_distillation_alone(setup, capsys):
    from delrec.distill.teacher_folder import load_teacher

    dataset = setup["dataset"]
    embeddings = load_teacher(setup["teacher"], dataset).embeddings
    folder = write_teacher(setup["root"] / "teacher-emb", dataset, None, None, None, None, embeddings,
                           {"kind": "llm-embeddings"})
    out = setup["root"] / "student-emb"
    assert run(["student", "train", "--data", str(dataset.path), *FLAGS, "--teacher", str(folder), "--method", "none",
                "--embedding_distillation", "true", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["embedding_distillation"] is True
    assert metrics["distillation"]["teachers"][0]["topk"] is None
    assert run(["student", "train", "--data", str(dataset.path), *FLAGS, "--teacher", str(folder), "--method",
                "dllm2rec", "--out", str(setup["root"] / "no")]) == 2
    assert "hold item embeddings only" in capsys.readouterr().err
    combined = train_student(dataset, SMALL, TrainConfig(epochs=1, lr=0.01, batch_size=32, progress=False),
                             [setup["teacher"], folder], "dllm2rec", DLLM2RecConfig(), setup["root"] / "student-both",
                             embedding_distillation=True, weight_search=PAPERS)
    assert combined.metrics["distillation"]["teachers"][1]["instances"] == 0


SEARCH_FLAGS = FLAGS[:-2]  # the default weight search


def best_valid_ndcg(folder: Path) -> float:
    return max(json.loads(line)["valid"]["ndcg@10"] for line in (folder / "log.jsonl").read_text().splitlines())


def test_the_weight_search_keeps_the_best_valid_scale_and_its_zero_is_the_student_alone(setup, capsys):
    """One student per scale; OUT is the one with the best valid NDCG@10 (ties: the smaller scale), and scale 0 is
    exactly `--method none`: the same seed, the same numbers."""
    data, out = str(setup["dataset"].path), setup["root"] / "search"
    assert run(["student", "train", "--data", data, *SEARCH_FLAGS, "--teacher", str(setup["teacher"]),
                "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    search = json.loads((out / "metrics.json").read_text())["distillation"]["weight_search"]
    assert search["scales"] == [0.0, 0.5, 1.0] and search["metric"] == "ndcg@10"
    valid = {s: best_valid_ndcg(out / "weight_search" / f"scale-{s:g}") for s in search["scales"]}
    assert [run_["valid"] for run_ in search["runs"]] == [valid[s] for s in search["scales"]]
    assert search["chosen"] == max(search["scales"], key=lambda s: (valid[s], -s)) == printed["weight_scale"]
    chosen = json.loads((out / "weight_search" / f"scale-{search['chosen']:g}" / "metrics.json").read_text())
    assert evaluate_model(load_model(out), setup["dataset"])["test"] == chosen["test"]

    alone = setup["root"] / "search-alone"
    assert run(["student", "train", "--data", data, *SEARCH_FLAGS, "--method", "none", "--out", str(alone)]) == 0
    zero = json.loads((out / "weight_search" / "scale-0" / "metrics.json").read_text())
    assert zero["valid"] == json.loads((alone / "metrics.json").read_text())["valid"]
    assert zero["distillation"]["method"] == "none" and zero["distillation"]["teachers"] == []
    one = json.loads((out / "weight_search" / "scale-1" / "metrics.json").read_text())
    assert one["distillation"]["method_config"]["lambda_d"] == DLLM2RecConfig().lambda_d
    half = json.loads((out / "weight_search" / "scale-0.5" / "metrics.json").read_text())
    assert half["distillation"]["method_config"]["lambda_d"] == 0.5 * DLLM2RecConfig().lambda_d


def test_a_harmful_teacher_is_left_out_by_the_weight_search(setup, tmp_path):
    """A teacher of random lists, weighted heavily, makes the distilled students worse on valid: the search keeps the
    student alone, whose test numbers OUT then holds (the demo's student fell 26% below alone with the fixed
    weight)."""
    dataset = setup["dataset"]
    ids = torch.tensor([inst.id for inst in dataset.instances("train") if inst.history])
    generator = torch.Generator().manual_seed(0)
    items = torch.stack([torch.randperm(dataset.num_items, generator=generator)[:10] for _ in ids])
    scores = torch.arange(10, 0, -1, dtype=torch.float32).expand(len(ids), 10)
    noise = write_teacher(tmp_path / "noise", dataset, ids, items, scores.contiguous(), "score", None, {"kind": "test"})
    result = train_student(dataset, SMALL, TrainConfig(epochs=2, lr=0.01, batch_size=32, progress=False), [noise],
                           "dllm2rec", DLLM2RecConfig(lambda_d=5.0), tmp_path / "out")
    search = result.metrics["distillation"]["weight_search"]
    valid = {run_["scale"]: run_["valid"] for run_ in search["runs"]}
    assert valid[1.0] < valid[0.0] and search["chosen"] == 0.0, search
    alone = json.loads((tmp_path / "out" / "weight_search" / "scale-0" / "metrics.json").read_text())
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test"] == alone["test"]
    assert search["why"] == "the student alone had the best valid ndcg@10"
    logs = {f: f.read_text() for f in sorted((tmp_path / "out" / "weight_search").glob("*/log.jsonl"))}
    again = train_student(dataset, SMALL, TrainConfig(epochs=2, lr=0.01, batch_size=32, progress=False), [noise],
                          "dllm2rec", DLLM2RecConfig(lambda_d=5.0), tmp_path / "out")  # resumes: nothing retrains
    assert again.metrics["distillation"]["weight_search"] == search and again.metrics["test"] == alone["test"]
    assert {f: f.read_text() for f in logs} == logs
