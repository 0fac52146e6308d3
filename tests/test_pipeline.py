"""`delrec run` / `delrec demo`: one config drives every stage; unchanged stages are skipped, a changed one re-runs
with everything downstream, an interrupted one resumes; the report is written; bad configs exit 2 in one line.

One small end-to-end run on synthetic data (module fixture) is shared; tests that change a run work on a copy.
"""

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest

from delrec.cli import main
from delrec.pipeline import STAGE_FILE, STAGES, builtin_demo_config, load_config, plan
from delrec.errors import DelrecError
from delrec.pipeline.options import DataOptions, LLMOptions
from delrec.pipeline.plan import _digest, _outside_inputs, fingerprint_path
from pipeline_fixtures import CONFIG, plan_lines, records, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_full_run_writes_every_stage_the_report_and_plots(pipeline_run):
    _, run = pipeline_run
    for stage, record in records(run).items():
        assert record["status"] == "finished" and record["hash"] and record["seconds"] >= 0, stage
        assert set(record) >= {"hash", "inputs", "config", "started", "finished", "seconds", "status"}
    assert set(records(run)["stage2"]["inputs"]) == {"data", "llm", "stage1"}
    summary = json.loads((run / "run.json").read_text())
    assert summary["status"] == "finished" and list(summary["stages"]) == list(STAGES)
    for folder in ("sr/pop", "sr/sasrec", "stage1/soft-prompt", "stage2/soft-prompt", "stage2/no-soft-prompt",
                   "rank/soft-prompt-hf", "rank/no-soft-prompt-hf", "students/alone", "students/distilled"):
        assert (run / folder / "metrics.json").is_file(), folder
    for split in ("train", "valid", "test"):
        rows = (run / "predictions" / f"{split}.jsonl").read_text().splitlines()
        assert "prefix_items" in json.loads(rows[0])
    assert all((run / "teacher" / name / "teacher.json").is_file() for name in ("llm", "sasrec"))
    latency = json.loads((run / "latency" / "latency.json").read_text())
    assert latency["student"]["users"] == 10 and latency["llm"]["teacher"] == "llm" and latency["ratio"] > 0

    report = (run / "report.md").read_text()
    table = (run / "report" / "table.md").read_text()
    first = report.split("\n\n")[2].splitlines()  # after the title and the sentence that introduces them
    assert [line.split(":")[0] for line in first] == ["- SR -> soft prompt (stage 1)", "- Soft prompt -> LLM (stage 2)",
                                                      "- LLM -> student"], first
    assert "student SASRec + DLLM2Rec (teacher: llm)" in first[2] and "distillation weight kept on valid" in first[2]
    assert table in report
    for label in ("Popularity", "SASRec", "LLM + distilled soft prompt (DELRec)", "LLM, no soft prompt",
                  "student SASRec alone", "student SASRec + DLLM2Rec (teacher: llm)", "random (chance level)"):
        assert f"| {label}" in table, label
    assert "HR@10" in table and "NDCG@5" in table and "top-10 ms/user" in table
    assert "## Timings per stage" in report and "| stage2 " in report and "synthetic_users: 60" in report
    assert "chance" in report and "Latency: the student ranks" in report
    search = json.loads((run / "students" / "distilled" / "metrics.json").read_text())["distillation"]["weight_search"]
    tried = ", ".join(f"x{r['scale']:g} ({r['valid']:.4f})" for r in search["runs"])
    assert f"distillation weight x{search['chosen']:g} kept, of {tried} by valid ndcg@10: {search['why']}" in report
    assert "the rank stage scores its test users" in report and "test HR@1 1.000 on 1 users" not in report
    for name in ("llm", "sasrec"):  # both teachers' embeddings get the item-kNN check, and the report says it
        knn = json.loads((run / "teacher" / name / "teacher.json").read_text())["source"]["embedding_knn"]
        assert (f"among the 20 items nearest to the last history item for {knn['hit_rate']:.1%} of {knn['users']} "
                f"users (chance {knn['chance']:.1%})") in report
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert pngs == ["candidate_metrics.png", "full_ranking.png", "latency.png", "sr_training.png",
                    "stage1_training.png", "stage2_training.png", "students_training.png"]
    for png in pngs:
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](report/{png})" in report


