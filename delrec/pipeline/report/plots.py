"""The report's PNG plots under RUN/report/ (matplotlib, Agg backend: no display needed): training curves per
stage, metric bars per model with their chance levels, and top-K latency."""

from __future__ import annotations

from pathlib import Path

from delrec.io import atomic_write, read_json, read_jsonl
from delrec.metrics import CANDIDATE_KEYS
from delrec.pipeline.layout import TRAINER_LOG
from delrec.pipeline.report.collect import Results, candidate_chance, run_file, sr_label, stage_outputs

PLOTS_DIR = "report"


def _read_log(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)] if path.is_file() else []


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
    logs = {label: _read_log(run_file(run, folder, "log.jsonl")) for label, folder in folders.items()}
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
    sr = {sr_label(n, m["model_type"]): m["folder"] for n, m in stage_outputs(results, "sr").get("models", {}).items()}
    written.append(_epoch_curves(run, sr, folder / "sr_training.png", "SR models"))
    students = {n: e["folder"] for n, e in stage_outputs(results, "students").get("runs", {}).items()}
    written.append(_epoch_curves(run, students, folder / "students_training.png", "students"))
    stage1 = stage_outputs(results, "stage1").get("folder")
    if stage1:
        metrics = read_json(run_file(run, stage1, "metrics.json"))
        chance = {k: metrics["valid"][f"{t}_chance"] for k, t in (("rps", "rps"), ("ta", "ta"))
                  if f"{t}_chance" in metrics["valid"]}
        written.append(_step_curves({"stage 1": _read_log(run_file(run, stage1, TRAINER_LOG))},
                                    ["loss", "loss_ta", "loss_rps"], ["rps_agreement", "ta_accuracy"], chance,
                                    folder / "stage1_training.png", "stage 1 (soft prompt)"))
    variants = stage_outputs(results, "stage2").get("variants", {})
    if variants:
        logs = {v: _read_log(run_file(run, e["folder"], TRAINER_LOG)) for v, e in variants.items()}
        chance = {"hr@1": candidate_chance(results.candidates)["hr@1"]} if results.candidates else {}
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
