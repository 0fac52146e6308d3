"""RUN/report.md and RUN/report/table.md: the final table, what each stage did, timings per stage and the
config, around the verdicts and the plots."""

from __future__ import annotations

import platform
from pathlib import Path

from delrec.io import atomic_write, read_json
from delrec.metrics import CANDIDATE_KEYS, above_chance
from delrec.pipeline.layout import CONFIG_COPY, REPORT_FILE, RUN_FILE, STAGES
from delrec.pipeline.report.collect import VARIANT_NAMES, Results, collect, run_file, stage_outputs, student_label
from delrec.pipeline.report.plots import PLOTS_DIR, make_plots
from delrec.pipeline.report.verdicts import arrow_lines, verdict_lines

TABLE_FILE = "table.md"


def _cell(values: dict | None, key: str) -> str:
    return "–" if values is None else f"{values[key]:.3f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 1 else f"{value:,.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table padded to aligned columns, so it reads in a terminal too."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def final_table(results: Results) -> str:
    """The one table: every model on the candidate protocol and on full ranking, and top-K latency."""
    k = results.full_k
    topk = (results.latency or {}).get("topk", k)
    header = ["model", "HR@1", "HR@5", "NDCG@5", f"HR@{k}", f"NDCG@{k}", f"top-{topk} ms/user"]
    rows = [[r.label, *(_cell(r.candidates, key) for key in CANDIDATE_KEYS),
             _cell(r.full, f"hr@{k}"), _cell(r.full, f"ndcg@{k}"), _ms(r.ms_per_user)] for r in results.rows]
    ranked = {r.instances for r in results.rows if r.kind == "llm"}
    subset = (f" The LLM rows rank the first {min(ranked)} of the {results.users} users."
              if len(ranked) == 1 and results.users and min(ranked) < results.users else "")
    notes = (f"HR@1, HR@5, NDCG@5: {results.split} split, {results.candidates} fixed candidates per user (the "
             f"candidate protocol every model is scored on). HR@{k}, NDCG@{k}: {results.split} split, full ranking over "
             f"the whole catalogue, history items excluded (LLMs: not computed). ms/user: top-{topk} over the whole "
             f"catalogue, per user (LLM: its teacher export; student: timed on the test users).{subset}")
    return markdown_table(header, rows) + "\n\n" + notes


def _stage_details(results: Results) -> list[str]:
    run = results.run
    lines = []
    data = stage_outputs(results, "data")
    if data:
        stats = data.get("stats", {})
        lines.append(f"- **data**: {stats.get('users', '?')} users, {stats.get('items', '?')} items; instances "
                     f"{stats.get('instances', {})}; {data.get('num_candidates')} fixed candidates per valid/test "
                     "user; "
                     f"fingerprint `{data.get('fingerprint')}` (`{data.get('dataset')}`).")
    for name, model in stage_outputs(results, "sr").get("models", {}).items():
        m = read_json(run_file(run, model["folder"], "metrics.json"))
        lines.append(f"- **sr / {name}** ({model['model_type']}): {m['epochs_run']} epochs, best epoch "
                     f"{m['best_epoch']} "
                     f"by valid NDCG@10 ({m['valid']['ndcg@10']:.4f}), {m['train_seconds']:.1f} s training.")
    llm = stage_outputs(results, "llm")
    if llm.get("built"):
        lines.append(f"- **llm**: tiny {llm.get('arch')} built here, {llm.get('parameters', 0) / 1e6:.2f} M "
                     "parameters, "
                     f"vocabulary {llm.get('vocab_size')}, pre-trained {llm.get('pretrain_steps')} steps on the "
                     f"training histories (loss {llm.get('first_loss')} -> {llm.get('final_loss')}).")
    elif llm:
        lines.append(f"- **llm**: `{llm.get('model')}` used as it is.")
    stage1 = stage_outputs(results, "stage1").get("folder")
    if stage1:
        m = read_json(run_file(run, stage1, "metrics.json"))
        after, before = m.get("valid") or {}, m.get("valid_before_training") or {}
        counts = {entry["task"]: entry["instances"] for entry in m["instances"]["valid"]}
        parts = []
        for task, label, key in (("rps", "RPS agreement", "rps_agreement"), ("ta", "TA accuracy", "ta_accuracy")):
            if key in after:
                above, margin = above_chance(after[key], after[f"{task}_chance"], counts[task])
                verdict = "clearly above" if above else "not clearly above"
                parts.append(f"{label} {before.get(key, float('nan')):.3f} -> {after[key]:.3f} over {counts[task]} "
                             f"instances (chance {after[f'{task}_chance']:.3f}, {verdict} it: 2 standard errors = "
                             f"{margin:.3f})")
        lines.append(f"- **stage1**: {m.get('global_step')} steps; on valid, before -> after training: "
                     + "; ".join(parts) + ". RPS agreement clearly above chance would be the evidence that the SR "
                     "model's pattern reached the soft prompt.")
    ranked = bool(stage_outputs(results, "rank").get("runs"))
    for variant, entry in stage_outputs(results, "stage2").get("variants", {}).items():
        m = read_json(run_file(run, entry["folder"], "metrics.json"))
        before, after = m.get("valid_before_training") or {}, m.get("valid") or {}
        test = ("the rank stage scores its test users" if ranked else  # stage 2's own test pass may be a token one
                f"test HR@1 {m['test']['hr@1']:.3f} on {m['instances']['test']['instances']} users")
        lines.append(f"- **stage2 / {variant}** ({VARIANT_NAMES[variant]}): {m.get('global_step')} steps on "
                     f"{m['instances']['train']['instances']} instances; valid NDCG@5 "
                     f"{before.get('ndcg@5', float('nan')):.3f} before -> {after.get('ndcg@5', float('nan')):.3f} at "
                     f"the best checkpoint (evaluated on {m['instances']['valid']['instances']} valid users; the "
                     f"Trainer keeps the best saved step); {test}.")
    for name, entry in stage_outputs(results, "rank").get("runs", {}).items():
        m = read_json(run_file(run, entry["folder"], "metrics.json"))
        lines.append(f"- **rank / {name}**: {m['instances']} {m['dataset']['split']} instances, read-out "
                     f"{m['readout']['name']}, {m['instances_per_second']} instances/s ({m['backend'].get('name')}).")
    for name, entry in stage_outputs(results, "teacher").get("teachers", {}).items():
        info = read_json(run_file(run, entry["folder"], "teacher.json"))
        source = info.get("source") or {}
        lines.append(f"- **teacher / {name}** (`{entry['model']}`, {source.get('kind')}): top-{info['topk']} of all "
                     f"items for {info['num_instances']} training instances in {info.get('seconds')} s; the target is "
                     f"in the top-{info['topk']} for {source.get('target_in_topk', float('nan')):.1%} of them"
                     + _knn_clause(source.get("embedding_knn")) + ".")
    for name, entry in stage_outputs(results, "students").get("runs", {}).items():
        m = read_json(run_file(run, entry["folder"], "metrics.json"))
        lines.append(f"- **students / {name}** ({student_label(entry, entry['model_type'])}): {m['epochs_run']} "
                     f"epochs, best epoch {m['best_epoch']} by valid NDCG@10 ({m['valid']['ndcg@10']:.4f})"
                     + _weight_search_clause(m["distillation"].get("weight_search")) + ".")
    latency = results.latency
    if latency:
        student = latency["student"]
        text = (f"- **latency**: student `{student['name']}` ranks {student['users']} test users in "
                f"{student['seconds'] * 1000:.1f} ms (median of {student['repeats']}, {student['threads']} thread(s))")
        if latency.get("llm"):
            llm_t = latency["llm"]
            text += (f"; LLM teacher `{llm_t['teacher']}` ({llm_t['kind']}) took {llm_t['seconds']:.1f} s for "
                     f"{llm_t['users']} training instances during its export; ratio {latency['ratio']:,.0f}x")
        lines.append(text + ".")
    return lines


def _knn_clause(knn: dict | None) -> str:
    if not knn:
        return ""
    return (f"; its item embeddings put the {knn['split']} target among the {knn['k']} items nearest to the last "
            f"history item for {knn['hit_rate']:.1%} of {knn['users']} users (chance {knn['chance']:.1%})")


def _weight_search_clause(search: dict | None) -> str:
    """The distillation weight the student kept, of those it tried, and why."""
    if not search:
        return ""
    tried = ", ".join(f"x{r['scale']:g} ({r['valid']:.4f})" for r in search["runs"])
    return f"; distillation weight x{search['chosen']:g} kept, of {tried} by valid {search['metric']}: {search['why']}"


def _timings(results: Results) -> str:
    rows = []
    total = 0.0
    for stage in STAGES:
        record = results.records.get(stage)
        if record is None or record.get("status") == "running":  # the report stage itself
            continue
        seconds = record.get("seconds")
        total += seconds or 0.0
        rows.append([stage, record.get("status") or "", "–" if seconds is None else f"{seconds:.1f}",
                     (record.get("finished") or "")[:19].replace("T", " ")])
    rows.append(["total (this report's stages)", "", f"{total:.1f}", ""])
    return markdown_table(["stage", "status", "seconds", "finished (UTC)"], rows)


def write_report(run: str | Path, full_k: int = 20) -> list[Path]:
    """Write RUN/report.md, RUN/report/table.md and the plots; return the files written under RUN/report/."""
    import torch

    results = collect(run, full_k)
    results.verdicts, results.arrows = verdict_lines(results), arrow_lines(results)
    run = results.run
    plots = make_plots(results)
    table = final_table(results)
    table_path = run / PLOTS_DIR / TABLE_FILE
    with atomic_write(table_path) as handle:
        handle.write(table + "\n")
    summary = read_json(run / RUN_FILE) if (run / RUN_FILE).is_file() else {}
    config = (run / CONFIG_COPY).read_text(encoding="utf-8") if (run / CONFIG_COPY).is_file() else ""
    lines = [
        f"# delrec run report: {run.name}",
        "",
        "What each arrow of the loop added, each against two standard errors of its own sample:",
        "",
        *([f"- {line}" for line in results.arrows] or ["- (no arrow of the loop ran)"]),
        "",
        f"Config `{summary.get('config', '?')}`, run folder `{run}`, delrec {summary.get('delrec_version', '?')}, "
        f"started {str(summary.get('started', '?'))[:19].replace('T', ' ')} UTC on {platform.node() or 'this machine'} "
        f"({platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}).",
        "",
        "The loop: prepare data -> train SR models -> their predictions -> the LLM -> DELRec stage 1 (a soft prompt "
        "distilled from the SR model) -> stage 2 (LoRA, with and without that soft prompt) -> ranking -> teacher "
        "export -> students trained alone and distilled from the teachers -> latency.",
        "",
        "## Results",
        "",
        table,
        "",
        *[f"- {v}" for v in results.verdicts],
        "",
        "An LLM fine-tuned for minutes on a CPU (the tiny one, or a small pretrained one) can sit at chance level; "
        "the lines above say so when it does. The SR models see every item id; the LLM sees only titles.",
        "",
        "## What each stage did",
        "",
        *_stage_details(results),
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.relative_to(run)})" for p in plots],
        "",
        "## Timings per stage",
        "",
        "Seconds of the run that produced each stage's current output (a skipped stage keeps its earlier time).",
        "",
        _timings(results),
        "",
        "## Configuration",
        "",
        "```yaml",
        config.rstrip(),
        "```",
        "",
        "## Files",
        "",
        "Each stage's folder holds its outputs, `stage.json` (content hash, inputs, configuration, times, status) and "
        "`stage.log` (its own output); `run.json` summarises the last `delrec run`.",
        "",
    ]
    with atomic_write(run / REPORT_FILE) as handle:
        handle.write("\n".join(lines))
    return [*plots, table_path]
