"""The SR trainer: selection on valid, checkpoints and resume, outputs, the extra-loss hook."""

import json

import pytest
import torch
import torch.nn.functional as F

from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.raw import RawDataset, RowInstance
from delrec.data.synthetic import make_synthetic
from delrec.errors import DelrecError
from delrec.sr import PopConfig, SASRecConfig, TrainConfig, load_model, train_sr
from delrec.sr.trainer import resolve_train_positions

SMALL = SASRecConfig(hidden_size=16, num_layers=1, num_heads=1, inner_size=32, dropout=0.1, max_length=20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    raw = make_synthetic(num_users=300, num_items=60, min_length=6, max_length=20, seed=0)
    return prepare_dataset(raw, PreprocessConfig(num_candidates=10), tmp_path_factory.mktemp("syn") / "data")


def fast(**overrides):
    options = dict(epochs=4, lr=0.01, batch_size=32, patience=0, progress=False, seed=0)
    return TrainConfig(**{**options, **overrides})


def test_sasrec_beats_popularity_by_a_wide_margin(dataset, tmp_path):
    pop = train_sr(dataset, PopConfig(), fast(), tmp_path / "pop")
    sasrec = train_sr(dataset, SMALL, fast(epochs=6), tmp_path / "sasrec")
    assert pop.epochs_run == 1 and pop.best_epoch == 1
    for split in ("valid", "test"):
        assert sasrec.metrics[split]["ndcg@10"] > 2 * pop.metrics[split]["ndcg@10"] + 0.1, (split, sasrec.metrics, pop.metrics)
    assert sasrec.metrics["candidates"]["test"]["hr@1"] > pop.metrics["candidates"]["test"]["hr@1"]


def test_outputs_metrics_log_and_selection_on_valid(dataset, tmp_path):
    out = tmp_path / "run"
    result = train_sr(dataset, SMALL, fast(), out)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "metrics.json", "log.jsonl", "checkpoint"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "full" and metrics["exclude_history"] is True
    assert metrics["dataset_fingerprint"] == dataset.fingerprint
    keys = {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (1, 5, 10, 20)}
    assert set(metrics["valid"]) == keys and set(metrics["test"]) == keys
    candidates = metrics["candidates"]
    assert candidates["protocol"] == "candidates" and set(candidates["test"]) == {"hr@1", "hr@5", "ndcg@5"}
    for key in ("train_seconds", "seconds_per_epoch", "best_epoch", "epochs_run", "peak_memory_mb"):
        assert isinstance(metrics[key], (int, float)) and metrics[key] > 0, key
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2, 3, 4] and log == result.log
    assert all({"loss", "train_seconds", "eval_seconds", "valid"} <= entry.keys() for entry in log)
    valid_ndcg = [entry["valid"]["ndcg@10"] for entry in log]
    assert metrics["best_epoch"] == 1 + valid_ndcg.index(max(valid_ndcg))
    assert metrics["valid"] == pytest.approx(log[metrics["best_epoch"] - 1]["valid"])  # the best epoch's model was kept
    assert metrics["seconds_per_epoch"] == pytest.approx(sum(e["train_seconds"] for e in log) / 4, abs=1e-3)
    reloaded = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), result.model.state_dict().values()))


def test_resume_after_interruption_equals_an_uninterrupted_run(dataset, tmp_path, capsys):
    straight = train_sr(dataset, SMALL, fast(epochs=4), tmp_path / "straight")
    first = train_sr(dataset, SMALL, fast(epochs=2), tmp_path / "resumed")
    assert first.epochs_run == 2
    resumed = train_sr(dataset, SMALL, fast(epochs=4), tmp_path / "resumed")
    assert resumed.epochs_run == 4
    assert [e["loss"] for e in resumed.log] == [e["loss"] for e in straight.log]
    for key in ("valid", "test", "candidates", "best_epoch"):
        assert resumed.metrics[key] == straight.metrics[key], key
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)
    assert "resuming" in capsys.readouterr().err  # said even without progress output
    again = train_sr(dataset, SMALL, fast(epochs=4), tmp_path / "resumed")  # finished: evaluates only
    assert again.epochs_run == 4 and again.metrics["test"] == straight.metrics["test"]


