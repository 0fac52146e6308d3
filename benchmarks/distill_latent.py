"""Latent distillation benchmark (issue #33, item 6): DE, FTD, HTD and DE-RRD against ranking distillation.

    .venv/bin/python benchmarks/distill_latent.py --threads 2                 # games, ~1 hour on 2 cores
    .venv/bin/python benchmarks/distill_latent.py --dataset synthetic --no-gemma --no-markdown \\
        --json benchmarks/out/distill_latent/smoke.json                       # a smoke run, about a minute

A benchmark of its own (not a variant list of benchmarks/distill.py): it needs a teacher exported WITH user
states, a second student architecture, per-user arrays of every run, a best combination chosen on valid after
the other runs, and an LLM teacher in embeddings mode; distill.py's report and BUDGET stay as they are.

On games (`--dataset`; 50,546 test users), in one process:

1. TEACHER: SASRec 64x2, full-softmax CE, `--teacher-epochs` (2, as distill.py), best epoch on valid NDCG@10,
   exported as a teacher folder (`export_teacher`, mode sr: top-10 over all items with history excluded,
   its item table, and `user_states=True`: each training instance's state after its history, which the
   latent methods' user terms need).
2. STUDENTS, each with the same seed, data order, batches and `--student-epochs` (3, as distill.py) in every
   variant; own loss BCE with one sampled negative (as distill.py); best epoch on VALID NDCG@10, test scored
   once. Two architectures: small SASRec (common.STUDENT, 32x1) and small GRU4Rec (`GRU_STUDENT`: item
   vectors 32, one GRU layer of 64 units: the same item table as the SASRec student, about as many other
   weights). Variants: alone; + RRD; + DE; + DE-RRD (method rrd, latent de); + FTD; + HTD; + DLLM2Rec
   (ranking + collaborative embedding distillation, distill.py's full variant); and the BEST COMBINATION:
   the ranking method (RRD or DLLM2Rec) with the best VALID NDCG@10 plus the latent method (DE, FTD or HTD)
   with the best VALID NDCG@10, trained afterwards (it reuses the DE-RRD run when that is the pair). Every
   method at its config defaults, `weight_search=[1.0]` (the papers' fixed weights, one run per variant).
   FTD's default weight (1) is a placeholder (delrec/distill/topology.py: the official code's balance is
   about 4-8 on delrec's means), so the SASRec student also runs FTD at `--ftd-extra-weight` (5); the FTD
   weight kept for the best combination is the one with the better valid NDCG@10, and that row is
   reported as an extra weight, not as the published default.
3. GEMMA title-embedding teacher (`--no-gemma` skips it): Gemma 3 270M item-title embeddings (an LLM teacher
   folder in embeddings mode, as benchmarks/distill_real.py builds it: last layer, last token, bfloat16,
   HF backend), reused from benchmarks/out/distill_real/<dataset>/teacher-llm-emb when its dataset
   fingerprint matches, else exported into the work folder; SASRec students + DE(items) and + FTD(items)
   (`entities items`, method none) against the same student alone.

Every run: test HR@20 / NDCG@20, valid NDCG@10, seconds, and the per-user test NDCG@20 (full ranking,
history excluded, `per_instance_full` on the kept model), saved as float32 .npy in
<json folder>/<json stem>/<dataset>/ (benchmarks/results/distill_latent/games); every verdict is computed from those saved arrays (paired
per-user differences, `delrec.metrics.paired_difference`: better / worse when the mean difference is
outside two standard errors, the "2 SE" column is that smallest detectable difference).

Writes `--json` (benchmarks/results/distill_latent.json) and only the block between `<!-- distill_latent -->`
and `<!-- /distill_latent -->` of benchmarks/RESULTS.md (re-read right before writing).
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
from common import (BUDGET, GEMMA, ROOT, STUDENT, TEACHER, ensure_data, log, machine, markdown_table, rel,
                    run_summary, text_table, train_config)
from results_section import write_section
from delrec.io import write_json

WORK = ROOT / "benchmarks" / "out" / "distill_latent"
MARK_BEGIN, MARK_END = "<!-- distill_latent -->", "<!-- /distill_latent -->"
TOPK = 10  # the teacher's list (distill.py's)
GRU_STUDENT = {"hidden_size": 32, "gru_size": 64, "num_layers": 1, "dropout": 0.2, "max_length": 50}
ARCHITECTURES = {"sasrec": "SASRec 32x1", "gru4rec": "GRU4Rec 32/64"}
# variant -> (label, ranking method, latent method, embedding distillation)
VARIANTS = {
    "alone": ("student alone", "none", "none", False),
    "rrd": ("+ RRD", "rrd", "none", False),
    "dllm2rec": ("+ DLLM2Rec (ranking + embedding)", "dllm2rec", "none", True),
    "de": ("+ DE", "none", "de", False),
    "de-rrd": ("+ DE-RRD", "rrd", "de", False),
    "ftd": ("+ FTD", "none", "ftd", False),
    "htd": ("+ HTD", "none", "htd", False),
}
RANKING, LATENT = ("rrd", "dllm2rec"), ("de", "ftd", "htd")
GEMMA_VARIANTS = {"gemma-de": ("+ DE(items), Gemma teacher", "de"), "gemma-ftd": ("+ FTD(items), Gemma teacher", "ftd")}


# ----------------------------------------------------------------------------- data, teachers


def load_dataset(name: str):
    """(dataset, how): common.ensure_data's, or (`synthetic`) a small synthetic set in the work folder."""
    if name != "synthetic":
        return ensure_data(name)
    from delrec.data.dataset import PreparedDataset
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig
    from delrec.data.synthetic import make_synthetic

    folder = WORK / "synthetic" / "data"
    if (folder / "meta.json").is_file():
        return PreparedDataset.load(folder), "existing"
    raw = make_synthetic(num_users=300, num_items=200, min_length=6, max_length=20, seed=0)
    return prepare_dataset(raw, PreprocessConfig(), folder), "synthetic, prepared now"


