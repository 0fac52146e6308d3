"""RUN/report.md: what a pipeline run did and what came of it, read back from the files its stages wrote.

Written by the pipeline's last stage (`delrec.pipeline`); it reads only the run folder: each
RUN/<stage>/stage.json (status, seconds, outputs) and the files the outputs point at (metrics.json,
log.jsonl, trainer_log.jsonl, rankings.jsonl, teacher.json, latency.json) plus RUN/config.yaml.
It writes RUN/report.md, RUN/report/table.md (the final table alone, which `delrec demo` prints)
and PNG plots under RUN/report/ (matplotlib, Agg backend: no display needed):

- training curves per stage: SR models and students (loss, valid NDCG@10 per epoch), stage 1
  (task losses, RPS agreement and TA accuracy per step), stage 2 (loss, valid NDCG@5 per step);
- metric bars per model: the candidate protocol, and full ranking;
- latency bars: top-K over the whole catalogue per user, student vs LLM (log scale).

Honesty rules: every metric is shown next to its chance level, and the verdicts (LLM above chance,
soft prompt helped, distillation helped) are decided against the noise of the number of test
instances, so a tiny model at chance level is reported as such.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from delrec.io import atomic_write, read_json, read_jsonl
from delrec.metrics import CANDIDATE_KEYS, above_chance, paired_difference
from delrec.pipeline.layout import CONFIG_COPY, REPORT_FILE, RUN_FILE, STAGE_FILE, STAGES, TRAINER_LOG
from delrec.predictions import display_name

PLOTS_DIR = "report"
TABLE_FILE = "table.md"
METHOD_NAMES = {"dllm2rec": "DLLM2Rec", "rd": "RD", "rrd": "RRD"}
VARIANT_NAMES = {"stage1": "LLM + distilled soft prompt (DELRec)", "none": "LLM, no soft prompt (plain prompt)",
                 "random": "LLM + random soft prompt"}


@dataclass
class Row:
    """One line of the final table; None where a protocol does not apply."""

    label: str
    kind: str  # sr, llm, student, chance
    candidates: dict | None = None
    full: dict | None = None
    ms_per_user: float | None = None
    instances: int | None = None
    per_user: list[float] | None = None  # students: NDCG@full_k of each user of the split, for paired verdicts
    llm_taught: bool = False  # students: distilled from an LLM teacher (the loop's last arrow)
    weight_search: dict | None = None  # students: the distillation weight kept on valid


@dataclass
class Results:
    """Everything the report shows, read from the run folder."""

    run: Path
    full_k: int
    records: dict[str, dict]
    rows: list[Row] = field(default_factory=list)
    candidates: int | None = None  # C, per valid/test user
    split: str = "test"  # the split the table reports (the rank stage's)
    users: int | None = None  # instances of that split
    latency: dict | None = None
    verdicts: list[str] = field(default_factory=list)
    arrows: list[str] = field(default_factory=list)  # what each arrow of the loop added, the report's first lines


def _outputs(results: Results, stage: str) -> dict:
    return (results.records.get(stage) or {}).get("outputs") or {}


def _file(run: Path, relative: str, name: str) -> Path:
    return run / relative / name


def _read_log(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)] if path.is_file() else []


def _sr_label(name: str, model_type: str) -> str:
    display = display_name(model_type)
    return display if name == model_type else f"{display} ({name})"


def _student_label(run: dict, model_type: str) -> str:
    student = f"student {display_name(model_type)}"
    if run["method"] == "none" and not run["embedding_distillation"]:
        return f"{student} alone"
    parts = [METHOD_NAMES.get(run["method"], run["method"])] if run["method"] != "none" else []
    if run["embedding_distillation"]:
        parts.append("embedding distillation")
    return f"{student} + {' + '.join(parts)} (teacher: {', '.join(run['teachers'])})"


def _knn_clause(knn: dict | None) -> str:
    if not knn:
        return ""
    return (f"; its item embeddings put the {knn['split']} target among the {knn['k']} items nearest to the last "
            f"history item for {knn['hit_rate']:.1%} of {knn['users']} users (chance {knn['chance']:.1%})")


def _pick(values: dict | None, keys) -> dict | None:
    return None if values is None else {k: values[k] for k in keys}


def _chance(rankable: list[int], ks: tuple[int, ...]) -> dict:
    """Expected HR/NDCG of a scorer that ties every item: each instance's target tied with its `rankable - 1`
    others (`delrec.metrics` scores ties at their exact expectation, i.e. a random ranking)."""
    from delrec.metrics import instance_metrics

    values = instance_metrics([0] * len(rankable), [n - 1 for n in rankable], ks=ks, metrics=("hr", "ndcg"))
    return {key: float(value.mean()) for key, value in values.items()}


def _candidate_chance(c: int) -> dict:
    return _pick(_chance([c], (1, 5)), CANDIDATE_KEYS)


def _full_chance(run: Path, data: dict, split: str, k: int) -> dict:
    """A random ranking of the items outside each history (the target always rankable): HR@K and NDCG@K."""
    from delrec.data.dataset import PreparedDataset

    dataset = PreparedDataset.load(run / data["dataset"])
    rankable = [dataset.num_items - len(set(inst.history) - {inst.target}) for inst in dataset.instances(split)]
    return _chance(rankable, (k,))


def collect(run: str | Path, full_k: int = 20) -> Results:
    """Read the run folder into the rows of the final table and the verdicts."""
    run = Path(run)
    records = {s: read_json(run / s / STAGE_FILE) for s in STAGES if (run / s / STAGE_FILE).is_file()}
    results = Results(run, full_k, records)
    full_keys = (f"hr@{full_k}", f"ndcg@{full_k}")
    data = _outputs(results, "data")
    results.candidates = data.get("num_candidates")
    latency_file = _outputs(results, "latency").get("file")
    results.latency = read_json(run / latency_file) if latency_file else None
    latency = results.latency or {}
    runs = _outputs(results, "rank").get("runs", {})
    ranked = {name: read_json(_file(run, entry["folder"], "metrics.json")) for name, entry in runs.items()}
    results.split = next((m["dataset"]["split"] for m in ranked.values()), "test")
    split = results.split
    results.users = (data.get("stats") or {}).get("instances", {}).get(split)

    for name, model in _outputs(results, "sr").get("models", {}).items():
        metrics = read_json(_file(run, model["folder"], "metrics.json"))
        results.rows.append(Row(_sr_label(name, model["model_type"]), "sr",
                                _pick(metrics["candidates"][split], CANDIDATE_KEYS), _pick(metrics[split], full_keys)))
    teacher_variant = None
    if latency.get("llm"):
        reference = _outputs(results, "teacher").get("teachers", {}).get(latency["llm"]["teacher"], {}).get("model", "")
        teacher_variant = reference.partition("/")[2] if reference.startswith("stage2/") else None
    backends = {r["backend"] for r in runs.values()}
    for name, entry in runs.items():
        metrics = ranked[name]
        label = VARIANT_NAMES[entry["variant"]] + (f" [{entry['backend']}]" if len(backends) > 1 else "")
        timed = entry["variant"] == teacher_variant and entry["backend"] == "hf"
        results.rows.append(Row(label, "llm", _pick(metrics[split], CANDIDATE_KEYS), None,
                                latency["llm"]["ms_per_user"] if timed else None, metrics["instances"]))
    timed_student = (latency.get("student") or {}).get("name")
    teachers = _outputs(results, "teacher").get("teachers", {})
    for name, entry in _outputs(results, "students").get("runs", {}).items():
        metrics = read_json(_file(run, entry["folder"], "metrics.json"))
        results.rows.append(Row(_student_label(entry, entry["model_type"]), "student",
                                _pick(metrics["candidates"][split], CANDIDATE_KEYS), _pick(metrics[split], full_keys),
                                latency["student"]["ms_per_user"] if name == timed_student else None,
                                per_user=_per_user_ndcg(run, entry["folder"], data, split, full_k),
                                llm_taught=any((teachers.get(t) or {}).get("mode") not in (None, "sr")
                                               for t in entry["teachers"]),
                                weight_search=metrics["distillation"].get("weight_search")))
    if results.candidates and data:
        results.rows.append(Row("random (chance level)", "chance", _candidate_chance(results.candidates),
                                _full_chance(run, data, split, full_k)))
    results.verdicts = _verdicts(results)
    results.arrows = _arrows(results)
    return results


def _per_user_ndcg(run: Path, folder: str, data: dict, split: str, k: int) -> list[float]:
    """A student's NDCG@k per user of `split` (full ranking, history excluded, as its metrics.json)."""
    from delrec.data.dataset import PreparedDataset
    from delrec.sr import load_model
    from delrec.sr.evaluate import per_instance_full

    dataset = PreparedDataset.load(run / data["dataset"])
    return per_instance_full(load_model(run / folder, "cpu"), dataset.instances(split), k)[f"ndcg@{k}"].tolist()


