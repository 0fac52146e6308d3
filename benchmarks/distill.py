"""Forward distillation benchmark (issue #7, item 5): a small SASRec student alone vs + RD, + RRD, + DLLM2Rec.

    .venv/bin/python benchmarks/distill.py --threads 1
    .venv/bin/python benchmarks/distill.py --datasets lastfm --student-epochs 3 --no-latency   # a quick look

Per dataset (`--datasets`, default lastfm then games), in one process, one after the other:

1. Prepares the data unless present: games = ../shared/data/games (RecBole files) into
   benchmarks/out/games (the folder benchmarks/sr_train.py uses), lastfm = ../shared/data/lastfm
   (LLaRA rows) into benchmarks/out/distill/lastfm/data; default `PreprocessConfig`.
2. Trains the TEACHER: a larger SASRec (hidden 64, 2 blocks, full-softmax CE) for
   `--teacher-epochs` (default per dataset, see BUDGET), best epoch on valid NDCG@10, and exports it as a teacher folder
   (`export_teacher`, mode sr: top-K over all items with history items excluded + its item
   embeddings) for every training instance.
3. Trains the STUDENT, a small SASRec (hidden 32, 1 block), with the same seed, data order and
   epochs in every variant: alone (`--method none`), + RD, + RRD, + DLLM2Rec (ranking and
   collaborative embedding distillation: the full method), and on lastfm also + DLLM2Rec's
   ranking distillation alone (an ablation; `--variants` picks them for every dataset). The student's own loss is BCE with one sampled negative, as in DLLM2Rec's code
   (`--student-loss ce` for full-softmax CE). Every loss uses its config's defaults (nothing is
   tuned, on test or otherwise). The best epoch of each run is picked on VALIDATION NDCG@10 by
   the trainer; test is scored once, on it. Reported: full-ranking HR@20 / NDCG@20 (history items
   excluded) on test, and the relative NDCG@20 gain over the student alone (goal: >= +20%).

Latency (`--latency-dataset`, games by default): the top-20 over all items (history excluded) for
the first 1,000 test users, on this machine, with `--threads` torch threads:
- student: the trained DLLM2Rec student folder reloaded (`load_model`), scored in batches of
  1,000 (`sr.evaluate.top_k`), best of 3 timed runs after a warm-up;
- LLM teacher: the tiny local LLM (`delrec llm build-tiny`, random weights, hidden 128, 2 layers;
  built once into benchmarks/out/distill/<dataset>/tiny-llm) with the HF backend and BIGRec
  grounding as the teacher export runs it (`delrec.distill.teacher_export`): greedy generation from the
  `teacher` prompt, the generated text's last-layer last-token hidden state, L2 distance to every
  item title's embedding, top-20. The title embeddings are computed once beforehand (timed apart:
  a server would precompute them). A random model never emits EOS, so every generation runs the
  whole budget (the longest title + 8 tokens), as a real model writing the longest title would.
Ratio = LLM seconds / student seconds for the same users. The goal (>= 10^4) refers to a real LLM
(DLLM2Rec: LLaMA-7B, thousands of times the tiny LLM's parameters), so a real teacher would give a
far larger ratio than the one measured here.

Writes benchmarks/results/distill.json and only the block between `<!-- distill -->` and
`<!-- /distill -->` of benchmarks/RESULTS.md (re-read right before writing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# benchmarks/ is on sys.path when a benchmark runs as a script
from common import (BUDGET, DATASETS, ROOT, STUDENT, TEACHER, ensure_data, log, machine, markdown_table, rel,
                    run_summary, text_table, train_config)
from results_section import write_section
from delrec.io import write_json

WORK = ROOT / "benchmarks" / "out" / "distill"
MARK_BEGIN, MARK_END = "<!-- distill -->", "<!-- /distill -->"

TOPK = 10  # the teacher's list; every loss distils K = 10 (DLLM2Rec's default)
# variant -> (method, embedding distillation, label)
VARIANTS = {
    "none": ("none", False, "student alone"),
    "rd": ("rd", False, "+ RD"),
    "rrd": ("rrd", False, "+ RRD"),
    "dllm2rec": ("dllm2rec", False, "+ DLLM2Rec ranking distillation"),
    "dllm2rec+ed": ("dllm2rec", True, "+ DLLM2Rec ranking + embedding distillation"),
}
assert BUDGET["lastfm"]["variants"] == list(VARIANTS)  # common.BUDGET: Last.fm runs every variant
LATENCY_USERS = 1000
LATENCY_K = 20


def run_dataset(name: str, args) -> dict:
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
    from delrec.distill.student import train_student
    from delrec.sr import SASRecConfig, train_sr

    dataset, how = ensure_data(name)
    work = WORK / name
    budget = {k: getattr(args, k) or v for k, v in BUDGET[name].items()}
    stats = dataset.stats()
    record = {"data": {"path": rel(dataset.path), "how": how, "fingerprint": dataset.fingerprint,
                       "protocol": dataset.meta.get("protocol"), "users": stats.get("users"),
                       "items": dataset.num_items, "train_instances": len(dataset.instances("train")),
                       "test_instances": len(dataset.instances("test"))},
              "budget": budget, "runs": {}}

    started = time.perf_counter()
    log(f"{name}: teacher SASRec {TEACHER['hidden_size']}x{TEACHER['num_layers']} (CE), {budget['teacher_epochs']} epochs")
    shutil.rmtree(work / "teacher-sasrec", ignore_errors=True)
    teacher = train_sr(dataset, SASRecConfig(**TEACHER), train_config(args, budget["teacher_epochs"], budget["batch"], "ce"),
                       work / "teacher-sasrec")
    record["runs"]["teacher"] = {"label": "teacher: SASRec 64x2, CE", **run_summary(teacher, started)}
    began = time.perf_counter()
    folder = export_teacher(TeacherExportConfig(model=str(work / "teacher-sasrec"), data=str(dataset.path),
                                                out=str(work / "teacher"), topk=TOPK, mode="sr", progress=False))
    info = json.loads((folder / "teacher.json").read_text())
    record["teacher_export"] = {"seconds": round(time.perf_counter() - began, 1), "topk": TOPK,
                                "target_in_topk": info["source"].get("target_in_topk")}
    log(f"  teacher test NDCG@20 {record['runs']['teacher']['test']['ndcg@20']:.4f}; exported top-{TOPK} "
        f"(target in it for {info['source'].get('target_in_topk'):.1%} of training instances)")

    for variant in budget["variants"]:
        method, embedding, label = VARIANTS[variant]
        out = work / f"student-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        log(f"{name}: student {label}, {budget['student_epochs']} epochs")
        started = time.perf_counter()
        result = train_student(dataset, SASRecConfig(**STUDENT), train_config(args, budget["student_epochs"], budget["batch"], args.student_loss),
                               [] if method == "none" else [folder], method, None, out, embedding_distillation=embedding)
        record["runs"][variant] = {"label": label, "method": method, "embedding_distillation": embedding,
                                   "method_config": result.metrics["distillation"]["method_config"],
                                   **run_summary(result, started)}
        log(f"  test HR@20 {result.metrics['test']['hr@20']:.4f}, NDCG@20 {result.metrics['test']['ndcg@20']:.4f} "
            f"(best epoch {result.best_epoch}, {result.seconds_per_epoch:.1f} s/epoch)")
    alone = record["runs"].get("none")
    if alone:
        for variant, run in record["runs"].items():
            if variant not in ("none", "teacher"):
                run["gain_test_ndcg@20"] = round(run["test"]["ndcg@20"] / alone["test"]["ndcg@20"] - 1, 4)
                run["gain_test_hr@20"] = round(run["test"]["hr@20"] / alone["test"]["hr@20"] - 1, 4)
    return record


# ----------------------------------------------------------------------------- latency


def student_latency(student_dir: Path, instances, repeats: int = 3) -> dict:
    from delrec.sr.evaluate import top_k
    from delrec.sr import load_model

    model = load_model(student_dir)
    histories = [inst.history for inst in instances]
    top_k(model, histories, LATENCY_K, True, len(histories), False)  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        top_k(model, histories, LATENCY_K, True, len(histories), False)
        times.append(time.perf_counter() - began)
    return {"model": rel(student_dir), "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(min(times), 5), "seconds_all": [round(t, 5) for t in times], "batch_size": len(histories)}


def llm_latency(dataset, instances, work: Path, args) -> dict:
    from delrec.cli import main as delrec
    from delrec.distill.teacher_export import GROUNDING_TASK, TeacherExportConfig
    from delrec.ranking.teacher_signals import embed_texts, ground
    from delrec.ranking.base import backend_module
    from delrec.ranking.models import describe_model, ranking_template

    llm = work / "tiny-llm"
    if not (llm / "config.json").is_file():
        log(f"building the tiny LLM into {rel(llm)} (random weights)")
        code = delrec(["llm", "build-tiny", "--data", str(dataset.path), "--out", str(llm), "--overwrite",
                       "--threads", str(args.threads)])
        if code:
            raise SystemExit(f"delrec llm build-tiny failed with exit code {code}")
    spec = describe_model(str(llm), GROUNDING_TASK)
    template = ranking_template(spec)
    module = backend_module("hf")
    config = TeacherExportConfig(model=str(llm), data=str(dataset.path), out=str(work / "unused"), topk=LATENCY_K,
                                 mode="grounding", progress=False)
    with module.open_backend(spec, module.Options(device="cpu", batch_size=args.llm_batch)) as backend:
        parameters = sum(p.numel() for p in backend.model.parameters())
        dtype = str(next(backend.model.parameters()).dtype)
        began = time.perf_counter()
        titles = embed_texts(backend.model, backend.tokenizer, dataset.titles, backend.batch_size)
        title_seconds = time.perf_counter() - began
        log(f"  LLM: {len(dataset.titles)} title embeddings in {title_seconds:.1f} s; grounding "
            f"{len(instances)} users ...")
        began = time.perf_counter()
        items, _, counts = ground(config, dataset, instances, spec, template, backend, titles)
        seconds = time.perf_counter() - began
    return {"model": rel(llm), "parameters": parameters, "architecture": "tiny Llama (hidden 128, 2 layers), random",
            "backend": "hf", "batch_size": args.llm_batch, "dtype": dtype,
            "seconds": round(seconds, 3), "title_embedding_seconds": round(title_seconds, 3),
            "max_new_tokens": counts["max_new_tokens"], "truncated_prompts": counts["truncated_prompts"],
            "rows": int(items.shape[0])}


def run_latency(name: str, args) -> dict:
    dataset, _ = ensure_data(name)
    work = WORK / name
    student = work / "student-dllm2rec+ed"
    if not (student / "config.json").is_file():
        student = next((work / f"student-{v}" for v in ("dllm2rec", "none", "rd", "rrd")
                        if (work / f"student-{v}" / "config.json").is_file()), None)
    if student is None:
        raise SystemExit(f"latency: no trained student under {rel(work)}; run the {name} students first")
    instances = dataset.instances("test")[: args.latency_users]
    log(f"latency on {name}: top-{LATENCY_K} for {len(instances)} test users")
    small = student_latency(student, instances)
    log(f"  student: {small['seconds']:.4f} s")
    large = llm_latency(dataset, instances, work, args)
    log(f"  LLM teacher: {large['seconds']:.1f} s")
    return {"dataset": name, "users": len(instances), "topk": LATENCY_K, "threads": args.threads, "student": small,
            "llm_teacher": large, "ratio": round(large["seconds"] / small["seconds"], 1)}


# ----------------------------------------------------------------------------- report


def fmt(value, digits=4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def pct(value) -> str:
    return "–" if value is None else f"{value:+.1%}"


def table_rows(record: dict) -> list[list[str]]:
    rows = [["model", "test HR@20", "test NDCG@20", "NDCG@20 gain", "valid NDCG@10", "best epoch", "s/epoch"]]
    for variant, run in record["runs"].items():
        rows.append([run["label"], fmt(run["test"]["hr@20"]), fmt(run["test"]["ndcg@20"]),
                     pct(run.get("gain_test_ndcg@20")), fmt(run["valid"]["ndcg@10"]),
                     f"{run['best_epoch']}/{run['epochs_run']}", f"{run['seconds_per_epoch']:.1f}"])
    return rows


def best_gain(record: dict) -> tuple[str | None, float | None]:
    gains = {v: r["gain_test_ndcg@20"] for v, r in record["runs"].items() if "gain_test_ndcg@20" in r}
    if not gains:
        return None, None
    variant = max(gains, key=gains.get)
    return variant, gains[variant]


def markdown_section(report: dict) -> str:
    m = report["machine"]
    lines = [
        MARK_BEGIN,
        "## Forward distillation: SASRec student alone vs + RD, + RRD, + DLLM2Rec (issue #7, item 5)",
        "",
        f"Command (from the repository root): `{report['command']}`  ",
        f"Date: {report['finished']} (UTC); total wall time {report['wall_minutes']:.1f} min.  ",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}; torch {m['torch']}; {report['settings']['threads']} torch "
        f"thread(s); shared with other jobs (load average {report['loadavg']}).  ",
        f"Teacher: SASRec hidden {TEACHER['hidden_size']}, {TEACHER['num_layers']} blocks, full-softmax CE; exported "
        f"top-{TOPK} over all items (history excluded) + item embeddings. Student: SASRec hidden "
        f"{STUDENT['hidden_size']}, {STUDENT['num_layers']} block, own loss {report['settings']['student_loss']}"
        f"{' with 1 sampled negative (as DLLM2Rec code)' if report['settings']['student_loss'] == 'bce' else ''}; "
        f"lr {report['settings']['lr']}, seed "
        f"{report['settings']['seed']}. Losses at their config defaults (DLLM2Rec: K=10, beta 1, gammas "
        "0.3/0.5/0.1, lambda_d 0.8, code confidence; RD: weight 0.8, beta 1; RRD: 50 uninteresting items, "
        "weight 0.1; embedding distillation alpha 0.2). Best epoch on VALID NDCG@10; test scored once; "
        "full ranking over all items, history items excluded.",
        "",
    ]
    for name, record in report["datasets"].items():
        d = record["data"]
        lines += [f"**{name}** ({d['items']} items, {d['train_instances']} training instances, {d['test_instances']} "
                  f"test users; batches of {record['budget']['batch']} sequences; teacher "
                  f"{record['budget']['teacher_epochs']} epochs, students {record['budget']['student_epochs']} epochs "
                  f"each; the teacher's top-{TOPK} holds the training "
                  f"target for {record['teacher_export']['target_in_topk']:.1%} of instances):", "",
                  markdown_table(table_rows(record)), ""]
        if d["test_instances"] < 1000:
            lines += [f"Only {d['test_instances']} test users: one more hit moves HR@20 by {1 / d['test_instances']:.3f}, "
                      "so HR@20 differences of a few hundredths, and NDCG@20 gains of a few tens of percent, are within "
                      "the noise here.", ""]
    lat = report.get("latency")
    if lat:
        s, t = lat["student"], lat["llm_teacher"]
        lines += [
            f"Latency, top-{lat['topk']} over all {report['datasets'].get(lat['dataset'], {}).get('data', {}).get('items', '')} "
            f"{lat['dataset']} items for {lat['users']} test users, {lat['threads']} thread(s), same machine:",
            "",
            "| model | parameters | seconds | per user (ms) |",
            "|---|---:|---:|---:|",
            f"| student (SASRec {STUDENT['hidden_size']}x{STUDENT['num_layers']}, batch {s['batch_size']}) | "
            f"{s['parameters']:,} | {s['seconds']:.4f} | {1000 * s['seconds'] / lat['users']:.3f} |",
            f"| LLM teacher (tiny Llama, HF, BIGRec grounding, {t['max_new_tokens']} new tokens) | {t['parameters']:,} | "
            f"{t['seconds']:.1f} | {1000 * t['seconds'] / lat['users']:.1f} |",
            "",
            f"Ratio LLM / student: **{lat['ratio']:,.0f}x** (goal >= 10^4 x, meant for a real LLM teacher: DLLM2Rec's "
            f"LLaMA-7B has ~{7e9 / t['parameters']:,.0f} times the parameters of this {t['parameters'] / 1e6:.1f} M-parameter "
            f"random tiny model, which also generates its whole budget of {t['max_new_tokens']} tokens every time). "
            f"The LLM's {t['title_embedding_seconds']:.0f} s of title embeddings (once per catalogue) are not counted.",
            "",
        ]
    lines += ["Verdict: " + report["verdict"], MARK_END, ""]
    return "\n".join(lines)


def verdict(report: dict) -> str:
    parts = []
    for name, record in report["datasets"].items():
        variant, gain = best_gain(record)
        if variant is None:
            continue
        full = record["runs"].get("dllm2rec+ed", {}).get("gain_test_ndcg@20")
        parts.append(f"{name}: best gain {gain:+.1%} test NDCG@20 ({record['runs'][variant]['label']})"
                     + (f", full DLLM2Rec {full:+.1%}" if full is not None else "")
                     + f" - goal +20% {'met' if gain >= 0.2 else 'not met'}")
    lat = report.get("latency")
    if lat:
        parts.append(f"latency ratio {lat['ratio']:,.0f}x against the tiny LLM - goal 10^4x "
                     f"{'met' if lat['ratio'] >= 1e4 else 'not met'} at this LLM size")
    return "; ".join(parts) + "."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="lastfm,games", help="comma-separated: lastfm, games")
    p.add_argument("--variants", default=None, help=f"comma-separated, for every dataset: {', '.join(VARIANTS)} "
                   "(default per dataset: " + "; ".join(f"{k} {','.join(v['variants'])}" for k, v in BUDGET.items()) + ")")
    p.add_argument("--teacher-epochs", dest="teacher_epochs", type=int, default=None,
                   help="teacher epochs for every dataset (default per dataset: " +
                   ", ".join(f"{k} {v['teacher_epochs']}" for k, v in BUDGET.items()) + ")")
    p.add_argument("--student-epochs", dest="student_epochs", type=int, default=None,
                   help="student epochs for every dataset (default per dataset: " +
                   ", ".join(f"{k} {v['student_epochs']}" for k, v in BUDGET.items()) + ")")
    p.add_argument("--student-loss", dest="student_loss", choices=("bce", "ce"), default="bce",
                   help="the student's own loss (bce: 1 sampled negative, as DLLM2Rec's code)")
    p.add_argument("--batch", type=int, default=None, help="training sequences per batch for every dataset "
                   "(default per dataset: " + ", ".join(f"{k} {v['batch']}" for k, v in BUDGET.items()) + ")")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU is shared)")
    p.add_argument("--latency-dataset", dest="latency_dataset", default="games",
                   help="dataset of the latency comparison (its students must be trained in this run)")
    p.add_argument("--latency-users", dest="latency_users", type=int, default=LATENCY_USERS)
    p.add_argument("--llm-batch", dest="llm_batch", type=int, default=16, help="HF backend batch size")
    p.add_argument("--no-latency", dest="latency", action="store_false")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "distill.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-markdown", dest="write_markdown", action="store_false")
    args = p.parse_args(argv)
    args.dataset_names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if args.variants is not None:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in args.dataset_names if n not in DATASETS] + [v for v in args.variants or [] if v not in VARIANTS]
    if bad or not args.dataset_names or args.variants == []:
        p.error(f"unknown dataset/variant {', '.join(bad) or '(empty)'}")
    if args.latency and args.latency_dataset not in args.dataset_names:
        p.error(f"--latency-dataset {args.latency_dataset} is not among --datasets (or pass --no-latency)")
    if args.threads < 1 or args.latency_users < 1:
        p.error("--threads and --latency-users must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    exe = Path(sys.executable).absolute()
    command = " ".join([str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe), "benchmarks/distill.py",
                        *(argv if argv is not None else sys.argv[1:])])
    report = {"benchmark": "distill", "command": command,
              "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")} | {
                  "teacher_model": TEACHER, "student_model": STUDENT, "topk": TOPK},
              "datasets": {}}
    report["settings"]["json"], report["settings"]["markdown"] = rel(args.json), rel(args.markdown)
    loads = []
    for name in args.dataset_names:
        report["datasets"][name] = run_dataset(name, args)
        loads.append(os.getloadavg()[0])
        write_json(args.json, report)  # partial results survive an interruption
        print()
        print(text_table(table_rows(report["datasets"][name])))
        print()
    if args.latency:
        report["latency"] = run_latency(args.latency_dataset, args)
        loads.append(os.getloadavg()[0])
    report["loadavg"] = round(max(loads), 2)
    report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    report["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
    report["verdict"] = verdict(report)
    write_json(args.json, report)
    if report.get("latency"):
        lat = report["latency"]
        print(f"latency, top-{lat['topk']} for {lat['users']} users: student {lat['student']['seconds']:.4f} s, "
              f"LLM teacher {lat['llm_teacher']['seconds']:.1f} s, ratio {lat['ratio']:,.0f}x")
    print(f"verdict: {report['verdict']}")
    if args.write_markdown:
        write_section(args.markdown, markdown_section(report), MARK_BEGIN, MARK_END)
        print(f"wrote {rel(args.json)} and the distill section of {rel(args.markdown)}")
    else:
        print(f"wrote {rel(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
