"""SR and student training under `accelerate launch` (DDP) match one process with the same global batch.

In process (fast): each process's share of a batch (`process_batch_loss`), simulated for every rank, gives
losses that sum to one process's and gradients that average to one process's, for the main losses, a
per-instance extra loss and a batch-wide extra loss with parameters of its own (states gathered from every
process), also for a last batch smaller than the process count; and the one-line refusals.

Launched (slow, about 15 s each on 2 cores): `delrec sr train` and `delrec student train` with 2 CPU processes
(DDP over gloo) against one process: per-epoch losses, valid and test metrics, and the trained weights, within
tolerances measured here. The SR launch is resumed by one process and the DLLM2Rec launch resumes one process's
run, so checkpoints cross both ways; the DE launch computes its term on the whole batch from gathered states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import launch_two_processes
from delrec.cli import main as cli_main
from delrec.errors import DelrecError
from delrec.sr import SASRecConfig, TrainConfig, build_model
from delrec.sr.losses import next_item_loss
from delrec.sr.trainer import (
    TrainBatch, _own_stream, assemble_rows, check_processes, process_batch_loss, process_bounds,
)

NUM_ITEMS = 30
# Measured, 2 processes vs 1 (float32, 2 cores, 3 epochs of 5 batches; SR with bce, DLLM2Rec with embedding
# distillation, DE): per-epoch losses within 2.4e-7 (values 2 to 3.6), extra losses within 2.3e-9; valid and test
# metrics identical, every epoch; weights within 6.6e-7, but for SASRec's attention KEY bias (up to 2.8e-4): its
# gradient is 0 in exact arithmetic (a softmax does not move when every key score of a query shifts alike) and
# float noise in float32, which Adam scales to full steps; it changes no score, so it is left out. The tolerances
# leave a margin of about 20x.
LOSS_TOLERANCE = 5e-6
WEIGHT_TOLERANCE = 1e-5
TINY = ["--hidden_size", "16", "--num_layers", "1", "--num_heads", "1", "--inner_size", "32", "--dropout", "0",
        "--lr", "0.01", "--batch_size", "16", "--patience", "0", "--no_progress", "--device", "cpu",
        "--num_threads", "1"]


# --- in process: the arithmetic of the split ----------------------------------------------------------


def test_process_bounds_split_rows_contiguously_like_array_split():
    for rows in range(0, 12):
        for count in (1, 2, 3, 4):
            bounds = process_bounds(rows, count)
            assert [b - a for a, b in zip(bounds, bounds[1:])] == [len(p) for p in np.array_split(range(rows), count)]
            assert bounds[0] == 0 and bounds[-1] == rows


def test_check_processes_refuses_a_batch_the_processes_cannot_share_and_one_gpu_for_all():
    check_processes(TrainConfig(batch_size=6), 1, True)
    check_processes(TrainConfig(batch_size=6), 3, True)
    check_processes(TrainConfig(batch_size=5), 2, False)  # pop: counted, nothing is split
    with pytest.raises(DelrecError, match="--batch_size 5 is the global batch.*multiple of 2"):
        check_processes(TrainConfig(batch_size=5), 2, True)
    with pytest.raises(DelrecError, match="--device cuda:1 with 2 processes"):
        check_processes(TrainConfig(batch_size=4, device="cuda:1"), 2, True)


def test_sr_train_with_an_indivisible_batch_is_one_line_exit_2(sr_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under `accelerate launch`: refused before any process group
    monkeypatch.setenv("RANK", "0")
    code = cli_main(["sr", "train", "--data", str(sr_data), "--model", "sasrec", "--batch_size", "5", "--epochs", "1",
                     "--no_progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--batch_size 5 is the global batch, split evenly over the 2 processes" in err
    assert not (tmp_path / "out").exists()


def test_own_stream_leaves_the_shared_stream_and_repeats_with_its_seed():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with _own_stream(torch.device("cpu"), 11):
        first = torch.rand(5)
    with _own_stream(torch.device("cpu"), 11):
        again = torch.rand(5)
    assert torch.equal(first, again)
    assert torch.equal(torch.rand(4), expected)  # the shared stream did not move


def tiny_data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, lengths, left-padded sequences) as `training_sequences` returns them: `rows` sequences of 2-8 items."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 9, rows)
    seqs = np.full((rows, 8), NUM_ITEMS, dtype=np.int64)
    for row, length in enumerate(lengths):
        seqs[row, 8 - length:] = rng.integers(0, NUM_ITEMS, length)
    return np.arange(100, 100 + rows, dtype=np.int64), lengths.astype(np.int64), seqs


class RowTerm:
    """A per-instance extra loss: a mean over the batch's instances, weighed by their ids (so a row given another
    instance's id would show)."""

    per_instance = True

    def __call__(self, model, batch: TrainBatch, last_states: torch.Tensor) -> torch.Tensor:
        targets = model.item_embeddings()[batch.labels[:, -1]]
        weights = 1.0 + (batch.ids.float() - 100.0) / 10.0
        return (weights * F.softplus(-(last_states * targets).sum(-1))).mean()


