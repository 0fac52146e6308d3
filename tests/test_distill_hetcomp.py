"""HetComp (docs/methods.md, "HetComp: a curriculum of teacher trajectories"): the teacher folder's optional
trajectory (round trip, old folders, corrupt files), SR snapshots and `--trajectory` export, the curriculum rule on
hand-made scores, the merge of several teachers, the loss against its formula, and tiny students trained with
`--method hetcomp` (learning, plain SR folders, resume)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_checks import one_line_error, run_cli
from delrec.data.dataset import PreparedDataset
from delrec.distill.hetcomp import HetCompConfig, HetCompLoss, discrepancy, position_weights
from delrec.distill.student import train_student
from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
from delrec.distill.teacher_folder import Teacher, Trajectory, load_teacher, write_teacher
from delrec.errors import DelrecError
from delrec.io import read_json, write_json
from delrec.sr import TrainConfig, build_model, evaluate_model, load_model, pad_histories, train_sr
from delrec.sr.evaluate import top_k
from distill_fixtures import TINY_SASREC

FAST = dict(lr=0.01, batch_size=32, progress=False, device="cpu", num_threads=1)
SNAPSHOTS = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def dataset(tiny_llm_data):
    return PreparedDataset.load(tiny_llm_data)


@pytest.fixture(scope="module")
def traj_model(tiny_llm_data, tmp_path_factory):
    """A tiny SASRec trained 6 epochs with a snapshot after each (its valid NDCG@10 rises every epoch or so)."""
    out = tmp_path_factory.mktemp("hetcomp") / "sasrec"
    train_sr(tiny_llm_data, TINY_SASREC, TrainConfig(epochs=6, patience=0, seed=0, snapshot_epochs=SNAPSHOTS, **FAST),
             out)
    return out


@pytest.fixture(scope="module")
def traj_teacher(tiny_llm_data, traj_model, tmp_path_factory):
    return export_teacher(TeacherExportConfig(model=str(traj_model), data=str(tiny_llm_data), trajectory=True,
                                              progress=False, out=str(tmp_path_factory.mktemp("hetcomp") / "teacher")))


# --- snapshots and the trajectory in the teacher folder ----------------------------------------------------------


def test_snapshots_hold_the_weights_of_their_epoch(traj_model):
    best = read_json(traj_model / "metrics.json")["best_epoch"]
    assert sorted(p.name for p in (traj_model / "snapshots").iterdir()) == [f"epoch-{e}.safetensors" for e in SNAPSHOTS]
    final = load_file(traj_model / "model.safetensors")
    snapshot = load_file(traj_model / "snapshots" / f"epoch-{best}.safetensors")
    assert snapshot.keys() == final.keys() and all(torch.equal(snapshot[k], final[k]) for k in final)
    first = load_file(traj_model / "snapshots" / "epoch-1.safetensors")
    assert best == 1 or not all(torch.equal(first[k], final[k]) for k in final)


def test_a_run_may_resume_with_other_snapshot_epochs(tiny_llm_data, tmp_path):
    out = tmp_path / "m"
    train_sr(tiny_llm_data, TINY_SASREC, TrainConfig(epochs=2, patience=0, snapshot_epochs=[1], **FAST), out)
    train_sr(tiny_llm_data, TINY_SASREC, TrainConfig(epochs=3, patience=0, snapshot_epochs=[2, 3], **FAST), out)
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["epoch-1.safetensors", "epoch-3.safetensors"]


def test_the_trajectory_holds_each_earlier_snapshots_rankings_and_round_trips(dataset, traj_model, traj_teacher,
                                                                             tmp_path):
    best = read_json(traj_model / "metrics.json")["best_epoch"]
    teacher = load_teacher(traj_teacher, dataset)
    epochs = tuple(e for e in SNAPSHOTS if e < best)
    assert len(epochs) >= 2, best  # the fixture's curriculum has somewhere to go
    assert teacher.trajectory.epochs == epochs and teacher.info["trajectory"] == list(epochs)
    assert teacher.trajectory.items.shape == (len(epochs), 80, 10)
    assert teacher.info["source"]["trajectory"]["final_epoch"] == best
    histories = [inst.history for inst in dataset.instances("train")]
    model = load_model(traj_model)
    items, scores = top_k(model, histories, 10, True, 64, False)
    assert torch.equal(teacher.items, items)  # the final (best) model's lists stay the rankings
    for c, epoch in enumerate(epochs):
        model.load_state_dict(load_file(traj_model / "snapshots" / f"epoch-{epoch}.safetensors"))
        items, scores = top_k(model, histories, 10, True, 64, False)
        assert torch.equal(teacher.trajectory.items[c], items) and torch.allclose(teacher.trajectory.scores[c], scores)
    copy = write_teacher(tmp_path / "copy", dataset, teacher.instance_ids, teacher.items, teacher.scores, "score",
                         trajectory=teacher.trajectory)
    again = load_teacher(copy, dataset)
    assert again.trajectory.epochs == epochs
    assert torch.equal(again.trajectory.items, teacher.trajectory.items)
    assert torch.equal(again.trajectory.scores, teacher.trajectory.scores)


def test_folders_without_a_trajectory_load_unchanged(dataset, sr_teacher, tmp_path):
    old = load_teacher(sr_teacher, dataset)
    assert old.trajectory is None and old.info["trajectory"] is None
    legacy = tmp_path / "legacy"
    shutil.copytree(sr_teacher, legacy)
    info = read_json(legacy / "teacher.json")
    write_json(legacy / "teacher.json", {k: v for k, v in info.items() if k != "trajectory"})  # an older writer
    again = load_teacher(legacy, dataset)
    assert again.trajectory is None and torch.equal(again.items, old.items)


def edit(source, tmp_path, tensors=None, info=None, drop=False, replace=None):
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    path = folder / "trajectory.safetensors"
    if tensors is not None:
        save_file({**load_file(path), **tensors}, path)
    if replace is not None:
        save_file(replace, path)
    if info:
        write_json(folder / "teacher.json", {**read_json(folder / "teacher.json"), **info})
    if drop:
        path.unlink()
    return folder


def corrupt(case, source, tmp_path, dataset):
    teacher = load_teacher(source, dataset)
    path, ids = teacher.trajectory, teacher.instance_ids
    items, scores, epochs = path.items, path.scores, list(path.epochs)
    if case == "missing":
        return edit(source, tmp_path, drop=True)
    if case == "epochs field":
        return edit(source, tmp_path, info={"trajectory": epochs[:-1]})
    if case == "epochs type":
        return edit(source, tmp_path, info={"trajectory": "all"})
    if case == "epochs order":
        return edit(source, tmp_path, info={"trajectory": epochs[::-1]})
    if case == "shifted ids":
        return edit(source, tmp_path, {"instance_ids": ids + 1})
    if case == "fewer rows":
        return edit(source, tmp_path, {"instance_ids": ids[1:].clone(), "items": items[:, 1:].clone(),
                                       "scores": scores[:, 1:].clone()})
    if case == "shorter K":
        return edit(source, tmp_path, {"items": items[:, :, :5].clone(), "scores": scores[:, :, :5].clone()})
    if case == "nan":
        broken = scores.clone()
        broken[1, 4, 3] = float("nan")
        return edit(source, tmp_path, {"scores": broken})
    if case == "item range":
        broken = items.clone()
        broken[0, 2, 0] = 40
        return edit(source, tmp_path, {"items": broken})
    if case == "unsorted":
        return edit(source, tmp_path, {"scores": scores.flip(-1).contiguous()})
    if case == "shape":
        return edit(source, tmp_path, {"items": items[0].clone(), "scores": scores[0].clone()})
    if case == "dtype":
        return edit(source, tmp_path, {"items": items.float()})
    if case == "no tensor":
        return edit(source, tmp_path, replace={"instance_ids": ids, "items": items})
    folder = tmp_path / "no-rankings"  # "beside no rankings"
    write_teacher(folder, dataset, None, None, None, None, teacher.embeddings)
    shutil.copy(source / "trajectory.safetensors", folder)
    return folder


@pytest.mark.parametrize("case,message", [
    ("missing", "teacher folder is missing trajectory.safetensors (teacher.json says trajectory [1, "),
    ("epochs field", "checkpoints, but teacher.json's 'trajectory' lists"),
    ("epochs type", "field 'trajectory' is 'all', expected the checkpoints' epochs"),
    ("epochs order", "expected non-negative integers, strictly increasing (oldest checkpoint first)"),
    ("shifted ids", "the trajectory is not keyed like rankings.safetensors (row 0 holds instance id 1, the rankings' "
                    "row 0)"),
    ("fewer rows", "the trajectory is not keyed like rankings.safetensors (79 rows for the rankings' 80)"),
    ("shorter K", "checkpoint lists of shape [80, 5], the rankings' [80, 10]"),
    ("nan", "checkpoint 1 (epoch 2): 1 NaN/inf scores (first in row 4, train instance 4)"),
    ("item range", "checkpoint 0 (epoch 1): row 2 holds item id 40, outside the catalogue 0..39"),
    ("unsorted", "checkpoint 0 (epoch 1): row 0 is not sorted best first"),
    ("shape", "expected instance_ids [R], items [C, R, K] and scores [C, R, K]"),
    ("dtype", "tensor 'items' has dtype torch.float32, expected integer"),
    ("no tensor", "no tensor 'scores'"),
    ("no rankings", "a trajectory beside no rankings.safetensors"),
])
def test_corrupt_or_mismatched_trajectories_are_one_line_errors(dataset, traj_teacher, tmp_path, case, message):
    folder = corrupt(case, traj_teacher, tmp_path, dataset)
    with pytest.raises(DelrecError) as error:
        load_teacher(folder, dataset)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert "trajectory" in str(error.value)


def test_trajectory_export_is_refused_in_one_line_without_snapshots_or_for_an_llm(sr_model, tiny_llm_data, tmp_path,
                                                                                 capsys):
    base = ["teacher", "export", "--data", tiny_llm_data, "--trajectory", "--no_progress"]
    one_line_error(capsys, run_cli([*base, "--model", sr_model, "--device", "cpu", "--out", tmp_path / "t"]),
                   f"--trajectory: {sr_model} has no weight snapshot before its best epoch",
                   "delrec sr train ... --snapshot_epochs")
    one_line_error(capsys, run_cli([*base, "--model", tmp_path / "llm", "--mode", "embeddings", "--out",
                                    tmp_path / "t"]), "--trajectory: --mode embeddings has no training trajectory")
    assert not (tmp_path / "t").exists()


# --- the curriculum rule, the merge and the loss on hand cases ----------------------------------------------------


def hand_teacher(ids, stages, folder=None):
    """An in-memory teacher: `stages` [S][R] lists, the last one the final rankings."""
    items = torch.tensor(stages)
    scores = -torch.arange(items.shape[-1], dtype=torch.float32).expand(items.shape).contiguous()
    trajectory = Trajectory(tuple(range(1, len(stages))), items[:-1], scores[:-1]) if len(stages) > 1 else None
    return Teacher(folder, {}, torch.tensor(ids), items[-1], scores[-1], "score", trajectory=trajectory)


def student_scores(tops, num_items=8):
    """[B, N] scores whose top-2 are each row's `tops` (in order); every other item far below."""
    scores = torch.zeros(len(tops), num_items)
    for row, (a, b) in enumerate(tops):
        scores[row, a], scores[row, b] = 2.0, 1.0
    return scores


