"""Latent distillation (DE, FTD, HTD; docs/methods.md, "Latent distillation"): the formulas on hand-computed cases,
the temperature schedule, which tensors get gradients, students that learn with each method and stay plain SR
folders, and the teacher folder's user states."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.distill.de import DEConfig, DistillationExperts, distillation_experts_loss, gumbel_selection, temperature
from delrec.distill.student import LatentDistillation, train_student
from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
from delrec.distill.teacher_folder import load_teacher, write_teacher
from delrec.distill.topology import (
    FTDConfig,
    HTDConfig,
    cosine_matrix,
    ftd_loss,
    group_prototypes,
    htd_entity_loss,
    htd_group_loss,
)
from delrec.errors import DelrecError
from delrec.io import read_json, write_json
from delrec.sr import TrainConfig, build_model, evaluate_model, load_model, pad_histories, train_sr
from delrec.sr.trainer import TrainBatch
from distill_fixtures import TINY_SASREC

FAST = dict(lr=0.01, batch_size=32, progress=False, device="cpu", num_threads=1)


# --- DE ---------------------------------------------------------------------------------------------------


def hand_experts() -> DistillationExperts:
    """Two experts, d_s = d_t = 2 (so one hidden unit, the official rule for equal widths):
    E_1(s) = (2 relu(s_1), 1), E_2(s) = (1, 3 relu(s_2)); the selector gives alpha = (0.25, 0.75) for any t."""
    experts = DistillationExperts(2, 2, 2)
    with torch.no_grad():
        experts.w1.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]]))
        experts.b1.zero_()
        experts.w2.copy_(torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]]))
        experts.b2.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        experts.selector.weight.zero_()
        experts.selector.bias.copy_(torch.log(torch.tensor([0.25, 0.75])))
    return experts


def test_de_loss_equals_its_formula_on_a_hand_computed_two_expert_case():
    experts = hand_experts()
    student = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    teacher = torch.tensor([[1.0, 5.0], [0.0, 0.0]])
    # tau 0.5, no noise: z = softmax(2 log alpha) = (1/16, 9/16) / (10/16) = (0.1, 0.9) for both entities
    z = gumbel_selection(experts.selection(teacher), 0.5, torch.zeros(2, 2))
    assert torch.allclose(z, torch.tensor([[0.1, 0.9], [0.1, 0.9]]), atol=1e-6)
    # entity a: E_1 = (2, 1), E_2 = (1, 6), mixture (1.1, 5.5): (1 - 1.1)^2 + (5 - 5.5)^2 = 0.26
    # entity b: E_1 = (0, 1), E_2 = (1, 3), mixture (0.9, 2.8): 0.81 + 7.84 = 8.65
    expected = (0.26 + 8.65) / 2
    assert experts(student, teacher, 0.5, torch.zeros(2, 2)).item() == pytest.approx(expected, abs=1e-5)
    outputs = experts.expert_outputs(student)
    assert torch.equal(outputs, torch.tensor([[[2.0, 1.0], [1.0, 6.0]], [[0.0, 1.0], [1.0, 3.0]]]))
    assert distillation_experts_loss(teacher, outputs, z).item() == pytest.approx(expected, abs=1e-5)
    # Gumbel noise g enters as log(alpha) + g: g = (log 3, 0) makes both experts equally likely at any tau
    noisy = gumbel_selection(torch.tensor([[0.25, 0.75]]), 0.1, torch.tensor([[math.log(3.0), 0.0]]))
    assert torch.allclose(noisy, torch.tensor([[0.5, 0.5]]), atol=1e-5)


def test_the_temperature_anneals_exponentially_from_start_to_end():
    assert temperature(0.0, 1.0, 1e-10) == 1.0
    assert temperature(0.5, 1.0, 1e-10) == pytest.approx(1e-5, rel=1e-9)
    assert temperature(1.0, 1.0, 1e-10) == pytest.approx(1e-10, rel=1e-9)
    assert temperature(0.25, 2.0, 2e-4) == pytest.approx(0.2, rel=1e-9)
    assert temperature(-1.0, 1.0, 1e-4) == 1.0 and temperature(2.0, 1.0, 1e-4) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="must not exceed tau_start"):
        DEConfig(tau_start=0.1, tau_end=1.0)


def test_the_trainer_reports_progress_from_0_at_the_first_batch_to_1_at_the_last(tiny_llm_data, tmp_path):
    seen = []

    def recorder(model, batch, last_states):
        seen.append(batch.progress)
        return last_states.sum() * 0.0

    train_sr(tiny_llm_data, TINY_SASREC, TrainConfig(epochs=3, patience=0, **FAST), tmp_path / "sr", extra_loss=recorder)
    per_epoch = len(seen) // 3
    assert len(seen) == 3 * per_epoch and per_epoch > 1
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    assert seen[per_epoch] == pytest.approx(per_epoch / (3 * per_epoch - 1))


def test_at_a_temperature_near_0_the_choice_is_one_hot_and_a_sample_of_alpha():
    generator = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(64, 5, generator=generator), -1)
    noise = -torch.log(-torch.log(torch.rand(64, 5, generator=generator)))
    z = gumbel_selection(alpha, 1e-10, noise)
    assert torch.equal(z, torch.nn.functional.one_hot((alpha.log() + noise).argmax(-1), 5).float())
    soft = gumbel_selection(alpha, 1.0, noise)
    assert bool((soft < 1).all()) and torch.allclose(soft.sum(-1), torch.ones(64))
    torch.manual_seed(0)  # drawn noise: the chosen experts follow alpha
    peaked = torch.tensor([[0.9, 0.1]]).expand(4000, 2)
    share = gumbel_selection(peaked, 1e-10)[:, 0].mean().item()
    assert share == pytest.approx(0.9, abs=0.03)


# --- FTD, HTD -----------------------------------------------------------------------------------------------

# Three entities: teacher cosines t1.t2 = 0, t1.t3 = t2.t3 = 1/sqrt(2); student (another width) s1.s2 = 1, the rest 0
TEACHER3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
STUDENT3 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)


def test_ftd_is_the_mean_of_the_double_sum_of_squared_cosine_differences():
    # ordered pairs: (1,2),(2,1): (0 - 1)^2; (1,3),(3,1),(2,3),(3,2): (1/sqrt 2 - 0)^2 = 0.5; the diagonal 0
    assert ftd_loss(TEACHER3, STUDENT3).item() == pytest.approx((2 * 1 + 4 * 0.5) / 9, abs=1e-12)
    double_sum = sum((cosine_matrix(TEACHER3)[i, j] - cosine_matrix(STUDENT3)[i, j]) ** 2
                     for i in range(3) for j in range(3))
    assert ftd_loss(TEACHER3, STUDENT3).item() == pytest.approx(double_sum.item() / 9, abs=1e-12)


def test_ftd_is_invariant_to_the_scale_and_the_width_of_either_side():
    generator = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(7, 12, generator=generator, dtype=torch.float64), \
        torch.randn(7, 4, generator=generator, dtype=torch.float64)
    base = ftd_loss(teacher, student).item()
    assert ftd_loss(3.0 * teacher, 0.01 * student).item() == pytest.approx(base, abs=1e-12)
    scales = torch.rand(7, 1, generator=generator, dtype=torch.float64) + 0.1  # per-entity scales too
    assert ftd_loss(teacher * scales, student / scales).item() == pytest.approx(base, abs=1e-12)
    wider = torch.cat([student, torch.zeros(7, 5, dtype=torch.float64)], 1)
    assert ftd_loss(torch.cat([teacher, torch.zeros(7, 100, dtype=torch.float64)], 1), wider).item() == \
        pytest.approx(base, abs=1e-12)
    assert ftd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_htd_pieces_equal_their_formulas():
    groups = torch.tensor([0, 0, 1])
    prototypes, present = group_prototypes(TEACHER3, groups)
    assert prototypes.tolist() == [[0.5, 0.5], [1.0, 1.0]] and present.tolist() == [0, 1]
    # entity level: the same-group ordered pairs (1,1),(1,2),(2,1),(2,2),(3,3); only (1,2),(2,1) differ, by 1
    assert htd_entity_loss(TEACHER3, STUDENT3, groups).item() == pytest.approx(2 / 5, abs=1e-12)
    # prototypes: teacher (0.5, 0.5) and (1, 1), cosine 1; student (1, 0, 0) and (0, 0, 2), cosine 0
    assert htd_group_loss(TEACHER3, STUDENT3, groups, "prototypes").item() == pytest.approx(2 / 4, abs=1e-12)
    # prototype against entity: teacher cosines 1/sqrt2, 1/sqrt2, 1 for both prototypes; student (1, 1, 0), (0, 0, 1)
    c = 1 / math.sqrt(2)
    expected = (2 * (c - 1) ** 2 + 1 + 2 * c ** 2 + 0) / 6
    assert htd_group_loss(TEACHER3, STUDENT3, groups, "entities").item() == pytest.approx(expected, abs=1e-12)
    # one group holding everything: the entity level is FTD itself
    ones = torch.zeros(3, dtype=torch.long)
    assert htd_entity_loss(TEACHER3, STUDENT3, ones).item() == pytest.approx(ftd_loss(TEACHER3, STUDENT3).item())


# --- the student side: gradients, training, saving -----------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tiny_llm_data):
    return PreparedDataset.load(tiny_llm_data)


@pytest.fixture(scope="module")
def state_teacher(tiny_llm_data, sr_model, tmp_path_factory):
    """The SR teacher of `sr_model` with its user states."""
    return export_teacher(TeacherExportConfig(model=str(sr_model), data=str(tiny_llm_data), progress=False,
                                              out=str(tmp_path_factory.mktemp("latent") / "teacher"), user_states=True))


def one_batch(dataset, model, size=8):
    train = dataset.instances("train")[:size]
    inputs = pad_histories([inst.history for inst in train], model.pad_id)
    labels = torch.tensor([[inst.target] for inst in train])
    return TrainBatch(torch.tensor([inst.id for inst in train]), inputs, labels, None, None, 0.0)  # tau = tau_start


CONFIGS = {"de": DEConfig(num_experts=3), "ftd": FTDConfig(), "htd": HTDConfig(num_groups=3, group_level="entities")}


@pytest.mark.parametrize("latent", ["de", "ftd", "htd"])
def test_only_the_students_and_the_latent_modules_parameters_get_gradients(dataset, state_teacher, latent):
    teacher = load_teacher(state_teacher, dataset)
    torch.manual_seed(0)
    model = build_model(TINY_SASREC, dataset.num_items)
    loss_module = LatentDistillation(latent, CONFIGS[latent], TINY_SASREC.hidden_size, teacher.user_state_ids,
                                     teacher.user_states, teacher.embeddings, teacher)
    batch = one_batch(dataset, model)
    loss = loss_module(model, batch, model.encode(batch.inputs))
    assert loss.item() > 0
    loss.backward()
    own = list(loss_module.parameters())
    assert (len(own) > 0) == (latent != "ftd")  # FTD has no projector
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in own)
    assert model.item_embedding.weight.grad is not None and bool(model.item_embedding.weight.grad.abs().sum() > 0)
    assert sum(p.grad is not None for p in model.parameters()) > len(list(model.parameters())) // 2
    buffers = [b for b in loss_module.buffers()]
    assert buffers and all(not b.requires_grad and b.grad is None for b in buffers)
    assert loss_module.state_dict().keys() == {n for n, _ in loss_module.named_parameters()}  # no teacher tensor
    for tensor in (teacher.user_states, teacher.embeddings):
        assert not tensor.requires_grad and tensor.grad is None


def test_de_on_a_batch_is_the_mean_error_of_users_plus_that_of_items(dataset, state_teacher):
    """One expert (z = 1): L_DE = mean_u ||t_u - E(s_u)||^2 + mean_i ||t_i - E(s_i)||^2 on standardised teacher rows,
    the items being the batch's targets and the teacher's lists; the weight multiplies it."""
    from delrec.distill.embedding import standardized

    teacher = load_teacher(state_teacher, dataset)
    model = build_model(TINY_SASREC, dataset.num_items)
    module = LatentDistillation("de", DEConfig(num_experts=1, de_weight=0.5), 16, teacher.user_state_ids,
                                teacher.user_states, teacher.embeddings, teacher)
    batch = one_batch(dataset, model)
    states = model.encode(batch.inputs)
    users = standardized(teacher.user_states)[batch.ids]
    items = torch.unique(torch.cat([batch.labels[:, -1], teacher.items[batch.ids].reshape(-1)]))
    item_t = standardized(teacher.embeddings)[items]
    by_hand = (users - module.users.expert_outputs(states)[:, 0]).pow(2).sum(-1).mean() + \
        (item_t - module.items.expert_outputs(model.item_embeddings()[items])[:, 0]).pow(2).sum(-1).mean()
    assert module(model, batch, states).item() == pytest.approx(0.5 * by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("latent", ["de", "ftd", "htd"])
def test_a_tiny_student_learns_the_teachers_space_with_each_latent_method(dataset, state_teacher, latent, tmp_path):
    """method none + the latent term alone: the training loss falls a lot and so does the latent term, and the
    student's train HR@10 rises."""
    config = {"de": DEConfig(de_weight=0.05, num_experts=4), "ftd": FTDConfig(), "htd": HTDConfig(num_groups=4)}[latent]
    result = train_student(dataset, TINY_SASREC, TrainConfig(epochs=16, patience=0, **FAST), [state_teacher], "none",
                           out=tmp_path / latent, weight_search=[1.0], latent=latent, latent_config=config)
    log = result.log
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], log
    assert log[-1]["extra_loss"] < 0.7 * log[0]["extra_loss"], [e["extra_loss"] for e in log]
    assert result.metrics["distillation"]["latent"] == latent
    untrained = build_model(TINY_SASREC, dataset.num_items)
    assert train_hit_rate(result.model.cpu(), dataset) > train_hit_rate(untrained, dataset) + 0.1


