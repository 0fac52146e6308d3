"""`delrec run` skips only what it can check: outside inputs are fingerprinted by content (a `touch` re-runs
nothing, an edit that keeps the size and restores the mtime is seen), a finished stage whose output was deleted or
edited re-runs with everything downstream, files are read again only when their stat moved, and a record from an
older delrec runs again instead of crashing.

Fast cases run the data stage alone on a small CSV input; output cases work on a copy of one whole run.
"""

import json
import os
import time
from pathlib import Path

import pytest

import delrec.pipeline.digests as digests_module
from delrec.cli import main
from delrec.pipeline import STAGE_FILE, STAGES
from delrec.pipeline.digests import FileDigests
from delrec.pipeline.layout import DIGESTS_FILE
from pipeline_fixtures import plan_lines, records, write_config


def edit_keeping_size_and_mtime(path: Path) -> None:
    """Change one digit of `path`, then put its mtime back: what `touch -r` or `cp -p` after an edit leaves.

    Repeated until the ctime moved: an edit in the same clock tick (milliseconds) as the file's last write
    leaves the ctime as it was, which no edit made by hand after a stage finished does."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    at = next(i for i, byte in enumerate(data) if chr(byte).isdigit())
    data[at] = ord("1" if data[at] != ord("1") else "2")
    for _ in range(100):
        path.write_bytes(bytes(data))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if path.stat().st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert path.stat().st_ctime_ns != before.st_ctime_ns


def touch(path: Path) -> None:
    """A later mtime, the same content."""
    mtime = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(mtime, mtime))


@pytest.fixture
def count_reads(monkeypatch):
    """How many files were read (hashed) since the fixture started."""
    reads = []
    real = digests_module.sha256_file
    monkeypatch.setattr(digests_module, "sha256_file", lambda path: reads.append(Path(path)) or real(path))
    return reads


@pytest.fixture
def csv_run(tmp_path):
    """(config, run folder, CSV input folder) after the data stage ran alone on the CSV input."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "items.csv").write_text("item,title\n" + "".join(f"{i},Song {i}\n" for i in range(1, 21)))
    rows = [f"{user},{(user * 7 + step * 3) % 20 + 1},{1000 + step}" for user in range(1, 31) for step in range(8)]
    (raw / "interactions.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    config = write_config(tmp_path, {"threads": 1, "data": {"format": "csv", "input": str(raw), "num_candidates": 8}})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--dry-run"]) == 0
    assert not run.exists()  # a dry run writes nothing, not even the digest cache
    assert main(["run", str(config), "--out", str(run), "--only", "data"]) == 0
    return config, run, raw


def test_a_touched_input_reruns_nothing_and_a_same_size_edit_with_its_mtime_restored_is_seen(csv_run, capsys):
    config, run, raw = csv_run
    for path in raw.iterdir():
        touch(path)
    assert plan_lines(capsys, config, run)["data"].startswith("skip unchanged")
    edit_keeping_size_and_mtime(raw / "interactions.csv")
    plan = plan_lines(capsys, config, run)
    assert plan["data"] == "run outside input 'input' changed" and plan["sr"] == "run input 'data' runs first"


def test_a_file_is_read_again_only_when_its_stat_moved(csv_run, count_reads, tmp_path, capsys):
    config, run, raw = csv_run
    plan_lines(capsys, config, run)
    assert count_reads == []  # the run recorded its input and its outputs: planning only stats them
    touch(raw / "items.csv")
    plan_lines(capsys, config, run)
    assert count_reads == [raw / "items.csv"]  # read once, found unchanged, and remembered (a dry run keeps it)
    plan_lines(capsys, config, run)
    assert count_reads == [raw / "items.csv"]

    cache, file = tmp_path / "cache.json", tmp_path / "weights.bin"
    file.write_bytes(b"0123456789")
    digests = FileDigests(cache)
    first = digests.sha256(file)
    assert digests.sha256(file) == first and len(count_reads) == 2
    digests.save()
    assert FileDigests(cache).sha256(file) == first and len(count_reads) == 2  # kept across runs
    edit_keeping_size_and_mtime(file)
    assert FileDigests(cache).sha256(file) != first and len(count_reads) == 3  # the ctime moved: read again
    cache.write_text("{not json")
    assert FileDigests(cache).sha256(file) != first and len(count_reads) == 4  # a damaged cache is only a miss
    assert FileDigests(cache).sha256(tmp_path / "gone.bin") is None