# ----------------------------------------------------------------------------- verdicts


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


def _arrows(results: Results) -> list[str]:
    """Per arrow of the loop, what it added, each against two standard errors of its own sample: SR -> soft prompt
    (stage 1's valid RPS agreement against chance), soft prompt -> LLM (the same LLM with and without it, paired on
    the rank stage's users), LLM -> student (each LLM-taught student against the student alone, paired per user)."""
    lines = []
    stage1 = _outputs(results, "stage1").get("folder")
    if stage1:
        m = read_json(_file(results.run, stage1, "metrics.json"))
        after, before = m.get("valid") or {}, m.get("valid_before_training") or {}
        counts = {entry["task"]: entry["instances"] for entry in m["instances"]["valid"]}
        if "rps_agreement" in after:
            above, margin = above_chance(after["rps_agreement"], after["rps_chance"], counts["rps"])
            lines.append(f"SR -> soft prompt (stage 1): the LLM reading the soft prompt agrees with the SR model's top-1 "
                         f"on {after['rps_agreement']:.3f} of {counts['rps']} valid instances (before training "
                         f"{before.get('rps_agreement', float('nan')):.3f}, chance {after['rps_chance']:.3f}): "
                         + ("the pattern reached the soft prompt" if above else "NOT distinguishable from chance")
                         + f" (2 standard errors = {margin:.3f}).")
    runs = _outputs(results, "rank").get("runs", {})
    with_soft, without = runs.get("stage1/hf"), runs.get("none/hf")
    if with_soft and without:
        a = _per_instance_ndcg5(_file(results.run, with_soft["folder"], "rankings.jsonl"))
        b = _per_instance_ndcg5(_file(results.run, without["folder"], "rankings.jsonl"))
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


