"""One writer per output: a second `delrec` writing the same --out is refused, a killed writer's lock and
leftovers are cleared by the next run, a full disk leaves nothing behind, and no file gets NaN as JSON."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from delrec.cli import main
from delrec.data.dataset import ITEMS_FILE, PreparedDataset
from delrec.errors import DelrecError
from delrec.io import atomic_write, output_lock, read_json, read_jsonl, staged_directory, write_json, write_jsonl

PREPARE = ["data", "prepare", "--format", "synthetic", "--synthetic_users", "40", "--synthetic_items", "60",
           "--num-candidates", "10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def python(code: str, *args, **kwargs) -> subprocess.Popen:
    """A Python process running `code` (which sees `sys.argv[1:] == args`)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, text=True, **kwargs)


def killed_inside(context: str, out: Path) -> None:
    """Run `with <context>(out, ...): SIGKILL` in another process: what a `kill -9` mid-write leaves behind."""
    process = python(f"import os, signal, sys\nfrom delrec.io import {context}\n"
                     f"with {context}(*sys.argv[1:]):\n    os.kill(os.getpid(), signal.SIGKILL)\n",
                     out, *(["delrec sr train"] if context == "output_lock" else []))
    assert process.wait(timeout=60) == -signal.SIGKILL


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# Each command that writes, and the output it holds: --out, the model folder `sr evaluate` writes into
# without --out, `sr compile`'s compiled/ folder, the run folder of `delrec run` and `delrec demo`.
WRITERS = [
    (["data", "prepare", "--format", "synthetic", "--out", "{o}"], "{o}"),
    (["data", "prepare", "--config", "{tmp}/prepare.yaml"], "{tmp}/from-yaml"),
    (["sr", "train", "--data", "d", "--model", "sasrec", "--out", "{o}"], "{o}"),
    (["sr", "evaluate", "--model", "{o}", "--data", "d"], "{o}"),
    (["sr", "evaluate", "--model", "m", "--data", "d", "--out", "{o}"], "{o}"),
    (["sr", "predict", "--model", "m", "--data", "d", "--split", "test", "--out", "{o}"], "{o}"),
    (["sr", "compile", "--model", "{o}"], "{o}/compiled"),
    (["llm", "import", "gemma-3-270m", "--out", "{o}"], "{o}"),
    (["llm", "build-tiny", "--data", "d", "--out", "{o}"], "{o}"),
    (["llm", "distill-pattern", "--data", "d", "--out", "{o}"], "{o}"),
    (["llm", "finetune", "--data", "d", "--out", "{o}"], "{o}"),
    (["rank", "--model", "m", "--data", "d", "--out", "{o}"], "{o}"),
    (["export", "--model", "m", "--out", "{o}"], "{o}"),
    (["teacher", "export", "--model", "m", "--data", "d", "--out", "{o}"], "{o}"),
    (["student", "train", "--data", "d", "--teachers", "t", "--out", "{o}"], "{o}"),
    (["run", "{tmp}/cfg.yaml", "--out", "{o}"], "{o}"),
    (["run", "{tmp}/cfg.yaml"], "runs/cfg"),
    (["demo", "--out", "{o}"], "{o}"),
    (["demo"], "runs/demo"),
]