W0, W1 = 1.0, (2 ** math.exp(-0.1) - 1) / math.log2(3)  # the discrepancy's position weights for K = 2
HALF = W1 / (W0 + W1)  # D when only the student's first item is in the list


def test_the_discrepancy_is_one_minus_the_position_weighted_overlap():
    assert position_weights(2).tolist() == pytest.approx([W0, W1])
    weights = position_weights(2)
    got = discrepancy(torch.tensor([[2, 0], [0, 2], [2, 3], [0, 1]]), torch.tensor([[2, 3]] * 4), weights)
    assert got.tolist() == pytest.approx([HALF, W0 / (W0 + W1), 0.0, 1.0])


def test_dkc_moves_an_instance_exactly_when_the_rule_says():
    """Stages of both instances: (0, 1) -> (2, 3) -> final (4, 5). Threshold 1.5, no decay. Visit 1: no check (0
    epochs done). Visit 2 (1 epoch done): references only. Then: instance 0 reaches the next list exactly (d = 0:
    move), then cuts its distance to the final one from 1 to HALF (ratio 2.8 > 1.5: move). Instance 1 keeps its
    distance (ratio 1: stay), then moves away from the next list (ratio HALF < 1: move)."""
    stages = [[[0, 1], [0, 1]], [[2, 3], [2, 3]], [[4, 5], [4, 5]]]
    loss = HetCompLoss([hand_teacher([0, 1], stages)], HetCompConfig(topk=2, alpha=1.5, alpha_decay=1.0))
    rows, history = torch.tensor([0, 1]), torch.zeros(2, 8, dtype=torch.bool)
    seen = []
    for tops in ([(0, 1), (0, 1)], [(2, 0), (2, 0)], [(2, 3), (2, 0)], [(4, 0), (0, 1)]):
        loss.visit(rows, student_scores(tops), history)
        seen.append((loss.stage[0].tolist(), [round(x, 4) for x in loss.reference[0].tolist()]))
    assert seen == [([0, 0], [0.0, 0.0]),
                    ([0, 0], [round(HALF, 4), round(HALF, 4)]),
                    ([1, 0], [1.0, round(HALF, 4)]),
                    ([2, 1], [round(HALF, 4), 1.0])]  # instance 0 at its final stage: reference to the final list
    assert loss.targets(rows).tolist() == [[4, 5], [2, 3]] and loss.at_final(rows).tolist() == [True, False]
    assert loss.visits.tolist() == [4, 4]