def _verdicts(results: Results) -> list[str]:
    lines = []
    chance = _candidate_chance(results.candidates)["hr@1"] if results.candidates else None
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


# ----------------------------------------------------------------------------- the table


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


# ----------------------------------------------------------------------------- plots


def _figure(columns: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=(6 * columns, 4), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def _epoch_curves(run: Path, folders: dict[str, str], path: Path, title: str) -> Path | None:
    """Loss and valid NDCG@10 per epoch of SR models or students (their log.jsonl)."""
    logs = {label: _read_log(_file(run, folder, "log.jsonl")) for label, folder in folders.items()}
    logs = {label: log for label, log in logs.items() if log}
    if not logs:
        return None
    plt, fig, (left, right) = _figure(2)
    for label, log in logs.items():
        epochs = [e["epoch"] for e in log]
        if any(e.get("loss") is None for e in log):  # counted, not trained (popularity): a reference line
            right.axhline(log[-1]["valid"]["ndcg@10"], linestyle=":", color="grey", label=label)
            continue
        left.plot(epochs, [e["loss"] for e in log], marker="o", label=label)
        right.plot(epochs, [e["valid"]["ndcg@10"] for e in log], marker="o", label=label)
    _labels(left, f"{title}: training loss", "epoch", "loss")
    _labels(right, f"{title}: valid NDCG@10 (full ranking)", "epoch", "NDCG@10")
    return _save(plt, fig, path)


def _labels(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _step_curves(logs: dict[str, list[dict]], losses: list[str], evals: list[str], chance: dict[str, float],
                 path: Path, title: str) -> Path | None:
    """Trainer log histories: losses per step (left), evaluation metrics per step (right)."""
    if not any(logs.values()):
        return None
    plt, fig, (left, right) = _figure(2)
    for label, log in logs.items():
        for key in losses:
            points = [(e["step"], e[key]) for e in log if key in e and "step" in e]
            if points:
                left.plot(*zip(*points), marker=".", label=f"{label} {key}" if len(logs) > 1 else key)
        for key in evals:
            points = [(e["step"], e[f"eval_{key}"]) for e in log if f"eval_{key}" in e]
            if points:
                right.plot(*zip(*points), marker="o", label=f"{label} {key}" if len(logs) > 1 else key)
    for key, value in chance.items():
        right.axhline(value, linestyle="--", color="grey", linewidth=1)
        right.annotate(f"chance {key}", (0, value), fontsize=7, color="grey", va="bottom")
    _labels(left, f"{title}: training loss (answer tokens)", "step", "loss")
    _labels(right, f"{title}: valid metrics", "step", "value")
    return _save(plt, fig, path)


def _bars(groups: list[str], series: dict[str, list[float]], path: Path, title: str, ylabel: str,
          chance: dict[str, float] | None = None, log: bool = False) -> Path | None:
    if not groups:
        return None
    plt, fig, (ax,) = _figure(1)
    fig.set_size_inches(max(7, 1.3 * len(groups) + 3), 4.5)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(positions, values, width, label=name)
        if chance and name in chance:
            ax.axhline(chance[name], linestyle="--", linewidth=1, color=bars.patches[0].get_facecolor())
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    _labels(ax, title, "", ylabel)
    return _save(plt, fig, path)


def make_plots(results: Results) -> list[Path]:
    run, folder = results.run, results.run / PLOTS_DIR
    written = []
    sr = {_sr_label(n, m["model_type"]): m["folder"] for n, m in _outputs(results, "sr").get("models", {}).items()}
    written.append(_epoch_curves(run, sr, folder / "sr_training.png", "SR models"))
    students = {n: e["folder"] for n, e in _outputs(results, "students").get("runs", {}).items()}
    written.append(_epoch_curves(run, students, folder / "students_training.png", "students"))
    stage1 = _outputs(results, "stage1").get("folder")
    if stage1:
        metrics = read_json(_file(run, stage1, "metrics.json"))
        chance = {k: metrics["valid"][f"{t}_chance"] for k, t in (("rps", "rps"), ("ta", "ta"))
                  if f"{t}_chance" in metrics["valid"]}
        written.append(_step_curves({"stage 1": _read_log(_file(run, stage1, TRAINER_LOG))},
                                    ["loss", "loss_ta", "loss_rps"], ["rps_agreement", "ta_accuracy"], chance,
                                    folder / "stage1_training.png", "stage 1 (soft prompt)"))
    variants = _outputs(results, "stage2").get("variants", {})
    if variants:
        logs = {v: _read_log(_file(run, e["folder"], TRAINER_LOG)) for v, e in variants.items()}
        chance = {"hr@1": _candidate_chance(results.candidates)["hr@1"]} if results.candidates else {}
        written.append(_step_curves(logs, ["loss"], ["ndcg@5", "hr@1"], chance, folder / "stage2_training.png",
                                    "stage 2 (LoRA)"))
    scored = [r for r in results.rows if r.candidates and r.kind != "chance"]
    chance_row = next((r for r in results.rows if r.kind == "chance"), None)
    written.append(_bars([r.label for r in scored], {k: [r.candidates[k] for r in scored] for k in CANDIDATE_KEYS},
                         folder / "candidate_metrics.png",
                         f"{results.split}: {results.candidates} fixed candidates per user (dashed: chance level)",
                         "value", chance_row.candidates if chance_row else None))
    k = results.full_k
    full = [r for r in results.rows if r.full and r.kind != "chance"]
    keys = (f"hr@{k}", f"ndcg@{k}")
    written.append(_bars([r.label for r in full], {key: [r.full[key] for r in full] for key in keys},
                         folder / "full_ranking.png", f"{results.split}: full ranking (dashed: chance level)", "value",
                         chance_row.full if chance_row else None))
    latency = results.latency or {}
    if latency.get("llm"):
        written.append(_bars(["student", "LLM teacher"], {"ms per user": [latency["student"]["ms_per_user"],
                                                                          latency["llm"]["ms_per_user"]]},
                             folder / "latency.png", f"top-{latency['topk']} over the whole catalogue: ms per user",
                             "ms per user (log scale)", log=True))
    return [p for p in written if p is not None]


# ----------------------------------------------------------------------------- report.md


def _stage_details(results: Results) -> list[str]:
    run = results.run
    lines = []
    data = _outputs(results, "data")
    if data:
        stats = data.get("stats", {})
        lines.append(f"- **data**: {stats.get('users', '?')} users, {stats.get('items', '?')} items; instances "
                     f"{stats.get('instances', {})}; {data.get('num_candidates')} fixed candidates per valid/test "
                     "user; "
                     f"fingerprint `{data.get('fingerprint')}` (`{data.get('dataset')}`).")
    for name, model in _outputs(results, "sr").get("models", {}).items():
        m = read_json(_file(run, model["folder"], "metrics.json"))
        lines.append(f"- **sr / {name}** ({model['model_type']}): {m['epochs_run']} epochs, best epoch "
                     f"{m['best_epoch']} "
                     f"by valid NDCG@10 ({m['valid']['ndcg@10']:.4f}), {m['train_seconds']:.1f} s training.")
    llm = _outputs(results, "llm")
    if llm.get("built"):
        lines.append(f"- **llm**: tiny {llm.get('arch')} built here, {llm.get('parameters', 0) / 1e6:.2f} M "
                     "parameters, "
                     f"vocabulary {llm.get('vocab_size')}, pre-trained {llm.get('pretrain_steps')} steps on the "
                     f"training histories (loss {llm.get('first_loss')} -> {llm.get('final_loss')}).")
    elif llm:
        lines.append(f"- **llm**: `{llm.get('model')}` used as it is.")
    stage1 = _outputs(results, "stage1").get("folder")
    if stage1:
        m = read_json(_file(run, stage1, "metrics.json"))
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
    ranked = bool(_outputs(results, "rank").get("runs"))
    for variant, entry in _outputs(results, "stage2").get("variants", {}).items():
        m = read_json(_file(run, entry["folder"], "metrics.json"))
        before, after = m.get("valid_before_training") or {}, m.get("valid") or {}
        test = ("the rank stage scores its test users" if ranked else  # stage 2's own test pass may be a token one
                f"test HR@1 {m['test']['hr@1']:.3f} on {m['instances']['test']['instances']} users")
        lines.append(f"- **stage2 / {variant}** ({VARIANT_NAMES[variant]}): {m.get('global_step')} steps on "
                     f"{m['instances']['train']['instances']} instances; valid NDCG@5 "
                     f"{before.get('ndcg@5', float('nan')):.3f} before -> {after.get('ndcg@5', float('nan')):.3f} at "
                     f"the best checkpoint (evaluated on {m['instances']['valid']['instances']} valid users; the "
                     f"Trainer keeps the best saved step); {test}.")
    for name, entry in _outputs(results, "rank").get("runs", {}).items():
        m = read_json(_file(run, entry["folder"], "metrics.json"))
        lines.append(f"- **rank / {name}**: {m['instances']} {m['dataset']['split']} instances, read-out "
                     f"{m['readout']['name']}, {m['instances_per_second']} instances/s ({m['backend'].get('name')}).")
    for name, entry in _outputs(results, "teacher").get("teachers", {}).items():
        info = read_json(_file(run, entry["folder"], "teacher.json"))
        source = info.get("source") or {}
        lines.append(f"- **teacher / {name}** (`{entry['model']}`, {source.get('kind')}): top-{info['topk']} of all "
                     f"items for {info['num_instances']} training instances in {info.get('seconds')} s; the target is "
                     f"in the top-{info['topk']} for {source.get('target_in_topk', float('nan')):.1%} of them"
                     + _knn_clause(source.get("embedding_knn")) + ".")
    for name, entry in _outputs(results, "students").get("runs", {}).items():
        m = read_json(_file(run, entry["folder"], "metrics.json"))
        lines.append(f"- **students / {name}** ({_student_label(entry, entry['model_type'])}): {m['epochs_run']} "
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