class BatchTerm(nn.Module):
    """A batch-wide extra loss with a parameter of its own: the cosines between all pairs of the batch's projected
    states and its distinct target items (the topology methods' shape)."""

    def __init__(self, dim: int):
        super().__init__()
        self.projection = nn.Linear(dim, dim)

    def forward(self, model, batch: TrainBatch, last_states: torch.Tensor) -> torch.Tensor:
        items = model.item_embeddings()[torch.unique(batch.labels[:, -1])]
        unit = F.normalize(torch.cat([self.projection(last_states), items]), dim=1)
        return (unit @ unit.T).pow(2).mean()


class Simulated:
    """Process `rank` of `count`, in this process: the other processes' rows come from the whole batch's states."""

    def __init__(self, rank: int, count: int, whole_states: torch.Tensor):
        self.rank, self.count, self.whole = rank, count, whole_states

    def gather_rows(self, own: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        return assemble_rows([self.whole[a:b] for a, b in zip(bounds, bounds[1:])], self.rank, own)


@pytest.mark.parametrize("count, rows, loss, positions, extra", [
    (2, 9, "ce", "all", "rows"),  # 5 + 4 rows
    (3, 2, "bce", "all", "rows"),  # a last batch smaller than the count: 1 + 1 + 0 rows
    (2, 9, "gbce", "last", "batch"),
    (3, 2, "ce", "all", "batch"),
    (4, 7, "bce", "all", None),
])
def test_the_processes_shares_sum_to_one_process_loss_and_average_to_its_gradient(count, rows, loss, positions,
                                                                                  extra):
    torch.manual_seed(0)
    model = build_model(SASRecConfig(hidden_size=8, num_layers=1, num_heads=2, inner_size=16, dropout=0.0,
                                     max_length=8), NUM_ITEMS)
    extra_loss = {"rows": RowTerm(), "batch": BatchTerm(8), None: None}[extra]
    params = list(model.parameters()) + (list(extra_loss.parameters()) if isinstance(extra_loss, nn.Module) else [])
    config = TrainConfig(batch_size=rows, loss=loss, num_negatives=3)
    ids, lengths, seqs = data = tiny_data(rows)
    index = np.random.default_rng(1).permutation(rows)

    def gradient(value: torch.Tensor) -> list[torch.Tensor]:
        found = torch.autograd.grad(value, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]

    # one process, as `_train_epoch` computes a batch
    batch = torch.from_numpy(seqs[index, -int(lengths[index].max()):])
    inputs, labels = batch[:, :-1], batch[:, 1:]
    mask = (inputs != NUM_ITEMS) & (labels != NUM_ITEMS)
    if positions == "last":
        mask[:, :-1] = False
    torch.manual_seed(5)  # the negatives' stream
    states = model.sequence_states(inputs)
    main = next_item_loss(loss, states[mask], labels[mask], model.item_embeddings(), 3, config.gbce_t)
    value = main
    if extra_loss is not None:
        term = extra_loss(model, TrainBatch(torch.from_numpy(ids[index]), inputs, labels, mask, states, 0.5),
                          states[:, -1])
        value = main + term
    expected = gradient(value)

    logged, extra_logged, summed = 0.0, 0.0, [torch.zeros_like(p) for p in params]
    for rank in range(count):
        torch.manual_seed(5)  # the stream every process shares
        process = Simulated(rank, count, states.detach())
        own, part, extra_part = process_batch_loss(model, data, index, config, positions, extra_loss, 0.5, process)
        logged += part.item()
        extra_logged += 0.0 if extra_part is None else extra_part.item()
        summed = [s + g for s, g in zip(summed, gradient(own))]
    assert logged == pytest.approx(main.item(), rel=1e-6)
    if extra_loss is not None:
        assert extra_logged == pytest.approx(term.item(), rel=1e-6)
    for param, want, got in zip(params, expected, summed):
        assert torch.allclose(got / count, want, rtol=1e-4, atol=1e-7), (param.shape, (got / count - want).abs().max())


# --- launched: 2 processes against 1 ------------------------------------------------------------------


def one_process(command: list[str], capsys) -> None:
    assert cli_main(command) == 0
    capsys.readouterr()


def assert_same_training(two: Path, one: Path) -> None:
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (two, one)]
    assert len(logs[0]) == len(logs[1]) == 3
    for mine, theirs in zip(*logs):
        assert mine.keys() == theirs.keys()
        assert mine["valid"] == theirs["valid"] and mine["best"] == theirs["best"]
        for key in ("loss", "extra_loss"):
            if key in mine:
                assert mine[key] == pytest.approx(theirs[key], abs=LOSS_TOLERANCE), (key, mine, theirs)
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (two, one)]
    for key in ("valid", "test", "candidates", "best_epoch", "epochs_run", "train_config"):
        assert metrics[0][key] == metrics[1][key], key
    weights = [load_file(str(run / "model.safetensors")) for run in (two, one)]
    assert weights[0].keys() == weights[1].keys()
    for key, mine in weights[0].items():
        theirs = weights[1][key]
        if key.endswith("qkv.bias"):  # the key bias, its middle third, is left out (see WEIGHT_TOLERANCE)
            third = len(mine) // 3
            mine, theirs = torch.cat([mine[:third], mine[2 * third:]]), torch.cat([theirs[:third], theirs[2 * third:]])
        assert torch.allclose(mine, theirs, rtol=0, atol=WEIGHT_TOLERANCE), (key, (mine - theirs).abs().max())