def test_the_threshold_decays_and_checks_follow_dkc_start_and_dkc_every():
    """alpha 1.5 x 0.5^(epochs done // 2): at 3 epochs done the threshold is 0.75 < ratio 1, so a student that
    kept its distance moves; checks at 1 and 3 epochs done only (start 1, every 2)."""
    stages = [[[0, 1]], [[2, 3]], [[4, 5]]]
    loss = HetCompLoss([hand_teacher([0], stages)],
                       HetCompConfig(topk=2, alpha=1.5, alpha_decay=0.5, dkc_start=1, dkc_every=2))
    rows, history = torch.tensor([0]), torch.zeros(1, 8, dtype=torch.bool)
    seen = []
    for tops in ([(0, 1)], [(2, 0)], [(2, 3)], [(2, 0)]):  # epochs done 0, 1 (reference), 2 (no check), 3
        loss.visit(rows, student_scores(tops), history)
        seen.append(int(loss.stage[0, 0]))
    assert seen == [0, 0, 0, 1] and loss.reference[0, 0].item() == pytest.approx(1.0)


def test_history_items_never_count_in_the_students_ranking():
    stages = [[[0, 1]], [[2, 3]]]
    loss = HetCompLoss([hand_teacher([0], stages)], HetCompConfig(topk=2, alpha=1.5, alpha_decay=1.0))
    history = torch.zeros(1, 8, dtype=torch.bool)
    history[0, 5] = True
    scores = student_scores([(2, 3)])
    scores[0, 5] = 9.0  # the best score, on a history item
    for _ in range(2):
        loss.visit(torch.tensor([0]), scores, history)
    assert loss.reference[0, 0].item() == 0.0  # the student's top-2 is (2, 3): the next list exactly


