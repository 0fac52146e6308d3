"""The real LLM as teacher (issue #14): students distilled from Gemma 3 270M, and the latency gap.

    .venv/bin/python benchmarks/distill_real.py                        # lastfm then games, ~1 hour on 2 cores
    .venv/bin/python benchmarks/distill_real.py --datasets lastfm --rerank-instances 100 --no-latency

The LLM is `--llm` (default: Gemma 3 270M, imported once with `delrec llm import gemma-3-270m` into
the work folder), run by the HF backend in `--dtype` (bfloat16: 2.6x float32's scoring speed on
this CPU, benchmarks/RESULTS.md "real_llm"). It is the zero-shot pretrained model: a stage-2 or
exported folder given as `--llm` is used the same way. `--rank-llm DATASET=FOLDER` makes a fine-tuned
folder the ranking teacher of one dataset (e.g. the stage-2 model of benchmarks/delrec_real.py on
lastfm): it re-ranks with the template it was trained on, and the title embeddings stay `--llm`'s.

Per dataset (`--datasets`), the data and the SR teacher and student settings of
benchmarks/distill.py (teacher SASRec 64x2 CE; student SASRec 32x1, BCE with one negative, the
same seed, epochs and batches in every variant; best epoch on VALID NDCG@10, test scored once):

1. LLM teachers, with `delrec.distill.teacher_export.export_teacher`:
   - `llm-emb`: `--mode embeddings`, every item title embedded (last layer, last token); and
     `llm-emb-mean` the same from the middle layer, mean-pooled (the alternative to BIGRec's choice);
   - `llm-rank`: `--mode rerank` over a seeded subset of `--rerank-instances` training instances:
     the SASRec teacher's top-20 + 10 random items re-ranked by the LLM's title log-likelihood
     (`teacher` template), top-10 kept; the title embeddings come with it.
2. SASRec teacher: trained and exported (top-10 over all items + its item table) for every instance.
3. Students: alone; + LLM embeddings (`--method none --embedding_distillation`); + LLM ranking
   (DLLM2Rec on the subset, the other instances train on their own loss); + both (DLLM2Rec +
   embeddings of the LLM teacher); + SASRec teacher (DLLM2Rec + embeddings); + LLM and SASRec
   together (both folders: rankings combined per instance, embeddings concatenated).
   Verdicts: test NDCG@20 gain over the student alone, with a two-standard-error band from the
   per-user NDCG@20 differences (paired, same users). The papers' fixed weights by default;
   `--weight-search 0 0.5 1 --json benchmarks/results/distill_real-weight-search.json` has every
   student choose its weight on valid, as `delrec student train` does by default (issue #32).

Latency (`--latency-dataset`): top-20 for the first `--latency-users` test users by the
student (torch alone, eager and compiled ahead of time by `delrec sr compile`; one user per call, and
all of them in one batch) and by the LLM (rerank: the
SR top-20 + 10 random items scored; grounding: BIGRec generate + L2 to every title embedding,
the title embeddings computed beforehand) on the first `--llm-latency-users` of those users,
per user. The LLM's cost is set against its FLOP floor (useful FLOPs / this machine's best GEMM
rate, benchmarks/real_llm.py's model). `--latency-only` re-times it alone, keeping every dataset's
rows (it trains the SASRec teacher and a student alone first when the work folder lacks them). Writes benchmarks/results/distill_real.json and the
`<!-- distill_real -->` block of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# benchmarks/ is on sys.path when a benchmark runs as a script
from common import (BUDGET, DATASETS, STUDENT, TEACHER, FlopModel, ensure_data, ensure_llm, gemm_rates, log, machine,
                    rel, run_summary, scoring_flops, train_config)
from results_section import write_section
from delrec.io import write_json

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "out" / "distill_real"
TOPK, SR_TOPM, NUM_RANDOM, LATENCY_K = 10, 20, 10, 20
ZERO_SHOT_RANKER = "zero-shot (--llm), template teacher"  # records without a `model` predate --rank-llm
# variant -> (label, teachers, method, embedding distillation)
VARIANTS = {
    "alone": ("student alone", [], "none", False),
    "llm-emb": ("+ LLM embeddings", ["llm-emb"], "none", True),
    "llm-emb-mean": ("+ LLM embeddings (middle layer, mean pooling)", ["llm-emb-mean"], "none", True),
    "llm-rank": ("+ LLM ranking (DLLM2Rec, subset)", ["llm-rank"], "dllm2rec", False),
    "llm-both": ("+ LLM ranking + embeddings", ["llm-rank"], "dllm2rec", True),
    "sasrec": ("+ SASRec teacher (DLLM2Rec + embeddings)", ["sasrec"], "dllm2rec", True),
    "llm+sasrec": ("+ LLM and SASRec together", ["sasrec", "llm-rank"], "dllm2rec", True),
}


def hf_options(args):
    from delrec.ranking.hf import Options

    return Options(device="cpu", dtype=args.dtype, batch_size=args.llm_batch)


def export(args, llm: Path, dataset, out: Path, **settings) -> tuple[Path, dict]:
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher

    began = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    folder = export_teacher(TeacherExportConfig(model=str(llm), data=str(dataset.path), out=str(out), topk=TOPK,
                                                seed=args.seed, progress=True, **settings), hf_options(args))
    info = json.loads((folder / "teacher.json").read_text())
    return folder, {"seconds": round(time.perf_counter() - began, 1), "rows": info["num_instances"],
                    "embedding_dim": info["embedding_dim"], "target_in_topk": info["source"].get("target_in_topk"),
                    "target_in_candidates": info["source"].get("target_in_candidates"),
                    "instances_per_second": info.get("instances_per_second"),
                    "embedding_knn": info["source"].get("embedding_knn")}


def knn_clause(knn: dict | None) -> str:
    """The teacher folder's item-kNN check of its embeddings (`delrec.distill.embedding.item_knn_hit_rate`)."""
    if not knn:
        return ""
    return (f" (item-kNN HR@{knn['k']} on {knn['users']} valid users: {knn['hit_rate']:.4f}, chance "
            f"{knn['chance']:.4f})")