def gemma_teacher(dataset, args) -> tuple[Path | None, dict]:
    """The Gemma title-embedding teacher folder: distill_real's when its dataset fingerprint matches, else
    exported into the work folder (Gemma imported there unless common.GEMMA exists)."""
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
    from delrec.ranking.hf import Options

    existing = ROOT / "benchmarks" / "out" / "distill_real" / args.dataset / "teacher-llm-emb"
    if (existing / "teacher.json").is_file():
        info = json.loads((existing / "teacher.json").read_text())
        if info.get("dataset_fingerprint") == dataset.fingerprint:
            log(f"Gemma teacher: reusing {rel(existing)} (fingerprint matches)")
            return existing, {"folder": rel(existing), "how": "reused (dataset fingerprint matches)"}
        log(f"Gemma teacher: {rel(existing)} is of another dataset version; exporting anew")
    llm = GEMMA
    if not (llm / "config.json").is_file():
        from delrec.cli import main as delrec

        llm = WORK / "gemma"
        if not (llm / "config.json").is_file():
            log(f"importing gemma-3-270m into {rel(llm)}")
            if delrec(["llm", "import", "gemma-3-270m", "--out", str(llm), "--overwrite"]):
                log("delrec llm import failed: Gemma rows skipped")
                return None, {"how": "skipped: delrec llm import gemma-3-270m failed"}
    out = WORK / args.dataset / "teacher-gemma-emb"
    shutil.rmtree(out, ignore_errors=True)
    log(f"Gemma teacher: embedding {dataset.num_items} titles with {rel(llm)} (bfloat16, HF)")
    began = time.perf_counter()
    folder = export_teacher(TeacherExportConfig(model=str(llm), data=str(dataset.path), out=str(out), topk=TOPK,
                                                mode="embeddings", seed=args.seed, progress=False),
                            Options(device="cpu", dtype="bfloat16", batch_size=16))
    seconds = round(time.perf_counter() - began, 1)
    info = json.loads((folder / "teacher.json").read_text())
    log(f"  {seconds} s")
    return folder, {"folder": rel(folder), "how": f"exported now from {rel(llm)}", "seconds": seconds,
                    "embedding_dim": info.get("embedding_dim"), "embedding_knn": info["source"].get("embedding_knn")}