def test_several_teachers_merge_by_reciprocal_rank_each_at_its_own_stage():
    """K 3; teacher A: stage 0 (0 1 2), final (6 7 5); teacher B has no trajectory: (3 0 4), and no row for
    instance 1. F(0) = 1 + 1/2, F(3) = 1, F(1) = 1/2, F(2) = F(4) = 1/3."""
    a = hand_teacher([0, 1], [[[0, 1, 2], [0, 1, 2]], [[6, 7, 5], [6, 7, 5]]])
    b = hand_teacher([0], [[[3, 0, 4]]])
    loss = HetCompLoss([a, b], HetCompConfig(topk=3))
    rows = torch.tensor([0, 1])
    assert loss.targets(rows).tolist() == [[0, 3, 1], [0, 1, 2]]
    assert loss.stage.tolist() == [[0, 0], [0, 0]] and loss.last_stage.tolist() == [1, 0]
    loss.stage[0] = 1  # teacher A at its final stage: F(3) = F(6) = 1, F(0) = F(7) = 1/2; ties: the lower id first
    assert loss.targets(rows).tolist() == [[3, 6, 0], [6, 7, 5]]
    assert loss.at_final(rows).tolist() == [True, True]


def test_the_loss_equals_its_formulas_on_a_hand_case():
    """Row 0 list-wise (RRD over the target and ALL the rest), row 1 set-wise; history items and the target's
    items are not in the rest."""
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.3, -0.2, 1.5, 0.7, 2.0]], requires_grad=True)
    targets = torch.tensor([[0, 2], [4, 1]])
    history = torch.tensor([[False, False, False, True, False], [True, False, False, False, False]])
    got = HetCompLoss.loss(scores, targets, history, torch.tensor([True, False]))
    e = math.exp
    rest0 = e(1.0) + e(0.0)  # items 1 and 4 (3 is history)
    row0 = -math.log(e(2.0) / (e(2.0) + e(0.5) + rest0)) - math.log(e(0.5) / (e(0.5) + rest0))
    rest1 = e(1.5) + e(0.7)  # items 2 and 3 (0 is history)
    row1 = -math.log(e(2.0) / (e(2.0) + rest1)) - math.log(e(-0.2) / (e(-0.2) + rest1))
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    got.backward()
    assert scores.grad[0, 3] == 0 and scores.grad[1, 0] == 0  # history items take no part