def per_user_ndcg(model_dir: Path, dataset, k: int = 20) -> list[float]:
    """NDCG@k of each test user under full ranking (history excluded), for paired standard errors."""
    from delrec.sr import load_model
    from delrec.sr.evaluate import per_instance_full

    return per_instance_full(load_model(model_dir), dataset.instances("test"), k)[f"ndcg@{k}"].tolist()


def paired_gain(values: list[float], base: list[float]) -> dict:
    from delrec.metrics import paired_difference

    paired = paired_difference(values, base)
    return {"mean_diff": round(paired.difference, 6), "two_se": round(paired.margin, 6), "verdict": paired.verdict}


def train_sr_teacher(name: str, dataset, args) -> dict:
    """Train the SASRec teacher into WORK/NAME/sasrec-model; its run summary."""
    from delrec.sr import SASRecConfig, train_sr

    budget = BUDGET[name]
    started = time.perf_counter()
    log(f"{name}: SASRec teacher, {budget['teacher_epochs']} epochs")
    shutil.rmtree(WORK / name / "sasrec-model", ignore_errors=True)
    teacher = train_sr(dataset, SASRecConfig(**TEACHER), train_config(args, budget["teacher_epochs"], budget["batch"],
                                                                        "ce"), WORK / name / "sasrec-model")
    return {"label": "teacher: SASRec 64x2, CE", **run_summary(teacher, started)}


