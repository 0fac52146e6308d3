"""`delrec rank` and `delrec teacher export` split over processes (delrec/ranking/shards.py): shards merged into the
very files one process writes, resumed from what an interrupted run wrote, refused when they are another run's.

The processes of a launch meet only in OUT/shards, so most tests play them in turn in this process (RANK and
WORLD_SIZE set as torchrun sets them; process 1 first, since the main process waits for the others' shards);
two slow tests run a real `accelerate launch` of 2 CPU processes against one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import launch_two_processes
from delrec.cli import main
from delrec.distill import TeacherExportConfig, export_teacher
from delrec.errors import DelrecError
from delrec.ranking import RankArguments, ReadoutConfig, rank
from delrec.ranking.hf import Options
from delrec.device import LaunchPosition
from delrec.ranking.shards import ROWS, TENSORS, Shard, Shards

CPU = Options(device="cpu", dtype="float32", batch_size=1)  # chunks of 8 instances: 24 instances are 3 shards
TIMINGS = ("seconds", "instances_per_second", "load_seconds", "total_seconds")
TEACHER_FILES = ("rankings.safetensors", "item_embeddings.safetensors", "user_states.safetensors")


def as_process(monkeypatch, index: int, count: int = 2) -> None:
    monkeypatch.setenv("RANK", str(index))
    monkeypatch.setenv("WORLD_SIZE", str(count))
    monkeypatch.setenv("LOCAL_RANK", str(index))


def single(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def rank_args(model, data, out, **options) -> RankArguments:
    return RankArguments(model=str(model), data=str(data), out=str(out), max_instances=24, sample_seed=3,
                         progress=False, **options)


def without_timings(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in TIMINGS}


def teacher_info(folder: Path) -> dict:
    info = json.loads((folder / "teacher.json").read_text())
    info["source"].pop("load_seconds")
    return without_timings(info)


def assert_same_rankings(folder: Path, reference: Path) -> None:
    assert (folder / "rankings.jsonl").read_bytes() == (reference / "rankings.jsonl").read_bytes()
    metrics = [json.loads((f / "metrics.json").read_text()) for f in (folder, reference)]
    assert without_timings(metrics[0]) == without_timings(metrics[1])
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "rankings.jsonl"]  # the shards are gone


def assert_same_teacher(folder: Path, reference: Path) -> None:
    for name in TEACHER_FILES:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert teacher_info(folder) == teacher_info(reference)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*TEACHER_FILES, "teacher.json"])


@pytest.fixture(scope="module")
def reference(tiny_llama, tiny_llm_data, tmp_path_factory):
    """One process's rankings and grounding teacher (with user states) of 24 instances, 3 shards each."""
    root = tmp_path_factory.mktemp("single")
    rank(rank_args(tiny_llama, tiny_llm_data, root / "rank"), ReadoutConfig(), CPU)
    export_teacher(teacher_config(tiny_llama, tiny_llm_data, root / "teacher"), CPU)
    return root


def teacher_config(model, data, out, **options) -> TeacherExportConfig:
    return TeacherExportConfig(model=str(model), data=str(data), out=str(out), mode="grounding", topk=5,
                               max_instances=24, user_states=True, progress=False, **options)