# --- students ------------------------------------------------------------------------------------------------


def train_hit_rate(model, dataset, k=10):
    train = [inst for inst in dataset.instances("train") if inst.history]
    with torch.no_grad():
        scores = model.eval().score_all(pad_histories([inst.history for inst in train], model.pad_id))
    top = scores.topk(k, dim=1).indices
    return (top == torch.tensor([inst.target for inst in train])[:, None]).any(1).float().mean().item()


def test_a_tiny_student_learns_with_hetcomp_and_is_a_plain_sr_folder(dataset, tiny_llm_data, traj_teacher, tmp_path,
                                                                    capsys):
    out = tmp_path / "student"
    flags = ["--model", "sasrec", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "1", "--inner_size", "32",
             "--max_length", "20", "--epochs", "10", "--patience", "0", "--lr", "0.01", "--batch_size", "32",
             "--no_progress", "--num_threads", "1", "--weight_search", "1"]
    assert run_cli(["student", "train", "--data", tiny_llm_data, *flags, "--teacher", traj_teacher, "--method",
                    "hetcomp", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "hetcomp"
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], log
    assert all(entry["extra_loss"] > 0 for entry in log)
    curriculum = metrics["distillation"]["curriculum"]
    assert curriculum["share_at_final"] > 0 and curriculum["teachers"][0]["share_at_stage"][0] < 1, curriculum
    epochs = list(load_teacher(traj_teacher, dataset).trajectory.epochs)
    assert metrics["distillation"]["teachers"][0]["trajectory"] == epochs
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["config.json", "log.jsonl", "metrics.json",
                                                                   "model.safetensors"]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["extra_loss"]
    assert set(state) == {"stage", "reference", "visits"}  # the curriculum resumes; the teachers' lists are not saved
    student = load_model(out)
    assert evaluate_model(student, dataset)["test"] == metrics["test"]
    untrained = build_model(TINY_SASREC, dataset.num_items)
    assert train_hit_rate(student, dataset) > train_hit_rate(untrained, dataset) + 0.1


def test_an_interrupted_hetcomp_run_resumes_its_curriculum_to_the_uninterrupted_result(dataset, traj_teacher,
                                                                                      tmp_path, monkeypatch):
    def run(out):
        return train_student(dataset, TINY_SASREC, TrainConfig(epochs=4, patience=0, **FAST), [traj_teacher],
                             "hetcomp", out=out, weight_search=[1.0])

    forward = HetCompLoss.forward

    def dies_in_epoch_4(self, model, batch, last_states):
        if batch.progress > 0.8:
            raise KeyboardInterrupt
        return forward(self, model, batch, last_states)

    with monkeypatch.context() as patch:
        patch.setattr(HetCompLoss, "forward", dies_in_epoch_4)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed")
    resumed = run(tmp_path / "resumed")
    straight = run(tmp_path / "straight")
    drop = ("train_seconds", "eval_seconds", "peak_memory_mb")
    assert [{k: v for k, v in e.items() if k not in drop} for e in resumed.log] == \
        [{k: v for k, v in e.items() if k not in drop} for e in straight.log]
    assert resumed.metrics["distillation"]["curriculum"] == straight.metrics["distillation"]["curriculum"]


def test_hetcomp_takes_a_teacher_without_a_trajectory_beside_one_and_refuses_none(
        dataset, tiny_llm_data, traj_teacher, sr_teacher, tmp_path, capsys):
    result = train_student(dataset, TINY_SASREC, TrainConfig(epochs=1, **FAST), [traj_teacher, sr_teacher], "hetcomp",
                           out=tmp_path / "two", weight_search=[1.0])
    assert [t["trajectory"] is None for t in result.metrics["distillation"]["teachers"]] == [False, True]
    assert [t["stages"] for t in result.metrics["distillation"]["curriculum"]["teachers"]][1] == 1
    code = run_cli(["student", "train", "--data", tiny_llm_data, "--model", "sasrec", "--teacher", sr_teacher,
                    "--method", "hetcomp", "--weight_search", "0", "1", "--out", tmp_path / "none"])
    one_line_error(capsys, code, f"--method hetcomp distils a teacher's training trajectory, but {sr_teacher} hold "
                                 "none", "--trajectory")
    assert not (tmp_path / "none").exists()  # refused before the search's first (teacher-free) run