def train_hit_rate(model, dataset, k=10):
    train = [inst for inst in dataset.instances("train") if inst.history]
    with torch.no_grad():
        scores = model.eval().score_all(pad_histories([inst.history for inst in train], model.pad_id))
    top = scores.topk(k, dim=1).indices
    return (top == torch.tensor([inst.target for inst in train])[:, None]).any(1).float().mean().item()


def test_de_rrd_student_folder_holds_the_sr_model_alone_and_reloads_with_identical_scores(
        dataset, tiny_llm_data, state_teacher, tmp_path, capsys):
    out = tmp_path / "de-rrd"
    flags = ["--model", "sasrec", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "1", "--inner_size", "32",
             "--max_length", "20", "--epochs", "2", "--lr", "0.01", "--batch_size", "32", "--no_progress",
             "--num_threads", "1", "--weight_search", "1"]
    assert main(["student", "train", "--data", str(tiny_llm_data), *flags, "--teacher", str(state_teacher),
                 "--method", "rrd", "--latent", "de", "--num_experts", "4", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "rrd" and printed["latent"] == "de"
    distillation = json.loads((out / "metrics.json").read_text())["distillation"]
    assert distillation["latent_config"]["num_experts"] == 4 and distillation["method"] == "rrd"
    plain = tmp_path / "plain"
    train_sr(tiny_llm_data, TINY_SASREC, TrainConfig(epochs=1, **FAST), plain)
    with safe_open(out / "model.safetensors", "pt") as saved, safe_open(plain / "model.safetensors", "pt") as alone:
        assert set(saved.keys()) == set(alone.keys())
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["config.json", "log.jsonl", "metrics.json",
                                                                   "model.safetensors"]
    checkpoint = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert any(k.startswith("users.") for k in checkpoint["extra_loss"])  # the experts resume, not served
    reloaded = load_model(out)  # what `delrec serve` loads; metrics.json was computed by the in-memory student
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluate_model(reloaded, dataset)["test"] == metrics["test"]
    assert evaluate_model(reloaded, dataset)["valid"] == metrics["valid"]


def test_a_latent_student_saved_then_loaded_scores_identically(dataset, state_teacher, tmp_path):
    result = train_student(dataset, TINY_SASREC, TrainConfig(epochs=1, **FAST), [state_teacher], "rrd", out=tmp_path / "s",
                           weight_search=[1.0], latent="de", latent_config=DEConfig(num_experts=2))
    reloaded = load_model(tmp_path / "s")
    histories = pad_histories([inst.history for inst in dataset.instances("test")], reloaded.pad_id)
    with torch.no_grad():
        assert torch.equal(reloaded.score_all(histories), result.model.cpu().score_all(histories))


def test_an_interrupted_latent_run_resumes_to_the_uninterrupted_result(dataset, state_teacher, tmp_path, monkeypatch):
    """The experts and assigners are checkpointed: killed in epoch 3, re-run, the log equals a straight run's. (The
    temperature follows the configured epochs, so a run resumed with MORE epochs anneals on a longer schedule.)"""
    def run(out):
        return train_student(dataset, TINY_SASREC, TrainConfig(epochs=3, patience=0, **FAST), [state_teacher], "rd",
                             out=out, weight_search=[1.0], latent="htd", latent_config=HTDConfig(num_groups=3))

    forward = LatentDistillation.forward

    def dies_in_epoch_3(self, model, batch, last_states):
        if batch.progress > 0.7:
            raise KeyboardInterrupt
        return forward(self, model, batch, last_states)

    with monkeypatch.context() as patch:
        patch.setattr(LatentDistillation, "forward", dies_in_epoch_3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed")
    resumed = run(tmp_path / "resumed")
    straight = run(tmp_path / "straight")
    drop = ("train_seconds", "eval_seconds", "peak_memory_mb")
    assert [{k: v for k, v in e.items() if k not in drop} for e in resumed.log] == \
        [{k: v for k, v in e.items() if k not in drop} for e in straight.log]
    with pytest.raises(DelrecError, match="cannot resume"):
        train_student(dataset, TINY_SASREC, TrainConfig(epochs=3, patience=0, **FAST), [state_teacher], "rd",
                      out=tmp_path / "resumed", weight_search=[1.0], latent="htd", latent_config=HTDConfig(num_groups=4))


def test_the_weight_search_scales_the_latent_weight_and_its_zero_is_the_student_alone(dataset, state_teacher, tmp_path):
    result = train_student(dataset, TINY_SASREC, TrainConfig(epochs=1, **FAST), [state_teacher], "none",
                           out=tmp_path / "search", weight_search=[0.0, 0.5], latent="ftd",
                           latent_config=FTDConfig(ftd_weight=2.0))
    runs = tmp_path / "search" / "weight_search"
    half = json.loads((runs / "scale-0.5" / "metrics.json").read_text())["distillation"]
    zero = json.loads((runs / "scale-0" / "metrics.json").read_text())["distillation"]
    assert half["latent_config"]["ftd_weight"] == 1.0 and "latent" not in zero and zero["method"] == "none"
    assert result.metrics["distillation"]["weight_search"]["scales"] == [0.0, 0.5]


@pytest.mark.parametrize("extra,message", [
    (["--latent", "de", "--teacher", "{plain}"], "{plain}: --latent de --entities both needs the teacher's user "
                                                 "states (user_states.safetensors)"),
    (["--latent", "ftd", "--entities", "users", "--teacher", "{plain}"], "re-export it with `delrec teacher export "
                                                                         "... --user_states`"),
    (["--latent", "htd", "--teacher", "{wide}"], "puts users and items in one topology, but the teacher's user states "
                                                "are 5 wide and its item embeddings 16"),
    (["--latent", "de", "--entities", "users", "--teacher", "{states_only}", "--teacher", "{teacher}"], None),
    (["--latent", "de"], "--latent de distils a teacher's representations: give one with --teacher DIR"),
    (["--latent", "bogus", "--teacher", "{teacher}"], "unknown latent method 'bogus'"),
    (["--latent", "de", "--teacher", "{teacher}", "--ftd_weight", "1"], "unrecognized arguments"),
    (["--latent", "de", "--teacher", "{teacher}", "--tau_end", "0"], "tau_end must be above 0, got 0.0"),
])
def test_latent_options_are_checked_in_one_line(dataset, tiny_llm_data, sr_teacher, state_teacher, tmp_path, capsys,
                                               extra, message):
    teacher = load_teacher(state_teacher, dataset)
    wide = write_teacher(tmp_path / "wide", dataset, teacher.instance_ids, teacher.items, teacher.scores, "score",
                         teacher.embeddings, user_states=teacher.user_states[:, :5])
    states_only = write_teacher(tmp_path / "states-only", dataset, teacher.instance_ids, teacher.items, teacher.scores,
                                "score", None, user_states=teacher.user_states)
    paths = {"plain": str(sr_teacher), "teacher": str(state_teacher), "wide": str(wide), "states_only": str(states_only)}
    extra = [a.format(**paths) for a in extra]
    out = tmp_path / "bad"
    argv = ["student", "train", "--data", str(tiny_llm_data), "--model", "sasrec", "--hidden_size", "16",
            "--num_heads", "1", "--epochs", "1", "--no_progress", "--num_threads", "1", "--weight_search", "1",
            "--method", "none", "--out", str(out), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    if message is None:  # the first teacher's states drive the latent term; the second's rankings are combined
        assert code == 0
        capsys.readouterr()
        return
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message.format(**paths) in err, err
    assert not out.exists()


def test_student_train_help_lists_the_latent_options(capsys):
    with pytest.raises(SystemExit):
        main(["student", "train", "--latent", "htd", "--help"])
    text = capsys.readouterr().out
    for option in ("--latent {none,de,ftd,htd}", "--num_groups", "--htd_weight", "--assignment_weight", "--group_level",
                   "--tau_start", "--entities"):
        assert option in text, option


# --- teacher folders with user states ------------------------------------------------------------------------


def test_an_sr_teacher_exports_its_states_and_the_folder_round_trips(dataset, sr_model, state_teacher, sr_teacher,
                                                                   tmp_path):
    teacher = load_teacher(state_teacher, dataset)
    model = load_model(sr_model)
    train = dataset.instances("train")
    with torch.no_grad():
        states = model.encode(pad_histories([inst.history for inst in train], model.pad_id, model.context_length))
    assert torch.equal(teacher.user_state_ids, teacher.instance_ids)
    assert torch.allclose(teacher.user_states, states, atol=1e-5)
    assert teacher.info["user_state_dim"] == 16 and teacher.info["source"]["user_states"]["kind"].startswith("sr")
    copy = write_teacher(tmp_path / "copy", dataset, teacher.instance_ids, teacher.items, teacher.scores, "score",
                         teacher.embeddings, user_states=teacher.user_states)
    again = load_teacher(copy, dataset)
    assert torch.equal(again.user_states, teacher.user_states) and torch.equal(again.user_state_ids, teacher.instance_ids)
    old = load_teacher(sr_teacher, dataset)  # written without user states: loads as before
    assert old.user_states is None and old.user_state_ids is None and old.info["user_state_dim"] is None
    info = read_json(sr_teacher / "teacher.json")
    legacy = tmp_path / "legacy"
    shutil.copytree(sr_teacher, legacy)
    write_json(legacy / "teacher.json", {k: v for k, v in info.items() if k != "user_state_dim"})  # an older writer
    assert load_teacher(legacy, dataset).user_states is None
    subset = write_teacher(tmp_path / "emb-states", dataset, None, None, None, None, teacher.embeddings,
                           user_states=teacher.user_states[::2], user_state_ids=teacher.instance_ids[::2])
    assert torch.equal(load_teacher(subset, dataset).user_state_ids, teacher.instance_ids[::2])


def edit_states(source, tmp_path, tensors=None, info=None, drop=False):
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    if tensors is not None:
        save_file({**load_file(folder / "user_states.safetensors"), **tensors}, folder / "user_states.safetensors")
    if info:
        write_json(folder / "teacher.json", {**read_json(folder / "teacher.json"), **info})
    if drop:
        (folder / "user_states.safetensors").unlink()
    return folder


@pytest.mark.parametrize("case,message", [
    ("missing", "teacher folder is missing user_states.safetensors (teacher.json says user_state_dim 16)"),
    ("dim field", "field 'user_state_dim' is 8 but the files hold 16"),
    ("shifted ids", "the user states are not keyed like rankings.safetensors (row 0 holds instance id 1, the "
                    "rankings' row 0)"),
    ("fewer rows", "the user states are not keyed like rankings.safetensors (79 rows for the rankings' 80)"),
    ("nan", "1 NaN/inf values in the user states (first in row 4, train instance 4)"),
    ("shape", "expected instance_ids [R] and states [R, D], got shapes [80] and [80, 2, 8]"),
    ("dtype", "tensor 'states' has dtype torch.int64, expected float"),
    ("no tensor", "no tensor 'states'"),
])
def test_corrupt_or_mismatched_user_states_are_one_line_errors(dataset, state_teacher, tmp_path, case, message):
    teacher = load_teacher(state_teacher, dataset)
    states, ids = teacher.user_states, teacher.user_state_ids
    if case == "missing":
        folder = edit_states(state_teacher, tmp_path, drop=True)
    elif case == "dim field":
        folder = edit_states(state_teacher, tmp_path, info={"user_state_dim": 8})
    elif case == "shifted ids":
        folder = edit_states(state_teacher, tmp_path, {"instance_ids": ids + 1})
    elif case == "fewer rows":
        folder = edit_states(state_teacher, tmp_path, {"instance_ids": ids[1:].clone(), "states": states[1:].clone()})
    elif case == "nan":
        broken = states.clone()
        broken[4, 3] = float("nan")
        folder = edit_states(state_teacher, tmp_path, {"states": broken})
    elif case == "shape":
        folder = edit_states(state_teacher, tmp_path, {"states": states.reshape(80, 2, 8).contiguous()})
    elif case == "dtype":
        folder = edit_states(state_teacher, tmp_path, {"states": states.long()})
    else:
        folder = tmp_path / "edited"
        shutil.copytree(state_teacher, folder)
        save_file({"instance_ids": ids}, folder / "user_states.safetensors")
    with pytest.raises(DelrecError) as error:
        load_teacher(folder, dataset)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_teacher_export_cli_writes_user_states_on_request_and_refuses_modes_without_them(
        sr_model, tiny_llm_data, dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["teacher", "export", "--model", str(sr_model), "--data", str(tiny_llm_data), "--topk", "5",
                 "--user_states", "--device", "cpu", "--no_progress", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["user_state_dim"] == 16
    assert load_teacher(out, dataset).user_states.shape == (80, 16)
    code = main(["teacher", "export", "--model", str(tmp_path / "llm"), "--data", str(tiny_llm_data), "--mode",
                 "embeddings", "--user_states", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--mode embeddings writes no user states" in err


def test_a_grounding_teacher_writes_the_prompts_hidden_states(tiny_llama, tiny_llm_data, dataset, tmp_path):
    from delrec.ranking.hf import Options
    from delrec.ranking.models import describe_model, ranking_template
    from delrec.ranking.requests import requests_for
    from delrec.ranking.teacher_signals import embed_texts
    from llm_fixtures import load_tiny

    out = export_teacher(TeacherExportConfig(model=str(tiny_llama), data=str(tiny_llm_data), out=str(tmp_path / "t"),
                                             mode="grounding", max_instances=3, topk=4, user_states=True,
                                             progress=False), Options(device="cpu", dtype="float32", batch_size=8))
    teacher = load_teacher(out, dataset)
    assert torch.equal(teacher.user_state_ids, teacher.instance_ids) and len(teacher.instance_ids) == 3
    assert teacher.user_states.shape[1] == teacher.embeddings.shape[1]  # one space: FTD/HTD can mix them
    model, tokenizer = load_tiny(tiny_llama)
    spec = describe_model(str(tiny_llama), "teacher", None)
    instances = [dataset.instances("train")[i] for i in teacher.instance_ids.tolist()]
    requests = requests_for(instances, [[] for _ in instances], dataset.titles, "train", spec,
                            ranking_template(spec, None), tokenizer, 10**6, lambda _: 8)
    expected = embed_texts(model, tokenizer, [r.prompt for r in requests], 8)
    assert torch.allclose(teacher.user_states, expected, atol=1e-4)
    assert teacher.info["source"]["user_states"] == {"kind": "prompt hidden state", "layer": -1, "pooling": "last"}