@pytest.mark.slow
def test_a_second_run_skips_every_stage(pipeline_run, capsys):
    config, run = pipeline_run
    before = records(run)
    plan = plan_lines(capsys, config, run)
    assert list(plan) == list(STAGES) and all(line.startswith("skip unchanged") for line in plan.values())
    assert main(["run", str(config), "--out", str(run)]) == 0
    assert records(run) == before


@pytest.mark.slow
def test_a_changed_stage_reruns_with_everything_downstream_only(pipeline_copy, tmp_path, capsys):
    config, run = pipeline_copy
    changed = json.loads(json.dumps(CONFIG))
    changed["students"]["epochs"] = 3
    config = write_config(tmp_path, changed, "changed.yaml")
    plan = plan_lines(capsys, config, run)
    upstream = STAGES[: STAGES.index("students")]
    assert all(plan[s].startswith("skip") for s in upstream)
    assert plan["students"] == "run config changed (students.epochs: 2 -> 3)"
    assert plan["latency"] == "run input 'students' runs first" and plan["report"].startswith("run input")
    before = records(run)
    assert main(["run", str(config), "--out", str(run)]) == 0
    after = records(run)
    assert all(after[s] == before[s] for s in upstream)
    assert all(after[s]["finished"] != before[s]["finished"] for s in ("students", "latency", "report"))
    assert json.loads((run / "students" / "alone" / "metrics.json").read_text())["epochs_run"] == 3


@pytest.mark.slow
def test_only_and_from_force_their_stages(pipeline_copy, capsys):
    config, run = pipeline_copy
    before = records(run)
    plan = plan_lines(capsys, config, run, "--only", "report")
    assert plan["report"] == "run forced by --only report"
    assert all(plan[s].startswith("skip unchanged") for s in STAGES[:-1])
    assert main(["run", str(config), "--out", str(run), "--only", "report"]) == 0
    after = records(run)
    assert after["report"]["finished"] != before["report"]["finished"]
    assert all(after[s] == before[s] for s in STAGES[:-1])

    plan = plan_lines(capsys, config, run, "--from", "latency")
    assert plan["latency"] == "run forced by --from latency" and plan["report"] == "run input 'latency' runs first"
    assert plan["students"].startswith("skip unchanged")
    assert main(["run", str(config), "--out", str(run), "--only", "latency"]) == 0
    plan = plan_lines(capsys, config, run)  # --only left the report stale: a plain run re-runs it alone
    assert plan["report"] == "run input 'latency' changed" and plan["latency"].startswith("skip")


@pytest.mark.slow
def test_only_refuses_a_stage_whose_inputs_are_not_up_to_date(pipeline_copy, tmp_path, capsys):
    config, run = pipeline_copy
    changed = json.loads(json.dumps(CONFIG))
    changed["teacher"]["sasrec"]["topk"] = 12
    config = write_config(tmp_path, changed, "changed.yaml")
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run), "--only", "students"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot --only students: stage 'teacher' before it is not up to date" in err


@pytest.mark.slow
def test_an_interrupted_stage_resumes_and_keeps_its_finished_parts(pipeline_copy, capsys):
    config, run = pipeline_copy
    stage = run / "students" / STAGE_FILE
    record = json.loads(stage.read_text())
    expected = json.loads((run / "students" / "distilled" / "metrics.json").read_text())
    kept = (run / "students" / "alone" / "metrics.json").stat().st_mtime_ns
    # as if killed while training the second student: status still running, its metrics not yet written
    stage.write_text(json.dumps({**record, "status": "running", "finished": None}))
    (run / "students" / "distilled" / "metrics.json").unlink()
    plan = plan_lines(capsys, config, run)
    assert plan["students"] == "resume running earlier; resumes where it stopped"
    assert main(["run", str(config), "--out", str(run)]) == 0
    assert (run / "students" / "alone" / "metrics.json").stat().st_mtime_ns == kept  # not redone
    resumed = json.loads((run / "students" / "distilled" / "metrics.json").read_text())
    assert resumed["test"] == expected["test"] and resumed["epochs_run"] == expected["epochs_run"]