def train_variant(name: str, dataset, args, variant: str, teacher_folders: list[Path]) -> dict:
    """Train one student variant into WORK/NAME/student-VARIANT; its run record."""
    from delrec.distill.student import train_student
    from delrec.sr import SASRecConfig

    label, teachers, method, embedding = VARIANTS[variant]
    budget = BUDGET[name]
    out = WORK / name / f"student-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    log(f"{name}: student {label}")
    started = time.perf_counter()
    result = train_student(dataset, SASRecConfig(**STUDENT),
                           train_config(args, budget["student_epochs"], budget["batch"], "bce"),
                           teacher_folders, method, None, out, embedding_distillation=embedding,
                           weight_search=args.weight_search)
    search = result.metrics["distillation"].get("weight_search")
    log(f"  test NDCG@20 {result.metrics['test']['ndcg@20']:.4f} (best epoch {result.best_epoch}"
        + (f", weight x{search['chosen']:g} kept on valid" if search else "") + ")")
    return {"label": label, "teachers": teachers, "method": method, "embedding_distillation": embedding,
            **run_summary(result, started), **({"weight_search": search} if search else {})}


def run_dataset(name: str, args, llm: Path) -> dict:
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher

    dataset, how = ensure_data(name)
    work = WORK / name
    budget = BUDGET[name]
    record = {"data": {"path": rel(dataset.path), "how": how, "items": dataset.num_items,
                       "train_instances": len(dataset.instances("train")),
                       "test_instances": len(dataset.instances("test"))},
              "budget": {**budget, "rerank_instances": args.rerank_instances}, "teachers": {}, "runs": {}}
    folders = {}

    record["runs"]["sasrec-model"] = train_sr_teacher(name, dataset, args)
    shutil.rmtree(work / "teacher-sasrec", ignore_errors=True)
    folders["sasrec"] = export_teacher(TeacherExportConfig(model=str(work / "sasrec-model"), data=str(dataset.path),
                                                           out=str(work / "teacher-sasrec"), topk=TOPK, mode="sr",
                                                           progress=False))

    log(f"{name}: LLM item embeddings of {dataset.num_items} titles")
    folders["llm-emb"], record["teachers"]["llm-emb"] = export(args, llm, dataset, work / "teacher-llm-emb",
                                                               mode="embeddings")
    log(f"  {record['teachers']['llm-emb']['seconds']} s")
    if "llm-emb-mean" in args.variants:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(llm)
        middle = getattr(config, "text_config", config).num_hidden_layers // 2
        folders["llm-emb-mean"], record["teachers"]["llm-emb-mean"] = export(
            args, llm, dataset, work / "teacher-llm-emb-mean", mode="embeddings", embedding_layer=middle,
            embedding_pooling="mean")
        record["teachers"]["llm-emb-mean"]["layer"] = middle
    ranker = args.rank_llm.get(name)
    log(f"{name}: LLM rerank of {args.rerank_instances} training instances by {rel(ranker or llm)}")
    folders["llm-rank"], record["teachers"]["llm-rank"] = export(
        args, ranker or llm, dataset, work / "teacher-llm-rank", mode="rerank", sr_model=str(work / "sasrec-model"),
        sr_topm=SR_TOPM, num_random=NUM_RANDOM, template=None if ranker else "teacher",
        max_instances=args.rerank_instances)
    record["teachers"]["llm-rank"]["model"] = rel(ranker) if ranker else ZERO_SHOT_RANKER
    log(f"  {record['teachers']['llm-rank']}")

    per_user = {}
    for variant in args.variants:
        label, teachers, method, embedding = VARIANTS[variant]
        record["runs"][variant] = train_variant(name, dataset, args, variant, [folders[t] for t in teachers])
        per_user[variant] = per_user_ndcg(work / f"student-{variant}", dataset)
    if "alone" in per_user:
        base = record["runs"]["alone"]["test"]["ndcg@20"]
        for variant in per_user:
            if variant != "alone":
                run = record["runs"][variant]
                run["gain_test_ndcg@20"] = round(run["test"]["ndcg@20"] / base - 1, 4) if base else None
                run["paired"] = paired_gain(per_user[variant], per_user["alone"])
    return record


# ----------------------------------------------------------------------------- latency

STUDENT_PATHS = {"batch1": "eager, one user per call", "compiled-batch1": "compiled, one user per call",
                 "batched": "eager, batched", "compiled-batched": "compiled, batched"}