@pytest.mark.slow  # about 15 s on 2 cores
def test_sr_train_on_two_processes_matches_one_and_one_process_resumes_it(tiny_llm_data, tmp_path, capsys):
    # bce: the negatives are drawn for the whole batch from the stream both processes share, as one process does
    common = ["sr", "train", "--data", str(tiny_llm_data), "--model", "sasrec", *TINY, "--loss", "bce",
              "--num_negatives", "2"]
    done = launch_two_processes([*common, "--epochs", "2", "--out", str(tmp_path / "two")], tmp_path)
    assert done.stdout.count('"best_epoch"') == 1  # one summary, from the main process
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    one_process([*common, "--epochs", "3", "--out", str(tmp_path / "two")], capsys)  # resumes the 2 processes' run
    one_process([*common, "--epochs", "3", "--out", str(tmp_path / "one")], capsys)
    assert_same_training(tmp_path / "two", tmp_path / "one")


@pytest.mark.slow  # about 15 s on 2 cores
def test_dllm2rec_student_on_two_processes_resumes_one_process_and_matches_it(tiny_llm_data, sr_teacher, tmp_path,
                                                                            capsys):
    # DLLM2Rec with embedding distillation (a projector inside the model), a weight search of 2 runs (scale 0: the
    # student alone), resumed by 2 processes after 2 epochs of one process, which then finish, choose and write
    common = ["student", "train", "--data", str(tiny_llm_data), "--model", "sasrec", *TINY, "--teacher",
              str(sr_teacher), "--method", "dllm2rec", "--embedding_distillation", "true", "--weight_search", "0", "1"]
    one_process([*common, "--epochs", "2", "--out", str(tmp_path / "two")], capsys)
    done = launch_two_processes([*common, "--epochs", "3", "--out", str(tmp_path / "two")], tmp_path)
    assert done.stdout.count('"weight_scale"') == 1 and done.stderr.count("resuming") == 2  # main process only
    one_process([*common, "--epochs", "3", "--out", str(tmp_path / "one")], capsys)
    for scale in ("scale-0", "scale-1"):
        assert_same_training(tmp_path / "two" / "weight_search" / scale, tmp_path / "one" / "weight_search" / scale)
    assert_same_training(tmp_path / "two", tmp_path / "one")
    chosen = [json.loads((run / "metrics.json").read_text())["distillation"]["weight_search"]
              for run in (tmp_path / "two", tmp_path / "one")]
    assert chosen[0]["chosen"] == chosen[1]["chosen"]
    assert [run["valid"] for run in chosen[0]["runs"]] == [run["valid"] for run in chosen[1]["runs"]]


@pytest.mark.slow  # about 15 s on 2 cores
def test_latent_de_student_on_two_processes_matches_one(tiny_llm_data, sr_teacher, tmp_path, capsys):
    # DE's experts: an extra loss with parameters of its own, computed on the whole batch in each process from the
    # gathered states, its Gumbel noise drawn from the stream both processes share
    common = ["student", "train", "--data", str(tiny_llm_data), "--model", "sasrec", *TINY, "--teacher",
              str(sr_teacher), "--method", "none", "--latent", "de", "--entities", "items", "--weight_search", "1",
              "--epochs", "3"]
    launch_two_processes([*common, "--out", str(tmp_path / "two")], tmp_path)
    one_process([*common, "--out", str(tmp_path / "one")], capsys)
    assert_same_training(tmp_path / "two", tmp_path / "one")