def test_resume_with_a_different_config_is_refused(dataset, tmp_path):
    train_sr(dataset, SMALL, fast(epochs=1), tmp_path / "run")
    with pytest.raises(DelrecError, match=r"cannot resume.*different configuration \(lr: 0.01 -> 0.02\)") as info:
        train_sr(dataset, SMALL, fast(epochs=2, lr=0.02), tmp_path / "run")
    assert "\n" not in str(info.value)
    bigger = SASRecConfig(**{**SMALL.__dict__, "hidden_size": 32})
    with pytest.raises(DelrecError, match=r"hidden_size: 16 -> 32"):
        train_sr(dataset, bigger, fast(epochs=2), tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DelrecError, match="already holds files but no training checkpoint"):
        train_sr(dataset, SMALL, fast(epochs=1), tmp_path / "other")


def test_early_stopping_on_a_flat_validation_curve(dataset, tmp_path):
    # lr so small that no weight changes: valid NDCG@10 never improves after epoch 1
    result = train_sr(dataset, SMALL, fast(epochs=10, lr=1e-12, patience=2), tmp_path / "flat")
    assert result.epochs_run == 3 and result.best_epoch == 1


def test_extra_loss_hook_sees_instances_and_last_states(dataset, tmp_path):
    seen = []
    train = dataset.instances("train")

    def extra_loss(model, batch, last_states):
        assert last_states.shape == (batch.inputs.shape[0], model.item_embeddings().shape[1])
        assert torch.equal(last_states, batch.states[:, -1])
        targets = torch.tensor([train[i].target for i in batch.ids.tolist()])
        assert torch.equal(batch.labels[:, -1], targets)  # last column: each instance's own target
        seen.append(batch.ids.numel())
        extra = 0.5 * last_states.pow(2).mean()
        added.append(extra.item())
        return extra

    added = []
    result = train_sr(dataset, SMALL, fast(epochs=1), tmp_path / "hook", extra_loss=extra_loss)
    assert sum(seen) == sum(1 for inst in train if inst.history)
    assert result.log[0]["extra_loss"] == pytest.approx(sum(added) / len(added))  # the mean over the epoch's batches


class OffsetEmbedding(torch.nn.Module):
    """A seam user: e_i = b_i + alpha * (W z_i + c), z a fixed 'teacher' matrix."""

    def __init__(self, base, teacher, alpha=0.3):
        super().__init__()
        self.base, self.alpha = base, alpha
        self.project = torch.nn.Linear(teacher.shape[1], base.embedding_dim)
        self.register_buffer("teacher", teacher)

    def table(self):
        return self.base.table() + self.alpha * self.project(self.teacher)

    def forward(self, ids):
        return torch.cat([self.table(), self.table().new_zeros(1, self.table().shape[1])])[ids]


def test_model_hook_wraps_the_embedding_and_the_saved_model_is_plain(dataset, tmp_path):
    teacher = torch.randn(dataset.num_items, 5, generator=torch.Generator().manual_seed(0))

    def wrap(model):
        model.item_embedding = OffsetEmbedding(model.item_embedding, teacher)

    settings = {"teacher": "fixed-random", "alpha": 0.3}
    result = train_sr(dataset, SMALL, fast(epochs=2), tmp_path / "ed", model_hook=wrap, extra_settings=settings)
    reloaded = load_model(tmp_path / "ed")
    assert type(reloaded.item_embedding).__name__ == "ItemEmbedding"
    assert reloaded.item_embeddings().shape == (dataset.num_items, SMALL.hidden_size)
    resumed = train_sr(dataset, SMALL, fast(epochs=2), tmp_path / "ed", model_hook=wrap, extra_settings=settings)
    assert resumed.metrics["test"] == result.metrics["test"]
    with pytest.raises(DelrecError, match=r"alpha: 0.3 -> 0.2"):
        train_sr(dataset, SMALL, fast(epochs=3), tmp_path / "ed", model_hook=wrap, extra_settings={**settings, "alpha": 0.2})