# ----------------------------------------------------------------------------- runs


class Runner:
    """Trains runs and keeps their records and per-user arrays (saved, then read back for every verdict)."""

    def __init__(self, dataset, args, arrays: Path):
        self.dataset, self.args, self.arrays = dataset, args, arrays
        self.runs: dict[str, dict] = {}
        self.per_user: dict[str, "object"] = {}
        arrays.mkdir(parents=True, exist_ok=True)

    def record(self, key: str, result, started: float, **extra) -> dict:
        import numpy as np
        from delrec.sr.evaluate import per_instance_full

        began = time.perf_counter()
        values = per_instance_full(result.model, self.dataset.instances("test"), 20)["ndcg@20"].numpy()
        path = self.arrays / f"{key}.test-ndcg20.npy"
        np.save(path, values.astype(np.float32))
        self.per_user[key] = np.load(path).astype(np.float64)  # the verdicts read what is committed
        run = {**extra, **run_summary(result, started), "eval_seconds": round(time.perf_counter() - began, 1),
               "per_user": rel(path), "per_user_mean": round(float(self.per_user[key].mean()), 6)}
        if abs(run["per_user_mean"] - run["test"]["ndcg@20"]) > 1e-4:
            log(f"  WARNING: per-user mean {run['per_user_mean']} differs from test NDCG@20 {run['test']['ndcg@20']}")
        self.runs[key] = run
        log(f"  {key}: test HR@20 {run['test']['hr@20']:.4f}, NDCG@20 {run['test']['ndcg@20']:.4f}, valid NDCG@10 "
            f"{run['valid']['ndcg@10']:.4f} (best epoch {run['best_epoch']}/{run['epochs_run']}, "
            f"{run['wall_seconds']:.0f} s + {run['eval_seconds']:.0f} s per-user)")
        return run

    def student(self, key: str, label: str, architecture: str, teacher: Path | None, method: str, latent: str,
                embedding: bool, latent_config=None, **extra) -> dict:
        from delrec.distill.student import train_student
        from delrec.sr import GRU4RecConfig, SASRecConfig

        model_config = SASRecConfig(**STUDENT) if architecture == "sasrec" else GRU4RecConfig(**GRU_STUDENT)
        out = WORK / self.args.dataset / key
        shutil.rmtree(out, ignore_errors=True)
        log(f"{key}: {ARCHITECTURES[architecture]} {label}")
        started = time.perf_counter()
        uses_teacher = method != "none" or latent != "none" or embedding
        result = train_student(self.dataset, model_config,
                               train_config(self.args, self.args.student_epochs, self.args.batch, "bce"),
                               [teacher] if uses_teacher else [], method, None, out,
                               embedding_distillation=embedding, weight_search=[1.0], latent=latent,
                               latent_config=latent_config)
        distillation = result.metrics.get("distillation", {})
        return self.record(key, result, started, label=label, architecture=architecture, method=method,
                           latent=latent, embedding_distillation=embedding,
                           method_config=distillation.get("method_config"),
                           latent_config=distillation.get("latent_config"), **extra)


def paired(values, base) -> dict:
    from delrec.metrics import paired_difference

    p = paired_difference(values, base)
    return {"mean_diff": round(p.difference, 6), "two_se": round(p.margin, 6), "verdict": p.verdict}


def choose(runs: dict, keys: list[str]) -> str:
    """The key of `keys` with the best valid NDCG@10 (ties: the first)."""
    return max(keys, key=lambda k: (runs[k]["valid"]["ndcg@10"], -keys.index(k)))