def test_stage2_item_tokens_name_the_runs_sr_model_or_fingerprint_an_outside_folder(pipeline_copy, tmp_path, capsys):
    config, run = pipeline_copy
    hybrid = json.loads(json.dumps(CONFIG))
    hybrid["stage2"]["item_tokens"] = "sr/sasrec"
    path = write_config(tmp_path, hybrid, "hybrid.yaml")
    assert _outside_inputs(load_config(path), "stage2") == {}  # stage sr's own: stage 2 reads it through stage 1
    assert main(["run", str(path), "--out", str(run), "--only", "stage2"]) == 0
    for variant in ("soft-prompt", "no-soft-prompt"):
        recorded = json.loads((run / "stage2" / variant / "delrec.json").read_text())["item_tokens"]
        assert Path(recorded["sr_model"]).resolve() == (run / "sr" / "sasrec").resolve()

    outside = shutil.copytree(run / "sr" / "sasrec", tmp_path / "outside-sasrec")
    hybrid["stage2"]["item_tokens"] = str(outside)
    config = load_config(write_config(tmp_path, hybrid, "outside.yaml"))
    before = _outside_inputs(config, "stage2")
    (outside / "metrics.json").write_text("{}")  # a retrained outside SR model changes stage 2's hash
    assert before["item_tokens"] != _outside_inputs(config, "stage2")["item_tokens"]


@pytest.mark.parametrize("change, message", [
    ({"stage1": {"lerning_rate": 0.1}}, "section 'stage1': unknown key 'lerning_rate'; did you mean 'learning_rate'?"),
    ({"stag1": {}}, "unknown key 'stag1'; did you mean 'stage1'?"),
    ({"sr": {"sasrec": {"model": "sasrec", "num_kernels": 4}}}, "section 'sr.sasrec': unknown key 'num_kernels'"),
    ({"stage2": {"learning_rate": "fast"}}, "section 'stage2': key 'learning_rate' expects float or none, got 'fast'"),
    ({"stage1": {"out": "elsewhere"}}, "section 'stage1': key 'out' is set by the pipeline"),
    ({"teacher": {"llm": {"model": "sr/nope"}}}, "section 'teacher.llm': key 'model' is 'sr/nope'; expected one of: "
                                                 "sr/pop, sr/sasrec, stage2/stage1"),
    ({"students": {"runs": {"x": {"method": "dllm2rec", "teacher": ["ghost"]}}}},
     "section 'students.runs.x': teacher 'ghost' is not an entry of section 'teacher'"),
    ({"predictions": {"model": "pop"}}, "section 'predictions': model 'pop' is not a trainable model"),
    ({"stage2": {"variants": ["stage1", "bogus"]}}, "variants must list distinct values among stage1, none, random"),
    ({"stage2": {"item_tokens": "sr/pop"}}, "section 'stage2': key 'item_tokens' is 'sr/pop', but item tokens need a "
                                            "trained SR model's item embeddings; expected one of: sr/sasrec"),
])
def test_bad_config_exits_2_with_one_line_naming_file_and_key(tmp_path, capsys, change, message):
    config = write_config(tmp_path, {"data": {"format": "synthetic"}, **change})
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(config) in err and message in err
    assert not (tmp_path / "run").exists()