def student_latency(student: Path, instances) -> dict:
    """The student's top-K per user, eager torch and AOT-compiled (`delrec sr compile`), one user per
    call and all users in one batch."""
    from delrec.sr.compiled import CompiledTopK
    from delrec.sr.evaluate import top_k
    from delrec.sr import load_model

    model = load_model(student)
    histories = [inst.history for inst in instances]
    # compiled as a user would, by the command in its own process (inductor's compile-time state, left in
    # this process, made the timed calls ~20% slower)
    compile_seconds = _timed(lambda: subprocess.run([sys.executable, "-m", "delrec", "sr", "compile", "--model",
                                                     str(student), "--topk", str(LATENCY_K)], check=True,
                                                    stdout=subprocess.DEVNULL, cwd=ROOT))
    compiled = CompiledTopK.load(student, LATENCY_K)
    paths = {"": lambda batch: top_k(model, batch, LATENCY_K, True, len(batch), False), "compiled_": compiled.top_k}
    timings = {}
    for prefix, rank in paths.items():
        rank(histories)  # warm-up
        timings[f"{prefix}batched_seconds"] = round(min(_timed(lambda: rank(histories)) for _ in range(3)), 5)
        timings[f"{prefix}batch1_seconds"] = round(min(_timed(lambda: [rank([h]) for h in histories])
                                                       for _ in range(3)), 5)
    return {"parameters": sum(p.numel() for p in model.parameters()), **timings, "users": len(histories),
            "compile_seconds": round(compile_seconds, 1)}


def _timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def llm_latency(args, llm: Path, dataset, instances, work: Path) -> dict:
    import torch

    from delrec.distill.teacher_export import GROUNDING_TASK, TeacherExportConfig, rerank_candidates
    from delrec.ranking.teacher_signals import embed_texts, ground, rerank
    from delrec.llm.tokenization import encode_completion, encode_prompt
    from delrec.ranking.base import backend_module
    from delrec.ranking.models import describe_model, ranking_template

    module = backend_module("hf")
    spec = describe_model(str(llm), GROUNDING_TASK)
    template = ranking_template(spec)
    config = TeacherExportConfig(model=str(llm), data=str(dataset.path), out=str(work / "unused"), topk=LATENCY_K,
                                 mode="rerank", sr_model=str(work / "sasrec-model"), sr_topm=SR_TOPM,
                                 num_random=NUM_RANDOM, template=GROUNDING_TASK, seed=args.seed, progress=False)
    candidate_sets, _ = rerank_candidates(config, dataset, instances, "cpu")
    with module.open_backend(spec, hf_options(args)) as backend:
        flops = FlopModel(backend.model.config)
        began = time.perf_counter()
        titles = embed_texts(backend.model, backend.tokenizer, dataset.titles, backend.batch_size)
        title_seconds = time.perf_counter() - began
        prompts, generated = [], []
        score = backend.score
        generate = backend.generate

        def recorded_score(texts, candidates):
            prompts.extend(encode_prompt(backend.tokenizer, t) for t in texts)
            return score(texts, candidates)

        def recorded_generate(texts, budget):
            out = generate(texts, budget)
            generated.extend((encode_prompt(backend.tokenizer, t), encode_prompt(backend.tokenizer, o))
                             for t, o in zip(texts, out))
            return out

        backend.score, backend.generate = recorded_score, recorded_generate
        rerank_seconds = _timed(lambda: rerank(config, dataset, instances, candidate_sets, spec, template, backend))
        grounding = TeacherExportConfig(model=str(llm), data=str(dataset.path), out=str(work / "unused"),
                                        topk=LATENCY_K, mode="grounding", progress=False)
        ground_seconds = _timed(lambda: ground(grounding, dataset, instances, spec, template, backend, titles))
        candidate_ids = [[encode_completion(backend.tokenizer, dataset.titles[i]) for i in c] for c in candidate_sets]
        rerank_flops = scoring_flops(flops, prompts, candidate_ids)
        ground_flops = sum(flops.tokens(len(p)) + sum(flops.tokens(1, len(p) + j) + flops.logits(1)
                                                     for j in range(len(o) + 1)) + flops.tokens(len(o) or 1)
                           for p, o in generated)
        parameters = sum(p.numel() for p in backend.model.parameters())
    text = getattr(backend.model.config, "text_config", backend.model.config)
    rate = max(gemm_rates([args.dtype], flops.hidden, text.intermediate_size, flops.vocab)[args.dtype].values()) * 1e9
    users = len(instances)
    return {"parameters": parameters, "dtype": args.dtype, "users": users, "threads": torch.get_num_threads(),
            "title_embedding_seconds": round(title_seconds, 2),
            "rerank": {"seconds_per_user": round(rerank_seconds / users, 4),
                       "floor_seconds_per_user": round(rerank_flops / rate / users, 4),
                       "gflop_per_user": round(rerank_flops / users / 1e9, 2)},
            "grounding": {"seconds_per_user": round(ground_seconds / users, 4),
                          "floor_seconds_per_user": round(ground_flops / rate / users, 4),
                          "gflop_per_user": round(ground_flops / users / 1e9, 2)},
            "gemm_gflops": round(rate / 1e9, 1)}