def run_dataset(args) -> dict:
    import numpy as np
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
    from delrec.distill.topology import FTDConfig
    from delrec.sr import SASRecConfig, train_sr

    dataset, how = load_dataset(args.dataset)
    work = WORK / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    arrays = args.json.parent / args.json.stem / args.dataset  # results/distill_latent/games by default
    runner = Runner(dataset, args, arrays)
    record = {"data": {"path": rel(dataset.path), "how": how, "fingerprint": dataset.fingerprint,
                       "items": dataset.num_items, "train_instances": len(dataset.instances("train")),
                       "test_instances": len(dataset.instances("test"))},
              "per_user_folder": rel(arrays), "runs": runner.runs, "selection": {}, "verdicts": {}}

    # 1. the SASRec teacher, exported with its user states
    started = time.perf_counter()
    log(f"{args.dataset}: teacher SASRec {TEACHER['hidden_size']}x{TEACHER['num_layers']} (CE), "
        f"{args.teacher_epochs} epochs")
    shutil.rmtree(work / "teacher-sasrec-model", ignore_errors=True)
    teacher = train_sr(dataset, SASRecConfig(**TEACHER), train_config(args, args.teacher_epochs, args.batch, "ce"),
                       work / "teacher-sasrec-model")
    runner.record("teacher", teacher, started, label="teacher: SASRec 64x2, CE", architecture="sasrec-teacher")
    began = time.perf_counter()
    shutil.rmtree(work / "teacher-sasrec", ignore_errors=True)
    folder = export_teacher(TeacherExportConfig(model=str(work / "teacher-sasrec-model"), data=str(dataset.path),
                                                out=str(work / "teacher-sasrec"), topk=TOPK, mode="sr",
                                                user_states=True, progress=False))
    info = json.loads((folder / "teacher.json").read_text())
    record["teacher_export"] = {"seconds": round(time.perf_counter() - began, 1), "topk": TOPK, "user_states": True,
                                "target_in_topk": info["source"].get("target_in_topk"),
                                "files": sorted(p.name for p in folder.iterdir())}
    log(f"  exported top-{TOPK} + item table + user states in {record['teacher_export']['seconds']} s")
    write_json(args.json_partial, record)

    # 2. the students
    for architecture in args.students:
        prefix = f"{architecture}-"
        for variant in VARIANTS:
            label, method, latent, embedding = VARIANTS[variant]
            runner.student(prefix + variant, label, architecture, folder, method, latent, embedding)
            write_json(args.json_partial, record)
        ftd_keys = [prefix + "ftd"]
        if architecture == "sasrec" and args.ftd_extra_weight:
            w = args.ftd_extra_weight
            runner.student(prefix + f"ftd-w{w:g}", f"+ FTD (weight {w:g}, extra)", architecture, folder, "none",
                           "ftd", False, FTDConfig(ftd_weight=w), extra_weight=True)
            ftd_keys.append(prefix + f"ftd-w{w:g}")
        # the best combination, chosen on valid only
        ftd_kept = choose(runner.runs, ftd_keys)
        ranking = choose(runner.runs, [prefix + m for m in RANKING])
        latent_key = choose(runner.runs, [prefix + "de", ftd_kept, prefix + "htd"])
        latent_run = runner.runs[latent_key]
        ranking_run = runner.runs[ranking]
        selection = {"ranking": ranking, "latent": latent_key, "ftd_weight_kept": ftd_kept,
                     "valid_ndcg@10": {k: runner.runs[k]["valid"]["ndcg@10"] for k in
                                       [prefix + m for m in RANKING] + [prefix + "de", *ftd_keys, prefix + "htd"]}}
        best = prefix + "best"
        if ranking_run["method"] == "rrd" and latent_run["latent"] == "de":
            selection["reused"] = prefix + "de-rrd"
            runner.runs[best] = {**runner.runs[prefix + "de-rrd"], "label": "best combination (= DE-RRD)"}
            runner.per_user[best] = runner.per_user[prefix + "de-rrd"]
            log(f"{best}: the best ranking and latent methods on valid are RRD and DE: the DE-RRD run")
        else:
            latent_config = None
            if latent_run.get("extra_weight"):
                latent_config = FTDConfig(ftd_weight=args.ftd_extra_weight)
            names = {"rrd": "RRD", "dllm2rec": "DLLM2Rec"}
            label = f"best combination: {names[ranking_run['method']]} + {latent_run['label'].removeprefix('+ ')}"
            runner.student(best, label, architecture, folder, ranking_run["method"], latent_run["latent"],
                           ranking_run["embedding_distillation"], latent_config)
        record["selection"][architecture] = selection
        write_json(args.json_partial, record)

    # 3. the Gemma title-embedding teacher (items only)
    if args.gemma and "sasrec" in args.students:
        llm_folder, record["gemma_teacher"] = gemma_teacher(dataset, args)
        if llm_folder is not None:
            from delrec.distill.de import DEConfig

            configs = {"de": DEConfig(entities="items"), "ftd": FTDConfig(entities="items")}
            for key, (label, latent) in GEMMA_VARIANTS.items():
                runner.student(key, label, "sasrec", llm_folder, "none", latent, False, configs[latent])
                write_json(args.json_partial, record)

    # verdicts, from the saved per-user arrays
    pu, runs = runner.per_user, runner.runs
    verdicts = record["verdicts"]

    def compare(a: str, b: str, why: str) -> None:
        if a in pu and b in pu:
            verdicts[f"{a} vs {b}"] = {"a": a, "b": b, "why": why, **paired(pu[a], pu[b])}

    for architecture in args.students:
        p = f"{architecture}-"
        latents = [p + v for v in LATENT] + [k for k in runs if k.startswith(p + "ftd-w")]
        for key in latents:
            compare(key, p + "alone", "latent vs alone")
        for key in latents:
            compare(key, p + "rrd", "goal a: latent vs RRD alone")
        compare(p + "de-rrd", p + "rrd", "goal a/b: DE-RRD vs RRD")
        compare(p + "de-rrd", p + "de", "goal b: DE-RRD vs DE")
        compare(p + "rrd", p + "alone", "ranking vs alone")
        compare(p + "dllm2rec", p + "alone", "ranking vs alone")
        compare(p + "de-rrd", p + "alone", "combination vs alone")
        compare(p + "best", p + "alone", "best combination vs alone")
        compare(p + "best", record["selection"][architecture]["ranking"], "best combination vs its ranking method alone")
        compare(p + "best", "teacher", "moonshot: best combination vs the SASRec teacher")
    for key in GEMMA_VARIANTS:
        compare(key, "sasrec-alone", "Gemma latent (items) vs alone")
    record["goals"] = goals(record, args.students)
    del record["runs"]
    record["runs"] = runs  # last in the file: the long per-epoch logs after the verdicts
    for key, values in pu.items():
        runs[key].setdefault("per_user_mean", round(float(np.mean(values)), 6))
    return record