def test_bad_command_line_exits_2(tmp_path, capsys):
    config = write_config(tmp_path, {})
    for argv, message in ((["--only", "stage9"], "--only stage9: unknown stage"),
                          (["--only", "sr", "--from", "llm"], "give --only or --from, not both")):
        capsys.readouterr()
        assert main(["run", str(config), "--out", str(tmp_path / "run"), "--dry-run", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_the_builtin_demo_config_plans_every_stage(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"-> {tmp_path / 'demo'}") and [line.split()[0] for line in out[1:]] == list(STAGES)
    assert out[1].split()[1:] == ["run", "not", "run", "yet"]


@pytest.mark.slow
def test_the_llms_loading_options_rerun_stages_1_and_2_not_the_llm_build(pipeline_run, tmp_path, capsys):
    """`llm.dtype` acts where the LLM is loaded (stages 1 and 2), not in the build: changing it re-runs from stage 1."""
    _, run = pipeline_run
    changed = json.loads(json.dumps(CONFIG))
    changed["llm"]["dtype"] = "bfloat16"
    plan = plan_lines(capsys, write_config(tmp_path, changed, "changed.yaml"), run)
    assert all(plan[s].startswith("skip unchanged") for s in STAGES[: STAGES.index("stage1")]), plan
    assert plan["stage1"] == "run config changed (stage1.model.dtype: 'float32' -> 'bfloat16')", plan
    assert plan["stage2"].startswith("run") and plan["report"].startswith("run input"), plan


@pytest.mark.parametrize("llm, shipped", [("tiny", "demo.yaml"), ("gemma-3-270m", "demo-gemma.yaml")])
def test_configs_pipeline_demo_yamls_are_the_packaged_demo_configs(llm, shipped):
    shipped = ROOT / "configs" / "pipeline" / shipped
    assert shipped.is_symlink()
    with resources.as_file(builtin_demo_config(llm)) as packaged:
        assert shipped.resolve() == packaged.resolve()


def test_the_real_llm_demo_imports_gemma_and_plans_every_stage(tmp_path, capsys):
    with resources.as_file(builtin_demo_config("gemma-3-270m")) as path:
        config = load_config(path)
    assert config.sections["llm"].get(LLMOptions).model == "gemma-3-270m"
    assert config.stage_config("stage2")["FinetuneArguments"]["objective"] == "listwise"
    assert main(["demo", "--llm", "gemma-3-270m", "--out", str(tmp_path / "demo"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"-> {tmp_path / 'demo'}") and [line.split()[0] for line in out[1:]] == list(STAGES)


def test_a_demo_for_an_unknown_llm_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--llm", "llama-70b", "--dry-run"])
    assert "choose from 'tiny', 'gemma-3-270m'" in capsys.readouterr().err
    with pytest.raises(DelrecError, match="expected one of: tiny, gemma-3-270m"):
        builtin_demo_config("llama-70b")


@pytest.mark.parametrize("name", ["lastfm.yaml", "games.yaml", "lastfm-gemma.yaml"])
def test_the_example_configs_parse_and_plan_every_stage(name, tmp_path):
    config = load_config(ROOT / "configs" / "pipeline" / name)
    assert config.sections["data"].get(DataOptions).input.startswith("../shared/data/")
    steps = plan(config, tmp_path / "run")
    assert [s.stage for s in steps] == list(STAGES) and all(s.action == "run" for s in steps)
    assert steps[0].reason == "not run yet" and steps[0].hash


def test_hashes_are_unchanged_so_existing_run_folders_are_reused(tmp_path):
    """Golden values: a change here re-runs every stage of every existing run folder."""
    assert _digest({"stage": "sr", "config": {"b": [1, "x", None], "a": Path("p/q"), "f": 0.5},
                    "inputs": {"data": "abc@2024"}}) == "f1a399daad1f1df7"
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.txt").write_text("abc")
    (raw / "sub" / "b.txt").write_text("hello")
    assert fingerprint_path(raw) == "fa0bac9b99e0c0ac"  # content only: no mtime to pin
    assert fingerprint_path(raw / "a.txt") == "a88a5e707d95128a"
    assert fingerprint_path(raw / "none") == f"missing:{raw / 'none'}"


def test_a_failing_stage_exits_2_in_one_line_and_records_the_failure(tmp_path, capsys):
    config = write_config(tmp_path, {"data": {"format": "rows", "input": str(tmp_path / "no-such-data")}})
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage 'data' failed:" in err and "no-such-data" in err
    record = json.loads((run / "data" / STAGE_FILE).read_text())
    assert record["status"] == "failed" and "no-such-data" in record["error"]
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