class Counted:
    """A stand-in for a function that counts the instances it was called on, and fails on call `fail_on`."""

    def __init__(self, function, fail_on: int | None = None):
        self.function, self.fail_on, self.calls, self.instances = function, fail_on, 0, 0

    def __call__(self, backend, requests, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        self.instances += len(requests)
        return self.function(backend, requests, *args, **kwargs)


# --- the processes, in turn ----------------------------------------------------------------------------------


def test_two_processes_write_the_single_process_rankings(tiny_llama, tiny_llm_data, reference, tmp_path,
                                                         monkeypatch):
    out = tmp_path / "rank"
    as_process(monkeypatch, 1)
    assert rank(rank_args(tiny_llama, tiny_llm_data, out), ReadoutConfig(), CPU) is None
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["test-16-24.jsonl", "test-8-16.jsonl"]
    assert not (out / "rankings.jsonl").exists()
    as_process(monkeypatch, 0)
    metrics = rank(rank_args(tiny_llama, tiny_llm_data, out), ReadoutConfig(), CPU)
    assert metrics["instances"] == 24 and metrics["seconds"] > 0
    assert_same_rankings(out, reference / "rank")


def test_two_processes_write_the_single_process_teacher(tiny_llama, tiny_llm_data, reference, tmp_path, monkeypatch):
    out = tmp_path / "teacher"
    as_process(monkeypatch, 1)
    assert export_teacher(teacher_config(tiny_llama, tiny_llm_data, out), CPU) is None
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["train-16-24.safetensors", "train-8-16.safetensors"]
    as_process(monkeypatch, 0)
    assert export_teacher(teacher_config(tiny_llama, tiny_llm_data, out), CPU) == out
    assert_same_teacher(out, reference / "teacher")


def test_an_interrupted_run_resumes_from_its_shards_with_any_number_of_processes(tiny_llama, tiny_llm_data, reference,
                                                                                tmp_path, monkeypatch):
    import delrec.ranking.runner as runner

    out = tmp_path / "rank"
    single(monkeypatch)
    interrupted = Counted(runner.read_out, fail_on=2)  # stopped in its second chunk: the first one is a shard
    monkeypatch.setattr(runner, "read_out", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rank(rank_args(tiny_llama, tiny_llm_data, out), ReadoutConfig(), CPU)
    assert [p.name for p in (out / "shards").iterdir()] == ["test-0-8.jsonl"] and interrupted.instances == 8

    # finished by two processes: process 1 ranks its two chunks, the main process finds its one written
    resumed = Counted(interrupted.function)
    monkeypatch.setattr(runner, "read_out", resumed)
    as_process(monkeypatch, 1)
    rank(rank_args(tiny_llama, tiny_llm_data, out), ReadoutConfig(), CPU)
    assert resumed.instances == 16
    as_process(monkeypatch, 0)
    rank(rank_args(tiny_llama, tiny_llm_data, out), ReadoutConfig(), CPU)
    assert resumed.instances == 16  # nothing left for the main process to rank
    assert_same_rankings(out, reference / "rank")


def test_an_interrupted_teacher_export_resumes_from_its_shards(tiny_llama, tiny_llm_data, reference, tmp_path,
                                                               monkeypatch):
    import delrec.ranking.teacher_signals as signals

    out = tmp_path / "teacher"
    single(monkeypatch)
    generate = signals.embed_texts
    calls = []

    def interrupted(model, tokenizer, texts, *args, **kwargs):  # titles, then per chunk generations and prompts
        calls.append(len(texts))
        if len(calls) == 4:  # in the second chunk
            raise KeyboardInterrupt
        return generate(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(signals, "embed_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_teacher(teacher_config(tiny_llama, tiny_llm_data, out), CPU)
    assert [p.name for p in (out / "shards").iterdir()] == ["train-0-8.safetensors"]
    calls.clear()
    monkeypatch.setattr(signals, "embed_texts", lambda *args, **kwargs: calls.append(len(args[2])) or generate(
        *args, **kwargs))
    export_teacher(teacher_config(tiny_llama, tiny_llm_data, out), CPU)
    assert calls[1:] == [8, 8, 8, 8]  # after the titles: two chunks, generations and prompts each; not the first
    assert_same_teacher(out, reference / "teacher")


# --- refusals --------------------------------------------------------------------------------------------------


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_shards_of_another_run_or_damaged_ones_are_refused_in_one_line(tiny_llama, tiny_llm_data, tmp_path,
                                                                       monkeypatch, capsys):
    import delrec.ranking.runner as runner

    out = tmp_path / "rank"
    single(monkeypatch)
    monkeypatch.setattr(runner, "read_out", Counted(runner.read_out, fail_on=2))
    with pytest.raises(KeyboardInterrupt):
        rank(rank_args(tiny_llama, tiny_llm_data, out), ReadoutConfig(), CPU)
    shard = out / "shards" / "test-0-8.jsonl"
    capsys.readouterr()  # the model loading's progress bar
    argv = ["rank", "--model", str(tiny_llama), "--data", str(tiny_llm_data), "--out", str(out), "--max_instances",
            "24", "--sample_seed", "3", "--device", "cpu", "--dtype", "float32", "--batch_size", "1", "--progress",
            "false"]
    err = one_line_error(capsys, [*argv, "--readout", "generate"])
    assert f"{shard}: a shard of another run (options.readout: 'score' there, 'generate' here)" in err
    assert f"delete {out / 'shards'} to start this one" in err
    assert "options.max_instances: 24 there, 16 here" in one_line_error(capsys, [*argv, "--max_instances", "16"])

    text = shard.read_text()
    shard.write_text(text[:-10])  # its last row cut short
    assert f"{shard}:" in one_line_error(capsys, argv)
    shard.write_bytes(b"\xff\xfe garbage")
    assert f"{shard}:1: not UTF-8 text; the file is damaged" in one_line_error(capsys, argv)
    shard.write_text(text.replace('"id": ', '"id": 1', 1))  # the header intact, a row of another instance
    assert f"{shard}: does not hold instances 0-8 of this run" in one_line_error(capsys, argv)
    shard.unlink()
    (out / "shards" / "notes.txt").write_text("mine")
    assert "notes.txt: not a shard of this command (expected test-START-END.jsonl)" in one_line_error(capsys, argv)
    assert not (out / "rankings.jsonl").exists()


def test_a_damaged_teacher_shard_is_refused_in_one_line(tiny_llama, tiny_llm_data, tmp_path, capsys):
    out = tmp_path / "teacher"
    shard = out / "shards" / "train-0-8.safetensors"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    argv = ["teacher", "export", "--model", str(tiny_llama), "--data", str(tiny_llm_data), "--out", str(out),
            "--mode", "grounding", "--device", "cpu", "--progress", "false"]
    err = one_line_error(capsys, argv)
    assert err.startswith("delrec teacher export: error: ") and f"{shard}: not a readable safetensors file" in err
    assert "(its instances are ranked again)" in err


# --- the shard folder alone ---------------------------------------------------------------------------------------


def test_ranges_are_split_into_contiguous_runs_and_merged_in_order(tmp_path):
    identity = {"command": "test", "options": {"k": (1, 2)}}
    ids = list(range(100, 110))

    def rows(start, end):
        return Shard(start, end, records=[{"id": ids[i], "value": i * 0.1} for i in range(start, end)],
                     extra={"n": end - start})

    written = []
    for index in (2, 1, 0):  # 10 instances, 4 per shard: 3 shards, one per process
        shards = Shards(tmp_path, "valid", ROWS, identity, LaunchPosition(index, 3, index))
        shards.plan(10, 4)
        shards.fill(lambda start, end: written.append((start, end)) or rows(start, end), False, "x")
    assert written == [(8, 10), (4, 8), (0, 4)] and shards.ranges == [(0, 4), (4, 8), (8, 10)]
    merged = list(shards.collect(ids, False))
    assert [r["value"] for s in merged for r in s.records] == [i * 0.1 for i in range(10)]
    assert [s.extra for s in merged] == [{"n": 4}, {"n": 4}, {"n": 2}]

    again = Shards(tmp_path, "valid", ROWS, identity, LaunchPosition())  # a resumed single process: nothing to do
    again.plan(10, 4)
    again.fill(lambda start, end: pytest.fail("ranked again"), False, "x")
    with pytest.raises(DelrecError, match=r"instances 0-4 are not a shard of this run, which writes 5 of its 10"):
        again.plan(10, 5)
    with pytest.raises(DelrecError, match=r"a shard of another run \(options.k: \[1, 2\] there, \[1, 3\] here\)"):
        Shards(tmp_path, "valid", ROWS, {"command": "test", "options": {"k": [1, 3]}}, LaunchPosition())
    with pytest.raises(DelrecError, match=r"does not hold instances 0-4 of this run \(ids \[1, 101, 102, 103\]\)"):
        next(again.collect([1, *ids[1:]], False))
    again.remove()
    assert not (tmp_path / "shards").exists()


def test_tensor_shards_keep_their_tensors_and_counts(tmp_path):
    shards = Shards(tmp_path, "train", TENSORS, {"command": "test"}, LaunchPosition())
    shards.plan(3, 2)
    shards.fill(lambda start, end: Shard(start, end, tensors={"ids": torch.arange(start, end),
                                                              "x": torch.rand(end - start, 4)},
                                         extra={"empty": start}), False, "x")
    first, last = shards.collect([0, 1, 2], False)
    assert first.tensors["x"].shape == (2, 4) and last.tensors["ids"].tolist() == [2] and last.extra == {"empty": 2}


# --- a real launch -------------------------------------------------------------------------------------------------


def launch(argv: list[str], cwd: Path) -> None:
    done = launch_two_processes(argv, cwd)
    assert "the main process writes" in done.stdout  # process 1 said what it did


@pytest.mark.slow
def test_accelerate_launch_of_two_processes_ranks_like_one(tiny_llama, tiny_llm_data, reference, tmp_path):
    launch(["rank", "--model", str(tiny_llama), "--data", str(tiny_llm_data), "--out", str(tmp_path / "rank"),
            "--max_instances", "24", "--sample_seed", "3", "--device", "cpu", "--dtype", "float32", "--batch_size",
            "1", "--progress", "false"], tmp_path)
    assert_same_rankings(tmp_path / "rank", reference / "rank")


@pytest.mark.slow
def test_accelerate_launch_of_two_processes_exports_the_teacher_of_one(tiny_llama, tiny_llm_data, reference, tmp_path):
    launch(["teacher", "export", "--model", str(tiny_llama), "--data", str(tiny_llm_data), "--out",
            str(tmp_path / "teacher"), "--mode", "grounding", "--topk", "5", "--max_instances", "24", "--user_states",
            "--device", "cpu", "--dtype", "float32", "--batch_size", "1", "--progress", "false"], tmp_path)
    assert_same_teacher(tmp_path / "teacher", reference / "teacher")
