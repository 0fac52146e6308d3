"""The report's verdicts: each LLM against chance, each student against the student alone, and what each arrow
of the loop added, every one decided against two standard errors of its own sample (`delrec.metrics`)."""

from __future__ import annotations

from pathlib import Path

from delrec.io import read_json, read_jsonl
from delrec.metrics import above_chance, paired_difference
from delrec.pipeline.report.collect import Results, Row, candidate_chance, run_file, stage_outputs


def _per_instance_ndcg5(path: Path):
    """Per instance NDCG@5 of a rankings.jsonl (rank = the target's position; absent = a miss)."""
    from delrec.metrics import instance_metrics

    greater = []
    for _, row in read_jsonl(path):
        items = row.get("items") or []
        greater.append(items.index(row["target"]) if row["target"] in items else 5)
    return instance_metrics(greater, [0] * len(greater), ks=(5,), metrics=("ndcg",))["ndcg@5"]


def _alone(results: Results) -> Row | None:
    return next((r for r in results.rows if r.kind == "student" and r.label.endswith(" alone")), None)


def _student_gain(row: Row, alone: Row, k: int, split: str) -> str:
    """A student against the student alone: NDCG@k, its relative gain and the paired per-user verdict."""
    base, value = alone.full[f"ndcg@{k}"], row.full[f"ndcg@{k}"]
    gain = (value - base) / base * 100 if base > 0 else float("nan")
    paired = paired_difference(row.per_user, alone.per_user)
    return (f"NDCG@{k} {value:.4f} vs {base:.4f} alone ({gain:+.1f}%); paired per-user difference "
            f"{paired.difference:+.4f} is {'within' if paired.verdict == 'within noise' else 'beyond'} the noise of "
            f"{paired.n} {split} users (2 standard errors {paired.margin:.4f})")


def arrow_lines(results: Results) -> list[str]:
    """Per arrow of the loop, what it added, each against two standard errors of its own sample: SR -> soft prompt
    (stage 1's valid RPS agreement against chance), soft prompt -> LLM (the same LLM with and without it, paired on
    the rank stage's users), LLM -> student (each LLM-taught student against the student alone, paired per user)."""
    lines = []
    stage1 = stage_outputs(results, "stage1").get("folder")
    if stage1:
        m = read_json(run_file(results.run, stage1, "metrics.json"))
        after, before = m.get("valid") or {}, m.get("valid_before_training") or {}
        counts = {entry["task"]: entry["instances"] for entry in m["instances"]["valid"]}
        if "rps_agreement" in after:
            above, margin = above_chance(after["rps_agreement"], after["rps_chance"], counts["rps"])
            lines.append(f"SR -> soft prompt (stage 1): the LLM reading the soft prompt agrees with the SR model's top-1 "
                         f"on {after['rps_agreement']:.3f} of {counts['rps']} valid instances (before training "
                         f"{before.get('rps_agreement', float('nan')):.3f}, chance {after['rps_chance']:.3f}): "
                         + ("the pattern reached the soft prompt" if above else "NOT distinguishable from chance")
                         + f" (2 standard errors = {margin:.3f}).")
    runs = stage_outputs(results, "rank").get("runs", {})
    with_soft, without = runs.get("stage1/hf"), runs.get("none/hf")
    if with_soft and without:
        a = _per_instance_ndcg5(run_file(results.run, with_soft["folder"], "rankings.jsonl"))
        b = _per_instance_ndcg5(run_file(results.run, without["folder"], "rankings.jsonl"))
        paired = paired_difference(a.tolist(), b.tolist())
        verdict = {"better": "helped", "worse": "hurt"}.get(paired.verdict, "made no measurable difference")
        lines.append(f"Soft prompt -> LLM (stage 2): the distilled soft prompt, against none (same LLM, same stage-2 "
                     f"budget), {verdict}: paired NDCG@5 difference {paired.difference:+.3f}, 2 standard errors "
                     f"{paired.margin:.3f}, {paired.n} {results.split} instances.")
    alone = _alone(results)
    for row in results.rows:
        if row.kind == "student" and row.llm_taught and alone is not None:
            search = row.weight_search
            kept = (f"; the distillation weight kept on valid: x{search['chosen']:g} ({search['why']})"
                    if search else "")
            lines.append(f"LLM -> student: {row.label}: {_student_gain(row, alone, results.full_k, results.split)}"
                         f"{kept}.")
    return lines


def verdict_lines(results: Results) -> list[str]:
    lines = []
    chance = candidate_chance(results.candidates)["hr@1"] if results.candidates else None
    for row in results.rows:
        if row.kind != "llm" or chance is None or not row.instances:
            continue
        above, margin = above_chance(row.candidates["hr@1"], chance, row.instances)
        lines.append(f"{row.label}: HR@1 {row.candidates['hr@1']:.3f} vs chance {chance:.3f} over {row.instances} "
                     f"instances: {'above chance' if above else 'NOT distinguishable from chance'} "
                     f"(2 standard errors = {margin:.3f}).")
    k = results.full_k
    alone = _alone(results)
    for row in results.rows:
        if row.kind == "student" and row is not alone and alone is not None:
            lines.append(f"{row.label}: {_student_gain(row, alone, k, results.split)}.")
    ratio = (results.latency or {}).get("ratio")
    if ratio:
        lines.append(f"Latency: the student ranks the whole catalogue {ratio:,.0f}x faster per user than the LLM "
                     f"teacher ({results.latency['student']['ms_per_user']:.3f} ms vs "
                     f"{results.latency['llm']['ms_per_user']:.1f} ms).")
    return lines