def run_latency(name: str, args, llm: Path) -> dict:
    dataset, _ = ensure_data(name)
    work = WORK / name
    if not (work / "sasrec-model" / "config.json").is_file():  # the rerank candidates come from it
        train_sr_teacher(name, dataset, args)
    students = [work / f"student-{v}" for v in ("llm-both", "llm-emb", "alone")]
    if not any((s / "config.json").is_file() for s in students):  # every variant has the same architecture
        train_variant(name, dataset, args, "alone", [])
    student = next(s for s in students if (s / "config.json").is_file())
    instances = dataset.instances("test")[: args.latency_users]
    log(f"latency on {name}: student on {len(instances)} users, LLM on {args.llm_latency_users}")
    small = student_latency(student, instances)
    large = llm_latency(args, llm, dataset, instances[: args.llm_latency_users], work)
    per_user = {kind: small[f"{kind.replace('-', '_')}_seconds"] / small["users"] for kind in STUDENT_PATHS}
    ratios = {f"{mode}/{kind}": round(large[mode]["seconds_per_user"] / per_user[kind], 1)
              for mode in ("rerank", "grounding") for kind in per_user}
    return {"dataset": name, "student_model": rel(student), "student": small, "llm": large,
            "student_seconds_per_user": {k: round(v, 7) for k, v in per_user.items()}, "ratios": ratios}


# ----------------------------------------------------------------------------- report


def marks(json_path: Path) -> tuple[str, str]:
    """The RESULTS.md block a results file owns: `<!-- distill_real -->` for the default one."""
    return f"<!-- {json_path.stem} -->", f"<!-- /{json_path.stem} -->"