@pytest.mark.parametrize("positions", ["all", "last"])
def test_the_logged_loss_is_the_cross_entropy_of_the_positions_trained(dataset, tmp_path, positions):
    """`train_positions`: every real position predicts its next item, or only the last one (the instance's target)."""
    ce = {"all": [], "last": []}

    def record(model, batch, last_states):  # sees each batch's states before the step, as the main loss does
        table = model.item_embeddings()
        real = (batch.inputs != model.pad_id) & (batch.labels != model.pad_id)
        with torch.no_grad():
            ce["all"].append(F.cross_entropy(batch.states[real] @ table.T, batch.labels[real]).item())
            ce["last"].append(F.cross_entropy(last_states @ table.T, batch.labels[:, -1]).item())
        return last_states.sum() * 0.0

    result = train_sr(dataset, SMALL, fast(epochs=1, train_positions=positions), tmp_path / positions,
                      extra_loss=record)
    expected = {name: sum(values) / len(values) for name, values in ce.items()}
    other = "last" if positions == "all" else "all"
    assert result.log[0]["loss"] == pytest.approx(expected[positions], rel=1e-5)
    assert result.log[0]["loss"] != pytest.approx(expected[other], rel=1e-4)  # the other positions' CE is not it


def test_bce_trains_a_model_that_beats_popularity_by_a_wide_margin(dataset, tmp_path):
    pop = train_sr(dataset, PopConfig(), fast(), tmp_path / "pop")
    result = train_sr(dataset, SMALL, fast(epochs=4, loss="bce", num_negatives=3), tmp_path / "bce")
    losses = [entry["loss"] for entry in result.log]
    assert losses == sorted(losses, reverse=True), losses
    assert result.metrics["valid"]["ndcg@10"] > 2 * pop.metrics["valid"]["ndcg@10"], (result.metrics, pop.metrics)


def test_gbce_with_t_0_is_bce_and_calibration_lowers_the_positive_term(dataset, tmp_path):
    """gBCE's beta is 1 at t = 0 (plain BCE, the same negatives under the same seed) and below 1 above it."""
    runs = {name: train_sr(dataset, SMALL, fast(epochs=1, num_negatives=3, **options), tmp_path / name).log[0]["loss"]
            for name, options in {"bce": dict(loss="bce"), "t0": dict(loss="gbce", gbce_t=0.0),
                                  "t75": dict(loss="gbce", gbce_t=0.75)}.items()}
    assert runs["t0"] == pytest.approx(runs["bce"], rel=1e-5)
    assert runs["t75"] < runs["bce"] - 0.1, runs


def test_rows_data_trains_on_the_last_position_by_default(tmp_path):
    titles = {str(i): f"Item {i}" for i in range(30)}
    rows = []
    for user in range(20):
        seq = [str((user + step * 7) % 30) for step in range(6)]
        rows += [RowInstance(seq[:n], seq[n], "t") for n in range(1, 6)]
    raw = RawDataset(source="rows", titles=titles, splits={"train": rows, "valid": rows[:10], "test": rows[10:20]})
    data = prepare_dataset(raw, PreprocessConfig(num_candidates=5), tmp_path / "rows")
    assert resolve_train_positions("auto", data) == "last"
    result = train_sr(data, SMALL, fast(epochs=1), tmp_path / "run")
    assert result.metrics["train_config"]["train_positions"] == "last"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_cuda_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(DelrecError, match="--device cuda was requested but CUDA is not available"):
        train_sr(dataset, SMALL, fast(device="cuda"), tmp_path / "gpu")