@pytest.mark.parametrize("argv, held", WRITERS, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_a_second_writer_of_the_same_output_is_refused_naming_the_holder(argv, held, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prepare.yaml").write_text(f"format: synthetic\nout: {tmp_path / 'from-yaml'}\n")
    shutil.copy(Path(__file__).parents[1] / "delrec" / "configs" / "demo.yaml", tmp_path / "cfg.yaml")
    fill = {"o": tmp_path / "out", "tmp": tmp_path}
    with output_lock(held.format(**fill), "delrec sr train"):
        code, err = run([a.format(**fill) for a in argv], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "another delrec process (pid " + str(os.getpid()) + ", `delrec sr train`, started at " in err, err
    assert "is writing here; wait for it to finish or choose another --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "prepare.yaml"]  # nothing written, lock gone


def test_the_same_output_spelt_differently_is_the_same_lock(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with output_lock(tmp_path / "d", "delrec data prepare"):
        code, err = run([*PREPARE, "--out", "./sub/../d/"], capsys)
    assert code == 2 and "./sub/../d/: another delrec process" in err


def test_commands_that_write_nothing_and_help_run_beside_a_writer(tmp_path, capsys):
    data = tmp_path / "d"
    assert run([*PREPARE, "--out", data], capsys)[0] == 0
    with output_lock(data, "delrec data prepare"):
        assert run(["data", "stats", data], capsys)[0] == 0
        with pytest.raises(SystemExit) as done:
            main(["data", "prepare", "--out", str(data), "--help"])
        assert done.value.code == 0


def test_a_second_python_m_delrec_process_is_refused_then_runs_once_the_first_ends(tmp_path, capsys):
    out = tmp_path / "d"
    holder = python("import sys\nfrom delrec.io import output_lock\n"
                    "with output_lock(sys.argv[1], 'delrec data prepare'):\n    print('held', flush=True)\n"
                    "    sys.stdin.read()\n", out, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "delrec", *PREPARE, "--out", str(out)], capture_output=True,
                                text=True, env=ENV, timeout=120)
    finally:
        holder.communicate("", timeout=60)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"{out}: another delrec process (pid {holder.pid}, `delrec data prepare`" in second.stderr
    assert not out.exists() and hidden(tmp_path) == []
    code, err = run([*PREPARE, "--out", out], capsys)
    assert code == 0 and err == "" and PreparedDataset.load(out).num_items > 0 and hidden(tmp_path) == []


def test_the_lock_of_a_killed_writer_is_taken_over_in_one_line(tmp_path, capsys):
    out = tmp_path / "d"
    killed_inside("output_lock", out)
    left = json.loads((tmp_path / ".d.lock").read_text())
    code, err = run([*PREPARE, "--out", out], capsys)
    assert code == 0 and len(err.splitlines()) == 1, err
    assert f"{out}: taking over the lock of delrec process pid {left['pid']}, `delrec sr train`" in err
    assert hidden(tmp_path) == [] and PreparedDataset.load(out).num_items > 0


def test_a_killed_runs_staging_folder_is_removed_but_a_live_ones_is_not(tmp_path):
    out = tmp_path / "d"
    live = python("import sys\nfrom delrec.io import staged_directory\nwith staged_directory(sys.argv[1]) as tmp:\n"
                  "    print(tmp.name, flush=True)\n    sys.stdin.read()\n", out,
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        staging = live.stdout.readline().strip()  # another process building the same folder (a shared cache)
        killed_inside("staged_directory", out)
        (dead,) = set(hidden(tmp_path)) - {staging}
        assert dead.startswith(".d.") and dead.endswith(".tmp")
        with staged_directory(out) as tmp:
            assert hidden(tmp_path) == sorted([staging, tmp.name])
    finally:
        live.communicate("", timeout=60)
    assert hidden(tmp_path) == []


def test_an_output_a_kill_took_away_mid_swap_is_put_back_before_the_command_looks(tmp_path, capsys):
    """Killed between its two renames, a run leaves the old output under a hidden name and none under the real
    one: the next run puts it back first, so `--overwrite` is still needed to replace a different dataset."""
    out = tmp_path / "d"
    assert run([*PREPARE, "--out", out], capsys)[0] == 0
    before = PreparedDataset.load(out).fingerprint
    (tmp_path / "new").mkdir()
    killed = python("import os, signal, sys\nfrom pathlib import Path\nfrom delrec.io import replace_directory\n"
                    "os.replace = lambda a, b, replace=os.replace: (replace(a, b), os.kill(os.getpid(), 9))\n"
                    "replace_directory(Path(sys.argv[1]), Path(sys.argv[2]))\n", tmp_path / "new", out)
    assert killed.wait(timeout=60) == -signal.SIGKILL and not out.exists()
    code, err = run([*PREPARE, "--synthetic_users", "50", "--out", out], capsys)
    assert code == 2 and "already holds a different prepared dataset" in err, err
    assert PreparedDataset.load(out).fingerprint == before and sorted(hidden(tmp_path)) == []


@pytest.mark.parametrize("write", ["file", "folder"])
def test_a_full_disk_leaves_neither_a_temp_file_nor_a_half_folder(write, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # as a real file system does: the write fails when the data goes out
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(OSError) as caught:
        if write == "file":
            write_json(out, {"a": 1})
        else:
            with staged_directory(out) as tmp:
                write_jsonl(tmp / ITEMS_FILE, [{"id": 0}])
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(out if write == "file" else out / ITEMS_FILE)  # the output's name
    assert list(tmp_path.iterdir()) == []  # nor the parent folders it made


def test_a_full_disk_through_the_cli_is_one_line_naming_the_output_file(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, err = run([*PREPARE, "--out", tmp_path / "d"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'd' / ITEMS_FILE}: No space left on device; no space left on the device" in err
    assert list(tmp_path.iterdir()) == []


def test_write_json_refuses_nan_naming_the_field_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"valid": {"hr@10": 0.5}})
    with pytest.raises(DelrecError) as caught:
        write_json(path, {"valid": {"hr@10": math.nan}, "test": {}})
    message = str(caught.value)
    assert f"{path} field 'valid.hr@10': nan is not a finite number, which JSON cannot hold" in message
    assert json.loads(path.read_text()) == {"valid": {"hr@10": 0.5}} and hidden(tmp_path) == []


def test_write_jsonl_refuses_infinity_naming_the_line_and_the_field(tmp_path):
    path = tmp_path / "log.jsonl"
    with pytest.raises(DelrecError) as caught:
        write_jsonl(path, [{"loss": 1.0}, {"loss": 0.5, "grads": [1.0, -math.inf]}])
    assert f"{path}:2 field 'grads[1]': -inf is not a finite number" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_of_a_killed_run_leaves_a_temp_file_the_next_write_removes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    killed_inside("atomic_write", path)
    assert len(hidden(tmp_path)) == 1
    with atomic_write(path) as handle:
        handle.write("x")
    assert hidden(tmp_path) == [] and path.read_text() == "x"


@pytest.mark.parametrize("text, expected", [
    ('{"hr@10": NaN}', "invalid JSON (NaN is not a JSON number"),
    ('{"k": -Infinity}', "invalid JSON (-Infinity is not a JSON number"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON (arrays or objects nested too deeply)"),
    ('{"k": ' + "9" * 5000 + "}", "invalid JSON (Exceeds the limit"),
])
def test_json_readers_refuse_what_python_would_accept_or_crash_on_in_one_located_line(text, expected, tmp_path):
    """Python's json reads NaN (no other reader does) and fails with RecursionError or a bare ValueError on deep
    nesting and 5,000-digit numbers: each is a located one-line error in read_json and read_jsonl alike."""
    whole, lines = tmp_path / "a.json", tmp_path / "b.jsonl"
    whole.write_text(text)
    lines.write_text('{"ok": 1}\n' + text + "\n")
    for read, path, location in ((read_json, whole, f"{whole}: "), (lambda p: list(read_jsonl(p)), lines,
                                                                       f"{lines}:2: ")):
        with pytest.raises(DelrecError) as caught:
            read(path)
        assert str(caught.value).startswith(location + expected) and len(str(caught.value)) < 300


def test_written_outputs_get_the_umasks_mode_not_the_temp_files_private_one(tmp_path):
    """mkstemp/mkdtemp make 0600 files and 0700 folders; an output must be readable as a plain open() makes it."""
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_write(tmp_path / "f.json") as handle:
        handle.write("{}")
    with staged_directory(tmp_path / "folder") as staged:
        (staged / "x").write_text("x")
        os.replace(staged, tmp_path / "folder")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_worker_ranks_of_a_distributed_launch_write_under_rank_0s_lock(tmp_path, monkeypatch):
    """`accelerate launch` runs the same command once per process, all writing one --out: only rank 0 locks it
    (tests/test_hybrid.py's DDP case runs it for real)."""
    from delrec.cli import output_of

    argv = ["--data", "d", "--out", str(tmp_path / "out")]
    key = ("llm", "finetune")
    assert output_of(key, argv, "delrec llm finetune", "") == str(tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert output_of(key, argv, "delrec llm finetune", "") == str(tmp_path / "out")
    monkeypatch.setenv("RANK", "1")
    assert output_of(key, argv, "delrec llm finetune", "") is None


def test_a_refusal_inside_a_staging_folder_names_the_output_not_the_staging_folder(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(DelrecError) as caught, staged_directory(out) as staged:
        write_json(staged / "build_info.json", {"final_loss": math.nan})
    assert str(caught.value).startswith(f"{out / 'build_info.json'} field 'final_loss': nan is not a finite number")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_refuses_the_temp_file_is_reported_as_refusing_the_output(tmp_path, monkeypatch):
    """mkstemp's EPERM (a read-only or immutable folder) names the temp file it tried; the user knows only --out."""
    import tempfile

    def refused(dir, prefix, suffix):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(Path(dir) / f"{prefix}x1y2{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(PermissionError) as caught, atomic_write(tmp_path / "p.jsonl") as handle:
        handle.write("x")
    assert caught.value.filename == str(tmp_path / "p.jsonl")
    with pytest.raises(PermissionError) as caught, staged_directory(tmp_path / "model"):
        pass
    assert caught.value.filename == str(tmp_path / "model") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", [".", "", "..", "sub/.."])
def test_an_out_that_names_no_output_of_its_own_is_refused_before_anything_runs(out, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run([*PREPARE, "--out", out], capsys)
    assert code == 2 and err == (f"delrec data prepare: error: --out {out!r} names no output of its own (it is the "
                                 "current folder, its parent, or nothing); name a new file or folder, e.g. --out "
                                 "runs/NAME")
    assert list(tmp_path.iterdir()) == []