def markdown_section(report: dict, json_path: Path) -> str:
    m = report["machine"]
    scales = report["settings"].get("weight_search", [1.0])
    searched = len(scales) > 1
    begin, end = marks(json_path)
    lines = [
        begin,
        "## The real LLM as teacher: Gemma 3 270M -> SASRec students (issue #14)"
        + (": distillation weight chosen on valid (issue #32)" if searched else ""),
        "",
        "Commands (in order; later runs redo their datasets and keep the others): "
        + "; ".join(f"`{c}`" for c in report.get("commands", [report["command"]])) + "  ",
        f"Date: {report['finished']} (UTC); {report['wall_minutes']:.1f} min in all. Machine: {m['nproc']} CPUs, "
        f"{m['cpu_model']}; torch {m['torch']}; {report['settings']['threads']} torch thread(s); LLM in "
        f"{report['settings']['dtype']} (HF backend), zero-shot (`{report['settings']['llm']}`).",
        "",
        f"Teachers: LLM item embeddings = last-layer last-token state of every title; LLM ranking = rerank of the "
        f"SASRec teacher's top-{SR_TOPM} + {NUM_RANDOM} random items (by the model and template each dataset's "
        f"'Ranking teacher' names), top-{TOPK}, on a seeded subset of the training instances (how many: per "
        f"dataset below; the others train on the student's own loss); SASRec teacher = SASRec 64x2 CE, top-{TOPK} "
        "over all items + item table, every instance. "
        "Students: SASRec 32x1, BCE with one negative, same seed and epochs in every variant; best epoch on VALID "
        "NDCG@10; full ranking, history excluded. Verdict: paired per-user test NDCG@20 difference against the "
        "student alone, outside two standard errors or not. "
        + (f"Distillation weights: x{', x'.join(f'{s:g}' for s in scales)} the papers' (the method's weight and "
           "ed_weight; x0 = the student alone), one student each, the best valid NDCG@10 kept (`weight_search`)."
           if searched else "Distillation weights: the papers' (fixed)."),
        "",
    ]
    for name, record in report["datasets"].items():
        d = record["data"]
        emb, rank = record["teachers"]["llm-emb"], record["teachers"]["llm-rank"]
        lines += [f"**{name}** ({d['items']} items, {d['train_instances']} training instances, {d['test_instances']} "
                  f"test users; students {record['budget']['student_epochs']} epochs). LLM embeddings of every title: "
                  f"{emb['seconds']} s{knn_clause(emb.get('embedding_knn'))}; LLM rerank of {rank['rows']} instances: "
                  f"{rank['seconds']} s "
                  f"({rank['instances_per_second']} instances/s; target in the LLM's top-{TOPK}: "
                  f"{rank['target_in_topk']:.1%}, among the re-ranked candidates {rank['target_in_candidates']:.1%}). "
                  f"Ranking teacher: {rank.get('model', ZERO_SHOT_RANKER)}.",
                  "",
                  "| student | test HR@20 | test NDCG@20 | NDCG@20 gain | paired diff ± 2 SE | verdict | best epoch |"
                  + (" weight kept (valid NDCG@10 per scale) |" if searched else ""),
                  "|---|---:|---:|---:|---:|---|---:|" + ("---|" if searched else "")]
        for variant, run in record["runs"].items():
            if variant == "sasrec-model":
                lines.append(f"| ({run['label']}) | {run['test']['hr@20']:.4f} | {run['test']['ndcg@20']:.4f} | | | | "
                             f"{run['best_epoch']} |" + (" |" if searched else ""))
                continue
            gain = run.get("gain_test_ndcg@20")
            paired = run.get("paired")
            gain_text = "" if gain is None else f"{gain:+.1%}"
            paired_text = f"{paired['mean_diff']:+.4f} ± {paired['two_se']:.4f}" if paired else ""
            search = run.get("weight_search")
            tried = ", ".join(f"x{r['scale']:g}: {r['valid']:.4f}" for r in search["runs"]) if search else ""
            kept = (f" x{search['chosen']:g} ({tried}) |" if search else " |") if searched else ""
            lines.append(f"| {run['label']} | {run['test']['hr@20']:.4f} | {run['test']['ndcg@20']:.4f} | {gain_text} | "
                         f"{paired_text} | {paired['verdict'] if paired else ''} | {run['best_epoch']} |" + kept)
        lines.append("")
    lat = report.get("latency")
    if lat:
        s, llm = lat["student"], lat["llm"]
        per = lat["student_seconds_per_user"]
        lines += [
            f"**Latency** ({lat['dataset']}, top-{LATENCY_K}): the student ({s['parameters']:,} parameters, torch "
            f"alone) on {s['users']} test users, per user: "
            + ", ".join(f"{per[kind] * 1e6:,.1f} µs {label}" for kind, label in STUDENT_PATHS.items() if kind in per)
            + f" (compiled: `delrec sr compile`, AOTInductor, {s.get('compile_seconds', '?')} s once). "
            f"The LLM ({llm['parameters']:,} parameters, {llm['dtype']}, "
            f"{llm['threads']} threads) on the first {llm['users']} of them; title embeddings computed beforehand "
            f"({llm['title_embedding_seconds']} s). Floor = useful FLOPs / {llm['gemm_gflops']} GFLOP/s (this "
            "machine's best GEMM rate in that dtype).",
            "",
            "| LLM read-out | s / user | floor s / user | measured / floor | GFLOP / user | "
            + " | ".join(f"vs student {label}" for kind, label in STUDENT_PATHS.items() if kind in per) + " |",
            "|---|---:|---:|---:|---:|" + "---:|" * sum(kind in per for kind in STUDENT_PATHS),
        ]
        for mode in ("rerank", "grounding"):
            r = llm[mode]
            lines.append(f"| {mode} | {r['seconds_per_user']:.3f} | {r['floor_seconds_per_user']:.3f} | "
                         f"{r['seconds_per_user'] / r['floor_seconds_per_user']:.1f}x | {r['gflop_per_user']} | "
                         + " | ".join(f"{lat['ratios'][f'{mode}/{kind}']:,.0f}x" for kind in STUDENT_PATHS
                                      if kind in per) + " |")
        lines.append("")
    lines += [report["verdict"], "", end]
    return "\n".join(lines) + "\n"