def goals(record: dict, students: list[str]) -> dict:
    v, runs = record["verdicts"], record["runs"]
    out = {}
    # goal a: a latent method (alone, default weights) beats RRD alone by two standard errors
    wins = [f"{a} vs {b}" for a, b in ((f"{s}-{m}", f"{s}-rrd") for s in students for m in LATENT)
            if v.get(f"{a} vs {b}", {}).get("verdict") == "better"]
    extra = [k for k, x in v.items() if x["why"] == "goal a: latent vs RRD alone" and "-ftd-w" in x["a"]
             and x["verdict"] == "better"]
    combined = [f"{s}-de-rrd vs {s}-rrd" for s in students if v.get(f"{s}-de-rrd vs {s}-rrd", {}).get("verdict")
                == "better"]
    out["a"] = {"met": bool(wins), "latent_alone_better": wins, "extra_weight_better": extra,
                "de_rrd_better_than_rrd": combined}
    # goal b: DE + RRD at least as good as either alone (not worse beyond 2 SE; and the point estimates)
    out["b"] = {}
    for s in students:
        pair = [v.get(f"{s}-de-rrd vs {s}-{o}") for o in ("rrd", "de")]
        if None in pair:
            continue
        out["b"][s] = {"not_worse": all(x["verdict"] != "worse" for x in pair),
                       "point_estimate_at_least": all(x["mean_diff"] >= 0 for x in pair),
                       "better_than_both": all(x["verdict"] == "better" for x in pair)}
    # moonshot: the best combination at or above the SASRec teacher's test NDCG@20
    out["moonshot"] = {}
    for s in students:
        if f"{s}-best" in runs and "teacher" in runs:
            student, teacher = runs[f"{s}-best"]["test"]["ndcg@20"], runs["teacher"]["test"]["ndcg@20"]
            out["moonshot"][s] = {"student": student, "teacher": teacher, "met": student >= teacher,
                                  "ratio": round(student / teacher, 4),
                                  "paired": v.get(f"{s}-best vs teacher")}
    return out