@pytest.mark.slow
def test_a_deleted_output_reruns_its_stage_and_everything_downstream(pipeline_copy, capsys):
    config, run = pipeline_copy
    before = records(run)
    deleted = run / "rank" / "soft-prompt-hf" / "rankings.jsonl"
    deleted.unlink()
    plan = plan_lines(capsys, config, run)
    assert plan["rank"] == f"run output {deleted} was deleted since it was written"
    assert plan["report"] == "run input 'rank' runs first"
    assert all(plan[s].startswith("skip unchanged") for s in STAGES if s not in ("rank", "report"))
    assert main(["run", str(config), "--out", str(run)]) == 0
    after = records(run)
    name = str(deleted.relative_to(run))
    assert after["rank"]["files"].keys() == before["rank"]["files"].keys()
    assert after["rank"]["files"][name] == before["rank"]["files"][name]  # written again, the same rankings
    assert all((after[s]["finished"] != before[s]["finished"]) == (s in ("rank", "report")) for s in STAGES)
    assert all(line.startswith("skip unchanged") for line in plan_lines(capsys, config, run).values())


@pytest.mark.slow
def test_an_edited_output_reruns_its_stage_and_everything_downstream(pipeline_copy, capsys):
    config, run = pipeline_copy
    edited = run / "teacher" / "llm" / "teacher.json"
    edit_keeping_size_and_mtime(edited)
    plan = plan_lines(capsys, config, run)
    assert plan["teacher"] == f"run output {edited} changed since it was written"
    assert [plan[s] for s in ("students", "latency", "report")] == [
        "run input 'teacher' runs first", "run input 'students' runs first", "run input 'latency' runs first"]
    assert all(plan[s].startswith("skip unchanged") for s in STAGES[: STAGES.index("teacher")])
    assert main(["run", str(config), "--out", str(run), "--only", "students"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and (f"cannot --only students: stage 'teacher' before it is not up to date "
                                           f"(output {edited} changed since it was written)") in err


def test_a_run_of_some_stages_names_only_a_report_that_exists_and_says_when_it_is_an_earlier_one(csv_run, capsys):
    config, run, _ = csv_run
    report = run / "report.md"
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run), "--only", "data"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("finished in") and "report" not in last and not report.exists()
    report.write_text("# the report of an earlier whole run\n")
    assert main(["run", str(config), "--out", str(run), "--only", "data"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith(f"; {report} is an earlier run's report, without what data produced now (a run without "
                         "--only updates it)"), last


def test_a_record_from_an_older_delrec_runs_again_and_an_unfinished_one_resumes(csv_run, capsys):
    config, run, _ = csv_run
    path = run / "data" / STAGE_FILE
    record = json.loads(path.read_text())
    old = {k: v for k, v in record.items() if k not in ("files", "outside")}  # what delrec wrote before
    path.write_text(json.dumps(old))
    plan = plan_lines(capsys, config, run)
    assert plan["data"] == "run recorded by an older delrec, which did not list the stage's output files"
    path.write_text(json.dumps({**old, "status": "interrupted", "finished": None}))
    assert plan_lines(capsys, config, run)["data"] == "resume interrupted earlier; resumes where it stopped"
    assert main(["run", str(config), "--out", str(run), "--only", "data"]) == 0
    assert json.loads(path.read_text())["files"] == record["files"]
    assert (run / DIGESTS_FILE).is_file()
