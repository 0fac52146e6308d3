"""The run folder read back: each stage's stage.json and the files its outputs point at, as the rows of the
final table (SR models, LLM variants, students, chance level) and the latency measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from delrec.io import read_json
from delrec.metrics import CANDIDATE_KEYS
from delrec.pipeline.layout import STAGE_FILE, STAGES
from delrec.predictions import display_name

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


def stage_outputs(results: Results, stage: str) -> dict:
    return (results.records.get(stage) or {}).get("outputs") or {}


def run_file(run: Path, relative: str, name: str) -> Path:
    return run / relative / name


def sr_label(name: str, model_type: str) -> str:
    display = display_name(model_type)
    return display if name == model_type else f"{display} ({name})"


def student_label(run: dict, model_type: str) -> str:
    student = f"student {display_name(model_type)}"
    if run["method"] == "none" and not run["embedding_distillation"]:
        return f"{student} alone"
    parts = [METHOD_NAMES.get(run["method"], run["method"])] if run["method"] != "none" else []
    if run["embedding_distillation"]:
        parts.append("embedding distillation")
    return f"{student} + {' + '.join(parts)} (teacher: {', '.join(run['teachers'])})"


def _pick(values: dict | None, keys) -> dict | None:
    return None if values is None else {k: values[k] for k in keys}


def _chance(rankable: list[int], ks: tuple[int, ...]) -> dict:
    """Expected HR/NDCG of a scorer that ties every item: each instance's target tied with its `rankable - 1`
    others (`delrec.metrics` scores ties at their exact expectation, i.e. a random ranking)."""
    from delrec.metrics import instance_metrics

    values = instance_metrics([0] * len(rankable), [n - 1 for n in rankable], ks=ks, metrics=("hr", "ndcg"))
    return {key: float(value.mean()) for key, value in values.items()}


def candidate_chance(c: int) -> dict:
    return _pick(_chance([c], (1, 5)), CANDIDATE_KEYS)


def _full_chance(run: Path, data: dict, split: str, k: int) -> dict:
    """A random ranking of the items outside each history (the target always rankable): HR@K and NDCG@K."""
    from delrec.data.dataset import PreparedDataset

    dataset = PreparedDataset.load(run / data["dataset"])
    rankable = [dataset.num_items - len(set(inst.history) - {inst.target}) for inst in dataset.instances(split)]
    return _chance(rankable, (k,))


def collect(run: str | Path, full_k: int = 20) -> Results:
    """Read the run folder into the rows of the final table (`verdicts` judges them)."""
    run = Path(run)
    records = {s: read_json(run / s / STAGE_FILE) for s in STAGES if (run / s / STAGE_FILE).is_file()}
    results = Results(run, full_k, records)
    full_keys = (f"hr@{full_k}", f"ndcg@{full_k}")
    data = stage_outputs(results, "data")
    results.candidates = data.get("num_candidates")
    latency_file = stage_outputs(results, "latency").get("file")
    results.latency = read_json(run / latency_file) if latency_file else None
    latency = results.latency or {}
    runs = stage_outputs(results, "rank").get("runs", {})
    ranked = {name: read_json(run_file(run, entry["folder"], "metrics.json")) for name, entry in runs.items()}
    results.split = next((m["dataset"]["split"] for m in ranked.values()), "test")
    split = results.split
    results.users = (data.get("stats") or {}).get("instances", {}).get(split)

    for name, model in stage_outputs(results, "sr").get("models", {}).items():
        metrics = read_json(run_file(run, model["folder"], "metrics.json"))
        results.rows.append(Row(sr_label(name, model["model_type"]), "sr",
                                _pick(metrics["candidates"][split], CANDIDATE_KEYS), _pick(metrics[split], full_keys)))
    teacher_variant = None
    if latency.get("llm"):
        reference = (stage_outputs(results, "teacher").get("teachers", {}).get(latency["llm"]["teacher"], {})
                     .get("model", ""))
        teacher_variant = reference.partition("/")[2] if reference.startswith("stage2/") else None
    backends = {r["backend"] for r in runs.values()}
    for name, entry in runs.items():
        metrics = ranked[name]
        label = VARIANT_NAMES[entry["variant"]] + (f" [{entry['backend']}]" if len(backends) > 1 else "")
        timed = entry["variant"] == teacher_variant and entry["backend"] == "hf"
        results.rows.append(Row(label, "llm", _pick(metrics[split], CANDIDATE_KEYS), None,
                                latency["llm"]["ms_per_user"] if timed else None, metrics["instances"]))
    timed_student = (latency.get("student") or {}).get("name")
    teachers = stage_outputs(results, "teacher").get("teachers", {})
    for name, entry in stage_outputs(results, "students").get("runs", {}).items():
        metrics = read_json(run_file(run, entry["folder"], "metrics.json"))
        results.rows.append(Row(student_label(entry, entry["model_type"]), "student",
                                _pick(metrics["candidates"][split], CANDIDATE_KEYS), _pick(metrics[split], full_keys),
                                latency["student"]["ms_per_user"] if name == timed_student else None,
                                per_user=_per_user_ndcg(run, entry["folder"], data, split, full_k),
                                llm_taught=any((teachers.get(t) or {}).get("mode") not in (None, "sr")
                                               for t in entry["teachers"]),
                                weight_search=metrics["distillation"].get("weight_search")))
    if results.candidates and data:
        results.rows.append(Row("random (chance level)", "chance", candidate_chance(results.candidates),
                                _full_chance(run, data, split, full_k)))
    return results


def _per_user_ndcg(run: Path, folder: str, data: dict, split: str, k: int) -> list[float]:
    """A student's NDCG@k per user of `split` (full ranking, history excluded, as its metrics.json)."""
    from delrec.data.dataset import PreparedDataset
    from delrec.sr import load_model
    from delrec.sr.evaluate import per_instance_full

    dataset = PreparedDataset.load(run / data["dataset"])
    return per_instance_full(load_model(run / folder, "cpu"), dataset.instances(split), k)[f"ndcg@{k}"].tolist()