# ----------------------------------------------------------------------------- report


def fmt(value, digits=4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_rows(record: dict) -> list[list[str]]:
    rows = [["run", "test HR@20", "test NDCG@20", "valid NDCG@10", "vs alone: diff ± 2 SE", "verdict",
             "best epoch", "s (train + eval)"]]
    v = record["verdicts"]
    for key, run in record["runs"].items():
        base = "sasrec-alone" if key.startswith("gemma-") else f"{run.get('architecture')}-alone"
        cmp = v.get(f"{key} vs {base}")
        name = run["label"] if key == "teacher" else f"{ARCHITECTURES.get(run['architecture'], '')} {run['label']}"
        if key.startswith("gemma-"):
            name = f"SASRec 32x1 {run['label']}"
        rows.append([name, fmt(run["test"]["hr@20"]), fmt(run["test"]["ndcg@20"]), fmt(run["valid"]["ndcg@10"]),
                     f"{cmp['mean_diff']:+.4f} ± {cmp['two_se']:.4f}" if cmp else "",
                     cmp["verdict"] if cmp else "", f"{run['best_epoch']}/{run['epochs_run']}",
                     f"{run['wall_seconds']:.0f} + {run['eval_seconds']:.0f}"])
    return rows


def verdict_rows(record: dict) -> list[list[str]]:
    rows = [["comparison (A vs B, test NDCG@20 per user)", "why", "A − B", "2 SE (smallest detectable)", "verdict"]]
    for name, x in record["verdicts"].items():
        rows.append([name, x["why"], f"{x['mean_diff']:+.4f}", f"{x['two_se']:.4f}", x["verdict"]])
    return rows


def goal_lines(record: dict) -> list[str]:
    g = record["goals"]
    a = g["a"]
    lines = [f"- Goal (a), a latent method beats ranking distillation (RRD) alone by two standard errors: "
             f"**{'met' if a['met'] else 'not met'}**"
             + (f" ({', '.join(a['latent_alone_better'])})" if a["latent_alone_better"] else
                " (no latent method alone, at its default weight, is better than RRD beyond 2 SE)")
             + (f"; with the extra FTD weight: {', '.join(a['extra_weight_better'])}" if a["extra_weight_better"]
                else "")
             + (f"; DE-RRD (latent + RRD) beats RRD alone by 2 SE: {', '.join(a['de_rrd_better_than_rrd'])}"
                if a["de_rrd_better_than_rrd"] else "; DE-RRD does not beat RRD alone by 2 SE") + "."]
    for s, b in g["b"].items():
        lines.append(f"- Goal (b), DE + RRD at least as good as either alone ({ARCHITECTURES[s]}): "
                     f"**{'met' if b['not_worse'] and b['point_estimate_at_least'] else 'not met'}** (not worse than "
                     f"either beyond 2 SE: {'yes' if b['not_worse'] else 'no'}; point estimate at least both: "
                     f"{'yes' if b['point_estimate_at_least'] else 'no'}; better than both by 2 SE: "
                     f"{'yes' if b['better_than_both'] else 'no'}).")
    for s, m in g["moonshot"].items():
        p = m.get("paired")
        lines.append(f"- Moonshot, best combination at or above the SASRec teacher ({ARCHITECTURES[s]}): "
                     f"**{'met' if m['met'] else 'not met'}** ({m['student']:.4f} vs teacher {m['teacher']:.4f}, "
                     f"{m['ratio']:.0%} of it"
                     + (f"; paired {p['mean_diff']:+.4f} ± {p['two_se']:.4f}, {p['verdict']}" if p else "") + ").")
    return lines


def markdown_section(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    record = report["dataset"]
    d = record["data"]
    sel = "; ".join(f"{ARCHITECTURES[a]}: ranking {x['ranking'].split('-', 1)[1]}, latent {x['latent'].split('-', 1)[1]}"
                    f"{' (= the DE-RRD run)' if x.get('reused') else ''}" for a, x in record["selection"].items())
    gt = record.get("gemma_teacher")
    lines = [
        MARK_BEGIN,
        "## Latent distillation: DE, FTD, HTD, DE-RRD vs ranking distillation (issue #33, item 6)",
        "",
        f"Command (from the repository root): `{report['command']}`  ",
        f"Date: {report['finished']} (UTC); total wall time {report['wall_minutes']:.1f} min.  ",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}; torch {m['torch']}; {s['threads']} torch thread(s) "
        f"(load average {report['loadavg']}).  ",
        f"**{report['settings']['dataset']}**: {d['items']} items, {d['train_instances']} training instances, "
        f"{d['test_instances']} test users. Teacher: SASRec 64x2, full-softmax CE, {s['teacher_epochs']} epochs, "
        f"exported top-{TOPK} over all items (history excluded) + item table + user states (`user_states=True`; "
        f"the teacher's top-{TOPK} holds the training target for {record['teacher_export']['target_in_topk']:.1%} "
        f"of instances). Students: "
        + " and ".join({"sasrec": "SASRec 32x1 (common.STUDENT)",
                        "gru4rec": "GRU4Rec (item vectors 32, one GRU layer of 64 units)"}[a] for a in s["students"])
        + f", {s['student_epochs']} epochs, batches of {s['batch']}, own loss BCE with 1 sampled negative, "
        f"lr {s['lr']}, seed {s['seed']}, the same in every variant. Every method at its defaults, one run each "
        "(`weight_search=[1.0]`, the papers' fixed weights): RRD weight 0.1 (50 uninteresting items); DLLM2Rec "
        "lambda_d 0.8 + embedding distillation alpha 0.2; DE weight 0.01, 30 experts; FTD weight 1 (a "
        "placeholder, see topology.py); HTD weight 1, assignment 0.01, 30 groups; latent entities both (users "
        "and items). "
        + (f"Extra (reported as such): FTD at weight {s['ftd_extra_weight']:g} on the SASRec student; the FTD "
           "weight with the better valid NDCG@10 enters the best combination. " if s["ftd_extra_weight"] else "")
        + f"Best combination = the ranking method (RRD, DLLM2Rec) and the latent method (DE, FTD, HTD) with the "
        f"best VALID NDCG@10, trained afterwards ({sel}). Best epoch on VALID NDCG@10; test scored once; full "
        "ranking, history excluded.",
        "",
        "Verdicts: paired per-user test NDCG@20 differences on the same users (`delrec.metrics.paired_difference`): "
        "better / worse when the mean difference is outside two standard errors; \"2 SE\" is that smallest "
        f"detectable difference. Per-user arrays (float32 .npy, the values every verdict is computed from): "
        f"`{record['per_user_folder']}/`.",
        "",
    ]
    if gt:
        knn = gt.get("embedding_knn")
        lines += [f"Gemma teacher: Gemma 3 270M title embeddings (embeddings mode, last layer, last token, "
                  f"bfloat16), {gt['how']}" + (f", {gt['seconds']} s" if gt.get("seconds") else "")
                  + (f"; item-kNN HR@{knn['k']} {knn['hit_rate']:.4f} (chance {knn['chance']:.4f})" if knn else "")
                  + "; its rows use `entities items`, method none, the SASRec student.", ""]
    elif s["gemma"]:
        lines += ["Gemma teacher: not run.", ""]
    lines += ["Seconds: wall time of each run's training + its per-user test evaluation on this 2-core machine, "
              "which other jobs shared for part of the run: compare them only roughly."
              + (f" {report['note']}" if report.get("note") else ""), ""]
    lines += [markdown_table(table_rows(record)), "", markdown_table(verdict_rows(record)), "", "Goals:", ""]
    lines += goal_lines(record)
    lines += ["", MARK_END, ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", default="games", choices=("games", "lastfm", "synthetic"),
                   help="games (default), lastfm, or synthetic (a smoke run)")
    p.add_argument("--students", default="sasrec,gru4rec", help="comma-separated: sasrec, gru4rec")
    p.add_argument("--teacher-epochs", dest="teacher_epochs", type=int, default=None,
                   help="default: benchmarks/common.py BUDGET's (games 2; synthetic 1)")
    p.add_argument("--student-epochs", dest="student_epochs", type=int, default=None,
                   help="default: BUDGET's (games 3; synthetic 1)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default: BUDGET's; games 64)")
    p.add_argument("--ftd-extra-weight", dest="ftd_extra_weight", type=float, default=5.0,
                   help="one extra FTD weight for the SASRec student (0: none)")
    p.add_argument("--no-gemma", dest="gemma", action="store_false", help="skip the Gemma title-embedding teacher")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "distill_latent.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-markdown", dest="write_markdown", action="store_false")
    args = p.parse_args(argv)
    budget = BUDGET.get(args.dataset, {"teacher_epochs": 1, "student_epochs": 1, "batch": 64})
    args.teacher_epochs = args.teacher_epochs or budget["teacher_epochs"]
    args.student_epochs = args.student_epochs or budget["student_epochs"]
    args.batch = args.batch or budget["batch"]
    args.students = [s.strip() for s in args.students.split(",") if s.strip()]
    if not args.students or any(s not in ARCHITECTURES for s in args.students):
        p.error(f"--students: comma-separated from {', '.join(ARCHITECTURES)}")
    if args.threads < 1:
        p.error("--threads must be positive")
    args.json_partial = WORK / f"{args.json.stem}.partial.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    exe = Path(sys.executable).absolute()
    command = " ".join([str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe),
                        "benchmarks/distill_latent.py", *(argv if argv is not None else sys.argv[1:])])
    report = {"benchmark": "distill_latent", "command": command,
              "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("json", "markdown", "json_partial")}
              | {"teacher_model": TEACHER, "student_models": {"sasrec": STUDENT, "gru4rec": GRU_STUDENT},
                 "topk": TOPK}}
    report["dataset"] = run_dataset(args)
    report["loadavg"] = round(os.getloadavg()[0], 2)
    report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    report["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
    write_json(args.json, report)
    print()
    print(text_table(table_rows(report["dataset"])))
    print()
    print(text_table(verdict_rows(report["dataset"])))
    print()
    print("\n".join(goal_lines(report["dataset"])))
    if args.write_markdown:
        write_section(args.markdown, markdown_section(report), MARK_BEGIN, MARK_END)
        print(f"wrote {rel(args.json)} and the distill_latent section of {rel(args.markdown)}")
    else:
        print(f"wrote {rel(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