def verdict(report: dict) -> str:
    parts = []
    for name, record in report["datasets"].items():
        runs = record["runs"]
        llm_best = max((v for v in ("llm-emb", "llm-emb-mean", "llm-rank", "llm-both") if v in runs),
                       key=lambda v: runs[v].get("gain_test_ndcg@20") or -1, default=None)
        if llm_best:
            gain = runs[llm_best]["gain_test_ndcg@20"]
            goal = "met" if gain is not None and gain >= 0.2 else "NOT met"
            parts.append(f"{name}: best LLM-taught student {runs[llm_best]['label']} {gain:+.1%} test NDCG@20 "
                         f"({runs[llm_best]['paired']['verdict']}), goal +20% {goal}")
        if "llm+sasrec" in runs and "sasrec" in runs:
            best_single = max(runs[v]["test"]["ndcg@20"] for v in ("sasrec", "llm-emb", "llm-emb-mean", "llm-rank",
                                                                   "llm-both") if v in runs)
            together = runs["llm+sasrec"]["test"]["ndcg@20"]
            parts.append(f"{name}: LLM + SASRec {together:.4f} vs best single teacher {best_single:.4f} "
                         f"({'at least as good' if together >= best_single else 'worse'})")
    if report.get("latency"):
        ratios = report["latency"]["ratios"]
        for kind, label in STUDENT_PATHS.items():
            if f"rerank/{kind}" in ratios:
                ratio = min(ratios[f"{mode}/{kind}"] for mode in ("rerank", "grounding"))
                parts.append(f"latency, student {label}: at least {ratio:,.0f}x faster per user than the LLM (goal "
                             f"10^4: {'met' if ratio >= 1e4 else 'NOT met'})")
    return "Verdict: " + "; ".join(parts) + "."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--datasets", default="lastfm,games", help="comma-separated, from benchmarks/distill.py's datasets")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"students, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--llm", type=Path, default=None, help="an LLM folder (default: Gemma 3 270M, imported once)")
    p.add_argument("--rank-llm", dest="rank_llm", action="append", default=[], metavar="DATASET=FOLDER",
                   help="a fine-tuned LLM folder (e.g. a stage-2 model) as DATASET's ranking teacher, with its own "
                        "template; repeatable (default: --llm, zero-shot, template teacher)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="the LLM's dtype")
    p.add_argument("--rerank-instances", dest="rerank_instances", type=int, default=600,
                   help="training instances (seeded subset) the LLM re-ranks as ranking teacher")
    p.add_argument("--llm-batch", dest="llm_batch", type=int, default=16, help="titles / prompts per LLM forward")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the SR teacher and the students")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--latency-dataset", dest="latency_dataset", default="games",
                   help="the dataset whose test users are timed")
    p.add_argument("--latency-users", dest="latency_users", type=int, default=1000, help="users the student ranks")
    p.add_argument("--llm-latency-users", dest="llm_latency_users", type=int, default=10,
                   help="the first of those users the LLM ranks (seconds each)")
    p.add_argument("--no-latency", dest="latency", action="store_false",
                   help="skip the latency comparison (with --keep-other-datasets the earlier one is kept)")
    p.add_argument("--latency-only", dest="latency_only", action="store_true",
                   help="time the latency comparison alone and keep every dataset's rows of --json (it trains the "
                        "SASRec teacher and a student first when the work folder lacks them)")
    p.add_argument("--keep-other-datasets", dest="keep_other_datasets", action="store_true",
                   help="keep the finished datasets of --json that this run does not redo")
    p.add_argument("--weight-search", dest="weight_search", type=float, nargs="+", default=[1.0],
                   help="scales of the papers' distillation weights each student tries, the best valid NDCG@10 kept "
                        "(`delrec student train --weight_search`; default 1: the papers' fixed weights, one run)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "distill_real.json",
                   help="results file; its name also names the RESULTS.md block (another name keeps the default's)")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    args.dataset_names = [n for n in args.datasets.split(",") if n]
    args.variants = [v for v in args.variants.split(",") if v]
    pairs = [entry.partition("=") for entry in args.rank_llm]
    if any(not sep or not folder for _, sep, folder in pairs):
        p.error("--rank-llm takes DATASET=FOLDER, e.g. --rank-llm lastfm=benchmarks/out/delrec_real/lora_hybrid/stage2")
    args.rank_llm = {name: Path(folder) for name, _, folder in pairs}
    bad_rankers = sorted(set(args.rank_llm) - set(args.dataset_names))
    if bad_rankers:
        p.error(f"--rank-llm names {', '.join(bad_rankers)}, which is not among --datasets")
    bad = [n for n in args.dataset_names if n not in DATASETS] + [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown dataset or variant: {', '.join(bad)}")
    if args.latency_only:
        if not args.latency:
            p.error("--latency-only and --no-latency contradict each other")
        args.dataset_names, args.keep_other_datasets = [], True
    elif args.latency and args.latency_dataset not in args.dataset_names:
        p.error(f"--latency-dataset {args.latency_dataset} is not among --datasets (or pass --no-latency)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    llm = ensure_llm(args)
    report = {"benchmark": "distill_real",
              "command": "python benchmarks/distill_real.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "settings": {"llm": rel(llm), "dtype": args.dtype, "rerank_instances": args.rerank_instances,
                           "rank_llm": {n: rel(f) for n, f in args.rank_llm.items()},
                           "threads": args.threads, "seed": args.seed, "teacher_model": TEACHER,
                           "student_model": STUDENT, "variants": args.variants,
                           "weight_search": args.weight_search},
              "datasets": {}}
    if args.keep_other_datasets and args.json.is_file():  # e.g. re-run games only, keep Last.fm's finished rows
        previous = json.loads(args.json.read_text())
        kept = {n: r for n, r in previous.get("datasets", {}).items() if n not in args.dataset_names}
        report["datasets"].update(kept)
        report["settings"]["kept_from_earlier_run"] = {n: previous.get("started") for n in kept}
        report["commands"] = previous.get("commands", [previous["command"]]) + [report["command"]]
        if not args.latency and previous.get("latency"):
            report["latency"] = previous["latency"]
    for name in args.dataset_names:
        report["datasets"][name] = run_dataset(name, args, llm)
        write_json(args.json, report)  # partial results survive an interruption
    if args.latency:
        report["latency"] = run_latency(args.latency_dataset, args, llm)
    report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    report["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
    report["verdict"] = verdict(report)
    write_json(args.json, report)
    write_section(args.markdown, markdown_section(report, args.json), *marks(args.json))
    print(report["verdict"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
