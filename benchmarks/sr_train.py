"""SR training benchmark (issue #3, item 6): our SR models and RecBole's SASRec, side by side.

    .venv/bin/python benchmarks/sr_train.py                      # games, 2 epochs each, RecBole included
    .venv/bin/python benchmarks/sr_train.py --epochs 3 --anchor-epochs 1 --models pop,sasrec-ce

Steps (all in one run, one after the other, so that timings are taken under the same conditions):

1. Prepares the raw games data (`--source`, RecBole atomic files) into `--data` with
   `delrec.data.loaders.load_raw` + `prepare_dataset` (default settings), unless it is there.
2. Trains each model of `--models` for `--epochs` epochs with `delrec.sr.train_sr`, each in its OWN
   subprocess (so the peak memory is that run's): pop, SASRec-CE, SASRec-BCE with 1 sampled
   negative (the comparison of Klenitskiy & Vasilev 2023), GRU4Rec-CE, Caser-CE. The best epoch is
   selected on VALIDATION NDCG@10 only (no early stop: patience 0); test is scored once, on it.
   SASRec-CE is first trained for `--anchor-epochs` epochs (evaluated: the equal-epoch figures),
   then resumed from its checkpoint up to `--epochs` (the trainer resumes exactly).
3. Runs RecBole 1.2.1's SASRec (`benchmarks/recbole_anchor.py` in `.venv-recbole`, set up with
   `benchmarks/setup_recbole.sh` if missing) on the same prepared split for `--anchor-epochs`
   epochs with the same hyper-parameters, and takes its best-valid model's figures re-scored
   under our protocol (`delrec_protocol`: all items, history items excluded).
4. Prints a table and writes `--json` and this benchmark's section of `--markdown` (only the
   block between `<!-- sr_train -->` and `<!-- /sr_train -->`; the rest of the file is kept).

Measured per run: training seconds per epoch (and with each epoch's validation), peak memory
(the trainer's figure: peak RSS of the process since training started; and the whole process's
RSS sampled every 0.2 s, the same for RecBole), valid/test HR@10 and NDCG@10 of the best-valid
epoch, and the CPU time other processes used meanwhile (from /proc/stat), to tell whether the
machine was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from results_section import write_section  # benchmarks/ is on sys.path when a benchmark runs as a script
from delrec.io import write_json

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- sr_train -->", "<!-- /sr_train -->"

# name -> (model type, model config overrides, train config overrides, label)
MODELS = {
    "pop": ("pop", {}, {}, "Pop"),
    "sasrec-ce": ("sasrec", {}, {"loss": "ce"}, "SASRec-CE"),
    "sasrec-bce1": ("sasrec", {}, {"loss": "bce", "num_negatives": 1}, "SASRec-BCE (1 neg)"),
    "gru4rec-ce": ("gru4rec", {}, {"loss": "ce"}, "GRU4Rec-CE"),
    "caser-ce": ("caser", {}, {"loss": "ce"}, "Caser-CE"),
}
DEFAULT_MODELS = "pop,sasrec-ce,sasrec-bce1,gru4rec-ce,caser-ce"
ANCHOR_AFTER = "sasrec-ce"  # RecBole runs right after this model, so the two are timed back to back
HEADLINE = ("hr@10", "ndcg@10")


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    return {
        "nproc": os.cpu_count(),
        "nproc_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, sum(fields)


class Sampler(threading.Thread):
    """Polls the child's resident memory (VmRSS) and the 1-minute load average."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.loads: list[float] = []
        self.stop = threading.Event()

    def run(self):
        next_load = 0.0
        while not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                        break
            except (OSError, ValueError):
                pass
            now = time.monotonic()
            if now >= next_load:
                try:
                    self.loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                except (OSError, ValueError):
                    pass
                next_load = now + 10.0
            self.stop.wait(self.interval)


def run_child(cmd: list[str], log_path: Path, env: dict, cwd: Path = ROOT) -> dict:
    """Run `cmd` (output to log_path); wall time, exit code, CPU time, peak RSS, others' CPU use."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = cpu_jiffies()
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    after = cpu_jiffies()
    child_cpu = usage.ru_utime + usage.ru_stime
    result = {
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(child_cpu, 2),
        "peak_rss_mb_sampled": round(sampler.peak_kb / 1024, 1),
        "loadavg_1min": {
            "mean": round(sum(sampler.loads) / len(sampler.loads), 2) if sampler.loads else None,
            "max": max(sampler.loads) if sampler.loads else None,
        },
        "log": str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path),
    }
    if before and after:
        tick = os.sysconf("SC_CLK_TCK")
        busy = (after[0] - before[0]) / tick
        # CPU time of everything else on the machine (this script's own polling is negligible)
        result["other_processes_cpu_seconds"] = round(max(busy - child_cpu, 0.0), 1)
        result["other_processes_cores_mean"] = round(max(busy - child_cpu, 0.0) / wall, 2) if wall else None
    return result


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- data


def ensure_prepared(source: Path, data: Path) -> dict:
    from delrec.data.dataset import PreparedDataset
    from delrec.data.loaders import load_raw
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig

    if (data / "meta.json").is_file():
        dataset = PreparedDataset.load(data)
        how = "existing"
    else:
        print(f"preparing {source} -> {data}", flush=True)
        dataset = prepare_dataset(load_raw("recbole", source), PreprocessConfig(), data)
        how = "prepared now (load_raw('recbole') + prepare_dataset, default PreprocessConfig)"
    stats = dataset.stats()
    return {
        "source": os.path.relpath(source, ROOT),
        "path": os.path.relpath(data, ROOT),
        "how": how,
        "fingerprint": dataset.fingerprint,
        "protocol": dataset.meta.get("protocol"),
        "users": stats.get("users"),
        "items": stats.get("items"),
        "interactions": stats.get("interactions"),
    }


# ----------------------------------------------------------------------------- one training (subprocess)


def worker(spec_file: Path) -> int:
    """Child process: train one model (in phases) with the library and write its figures."""
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(spec["threads"])
    from delrec.data.dataset import PreparedDataset
    from delrec.sr import CaserConfig, GRU4RecConfig, PopConfig, SASRecConfig, TrainConfig, train_sr

    config_class = {"sasrec": SASRecConfig, "gru4rec": GRU4RecConfig, "caser": CaserConfig, "pop": PopConfig}
    dataset = PreparedDataset.load(spec["data"])
    model_config = config_class[spec["model_type"]](**spec["model_config"])
    phases = []
    for epochs in spec["phases"]:
        train_config = TrainConfig(epochs=epochs, **spec["train_config"])
        started = time.perf_counter()
        result = train_sr(dataset, model_config, train_config, spec["out"])
        metrics = result.metrics
        log = [{k: v for k, v in entry.items()} for entry in result.log]
        phases.append({
            "epochs": epochs,
            "call_wall_seconds": round(time.perf_counter() - started, 2),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "seconds_per_epoch": result.seconds_per_epoch,
            "train_seconds": result.train_seconds,
            "eval_seconds_per_epoch": round(sum(e["eval_seconds"] for e in log) / len(log), 3),
            "peak_memory_mb": result.peak_memory_mb,
            "peak_memory_kind": metrics.get("peak_memory_kind"),
            "valid": metrics["valid"],
            "test": metrics["test"],
            "candidates": metrics.get("candidates"),
            "log": log,
        })
    out = {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "model_config": dataclass_dict(model_config),
        "train_config": metrics.get("train_config", {}),
        "phases": phases,
    }
    Path(spec["result"]).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


def dataclass_dict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def train_one(name: str, args, data: Path, run_dir: Path, env: dict) -> dict:
    model_type, model_overrides, train_overrides, label = MODELS[name]
    model_config = dict(model_overrides)
    if model_type == "sasrec":
        model_config["dropout"] = args.dropout
    train_config = {
        "batch_size": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "patience": 0,  # fixed epoch budget; the best epoch is still chosen on valid NDCG@10
        "device": "cpu",
        "progress": False,
        "num_threads": args.threads,
        **train_overrides,
    }
    phases = [args.epochs]
    if name == ANCHOR_AFTER and args.anchor_epochs and args.anchor_epochs < args.epochs:
        phases = [args.anchor_epochs, args.epochs]
    if model_type == "pop":
        phases = [1]
    out = run_dir / name
    shutil.rmtree(out, ignore_errors=True)
    spec = {
        "model_type": model_type,
        "model_config": model_config,
        "train_config": train_config,
        "phases": phases,
        "data": str(data),
        "out": str(out),
        "threads": args.threads,
        "result": str(run_dir / f"{name}.result.json"),
    }
    spec_file = run_dir / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    Path(spec["result"]).unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {' then '.join(map(str, phases))} epochs ...", flush=True)
    proc = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)],
                     run_dir / f"{name}.log", env)
    record = {"name": name, "label": label, "model_type": model_type, "process": proc}
    if proc["returncode"] != 0 or not Path(spec["result"]).is_file():
        record["error"] = f"exit code {proc['returncode']}; log tail:\n{tail(run_dir / f'{name}.log')}"
        print(f"  FAILED: {record['error']}", flush=True)
        return record
    child = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
    final = child["phases"][-1]
    record.update({
        "torch_threads": child["torch_threads"],
        "torch_interop_threads": child["torch_interop_threads"],
        "model_config": child["model_config"],
        "train_config": child["train_config"],
        **summarize_ours(final),
    })
    if len(child["phases"]) > 1:
        record["at_anchor_epochs"] = summarize_ours(child["phases"][0])
    print(f"  done in {proc['wall_seconds']:.0f} s: {final['seconds_per_epoch']:.1f} s/epoch, best epoch "
          f"{final['best_epoch']}, test NDCG@10 {final['test']['ndcg@10']:.4f}", flush=True)
    return record


def summarize_ours(phase: dict) -> dict:
    log = phase["log"]
    return {
        "epochs": phase["epochs_run"],
        "best_epoch": phase["best_epoch"],
        "seconds_per_epoch_train": phase["seconds_per_epoch"],
        "seconds_per_epoch_with_valid": round(sum(e["train_seconds"] + e["eval_seconds"] for e in log) / len(log), 3),
        "peak_memory_mb_trainer": phase["peak_memory_mb"],
        "valid": {k: round(phase["valid"][k], 6) for k in HEADLINE},
        "test": {k: round(phase["test"][k], 6) for k in HEADLINE},
        "valid_all": phase["valid"],
        "test_all": phase["test"],
        "candidates": phase.get("candidates"),
        "log": [{k: e[k] for k in ("epoch", "loss", "train_seconds", "eval_seconds", "peak_memory_mb")}
                | {"valid_ndcg@10": e["valid"]["ndcg@10"]} for e in log],
    }


# ----------------------------------------------------------------------------- RecBole anchor


def ensure_recbole(venv: Path, run_dir: Path) -> dict:
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import recbole, torch; print(recbole.__version__, torch.__version__)"]
    if python.is_file():
        probe = subprocess.run(check, capture_output=True, text=True)
        if probe.returncode == 0:
            return {"status": "present", "venv": str(venv), "versions": probe.stdout.strip()}
    print(f"setting up RecBole in {venv} (benchmarks/setup_recbole.sh) ...", flush=True)
    log = run_dir / "setup_recbole.log"
    with log.open("w", encoding="utf-8") as handle:
        setup = subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_recbole.sh"), str(venv)],
                               stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    probe = subprocess.run(check, capture_output=True, text=True) if python.is_file() else None
    if setup.returncode != 0 or probe is None or probe.returncode != 0:
        return {"status": "setup failed", "venv": str(venv), "setup_exit_code": setup.returncode,
                "log_tail": tail(log)}
    return {"status": "installed now", "venv": str(venv), "versions": probe.stdout.strip()}


def run_anchor(args, data: Path, run_dir: Path, env: dict) -> dict:
    setup = ensure_recbole(args.recbole_venv, run_dir)
    record = {"name": "recbole-sasrec", "label": "RecBole SASRec", "setup": setup}
    if setup["status"] == "setup failed":
        record["error"] = "RecBole could not be installed; see setup.log_tail"
        print(f"  RecBole setup FAILED:\n{setup['log_tail']}", flush=True)
        return record
    out = run_dir / "recbole-sasrec"
    shutil.rmtree(out, ignore_errors=True)
    anchor_args = [
        "--data", str(data), "--epochs", str(args.anchor_epochs), "--out", str(out),
        "--hidden", "64", "--inner", "256", "--layers", "2", "--heads", "2", "--max-len", "50",
        "--dropout", str(args.dropout), "--attn-dropout", str(args.dropout),
        "--batch", str(args.anchor_batch), "--lr", str(args.anchor_lr if args.anchor_lr is not None else args.lr),
        "--loss", "CE", "--seed", str(args.seed), "--threads", str(args.threads), "--device", "cpu",
    ]
    record["command"] = " ".join(
        [str(Path(args.recbole_venv, "bin", "python")), "benchmarks/recbole_anchor.py"] + anchor_args
    )
    print(f"[{time.strftime('%H:%M:%S')}] RecBole SASRec: {args.anchor_epochs} epochs ...", flush=True)
    proc = run_child([str(args.recbole_venv / "bin" / "python"), str(ROOT / "benchmarks" / "recbole_anchor.py")]
                     + anchor_args, run_dir / "recbole-sasrec.log", env)
    record["process"] = proc
    anchor_file = out / "anchor.json"
    if proc["returncode"] != 0 or not anchor_file.is_file():
        record["error"] = f"exit code {proc['returncode']}; log tail:\n{tail(run_dir / 'recbole-sasrec.log')}"
        print(f"  FAILED: {record['error']}", flush=True)
        return record
    anchor = json.loads(anchor_file.read_text(encoding="utf-8"))
    epochs = anchor["epochs"]
    record.update({
        "anchor_json": str(anchor_file.relative_to(ROOT) if anchor_file.is_relative_to(ROOT) else anchor_file),
        "recbole_version": anchor.get("recbole_version"),
        "torch_version": anchor.get("torch_version"),
        "torch_threads": anchor.get("torch_threads"),
        "epochs": len(epochs),
        "best_epoch": anchor["best_epoch"],
        "seconds_per_epoch_train": anchor["train_seconds_per_epoch"],
        "seconds_per_epoch_with_valid": round(
            sum(e["train_seconds"] + e.get("valid_seconds", 0.0) for e in epochs) / len(epochs), 3),
        "peak_memory_mb_trainer": None,
        "valid": {k: anchor["valid"]["delrec_protocol"][k] for k in HEADLINE},
        "test": {k: anchor["test"]["delrec_protocol"][k] for k in HEADLINE},
        "valid_all": anchor["valid"]["delrec_protocol"],
        "test_all": anchor["test"]["delrec_protocol"],
        "test_recbole_evaluator": anchor["test"]["recbole"],
        "split_check_identical": all(anchor["split_check"][s]["identical"] for s in ("valid", "test")),
        "train_rows": anchor["data"]["recbole_rows"]["train"],
        "recbole_config": {k: anchor["recbole_config"].get(k) for k in (
            "hidden_size", "inner_size", "n_layers", "n_heads", "hidden_dropout_prob", "attn_dropout_prob",
            "MAX_ITEM_LIST_LENGTH", "train_batch_size", "learning_rate", "loss_type", "seed")},
        "log": [{"epoch": e["epoch"], "loss": e.get("train_loss"), "train_seconds": e["train_seconds"],
                 "eval_seconds": e.get("valid_seconds"), "valid_ndcg@10_recbole_evaluator": e.get("valid_ndcg@10")}
                for e in epochs],
    })
    print(f"  done in {proc['wall_seconds']:.0f} s: {record['seconds_per_epoch_train']:.1f} s/epoch, best epoch "
          f"{record['best_epoch']}, test NDCG@10 {record['test']['ndcg@10']:.4f} (history excluded)", flush=True)
    return record


# ----------------------------------------------------------------------------- report


def ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def comparisons(runs: dict, args) -> dict:
    out = {}
    ce = runs.get("sasrec-ce")
    ok = lambda r: r is not None and "error" not in r  # noqa: E731
    if ok(ce):
        for other, key in (("pop", "vs_pop"), ("sasrec-bce1", "vs_bce_1neg")):
            if ok(runs.get(other)):
                o = runs[other]
                out[f"sasrec_ce_{key}"] = {
                    "test_ndcg@10": [ce["test"]["ndcg@10"], o["test"]["ndcg@10"]],
                    "relative_gain_test_ndcg@10": round(ce["test"]["ndcg@10"] / o["test"]["ndcg@10"] - 1, 4),
                    "relative_gain_valid_ndcg@10": round(ce["valid"]["ndcg@10"] / o["valid"]["ndcg@10"] - 1, 4),
                    "epochs": [ce["epochs"], o["epochs"]],
                }
    rb = runs.get("recbole-sasrec")
    if ok(ce) and ok(rb):
        equal = ce.get("at_anchor_epochs") if ce["epochs"] != rb["epochs"] else ce
        time_ratio = ratio(ce["seconds_per_epoch_train"], rb["seconds_per_epoch_train"])
        cmp = {
            "epochs_each": rb["epochs"],
            "time_per_epoch_ratio_train": time_ratio,
            "time_per_epoch_ratio_with_valid": ratio(ce["seconds_per_epoch_with_valid"],
                                                     rb["seconds_per_epoch_with_valid"]),
            "seconds_per_epoch_train": [ce["seconds_per_epoch_train"], rb["seconds_per_epoch_train"]],
            "seconds_per_epoch_with_valid": [ce["seconds_per_epoch_with_valid"], rb["seconds_per_epoch_with_valid"]],
            "peak_rss_mb_sampled": [ce["process"]["peak_rss_mb_sampled"], rb["process"]["peak_rss_mb_sampled"]],
            "goal": "at least RecBole's accuracy (test NDCG@10, equal epochs) at half its time per epoch "
                    "(ratio <= 0.5)",
        }
        if equal is not None:
            acc_ratio = ratio(equal["test"]["ndcg@10"], rb["test"]["ndcg@10"])
            cmp.update({
                "equal_epochs_test_ndcg@10": [equal["test"]["ndcg@10"], rb["test"]["ndcg@10"]],
                "equal_epochs_valid_ndcg@10": [equal["valid"]["ndcg@10"], rb["valid"]["ndcg@10"]],
                "equal_epochs_test_hr@10": [equal["test"]["hr@10"], rb["test"]["hr@10"]],
                "accuracy_ratio_test_ndcg@10": acc_ratio,
                "accuracy_ratio_valid_ndcg@10": ratio(equal["valid"]["ndcg@10"], rb["valid"]["ndcg@10"]),
                "goal_met": bool(acc_ratio is not None and acc_ratio >= 1.0 and time_ratio is not None
                                 and time_ratio <= 0.5),
            })
        out["sasrec_ce_vs_recbole"] = cmp
    return out


def fmt(value, digits=4):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(runs: dict, order: list[str]) -> list[list[str]]:
    rows = []

    def add(label, r):
        rows.append([
            label,
            str(r["epochs"]),
            fmt(r["best_epoch"]),
            fmt(r["seconds_per_epoch_train"], 1),
            fmt(r["seconds_per_epoch_with_valid"], 1),
            fmt(r.get("peak_memory_mb_trainer"), 0),
            fmt(r["process"]["peak_rss_mb_sampled"], 0),
            fmt(r["valid"]["ndcg@10"]), fmt(r["valid"]["hr@10"]),
            fmt(r["test"]["ndcg@10"]), fmt(r["test"]["hr@10"]),
        ])

    for name in order:
        r = runs.get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append([r["label"], "failed"] + ["–"] * 9)
            continue
        add(r["label"], r)
        if "at_anchor_epochs" in r:
            e = dict(r["at_anchor_epochs"])
            e["process"] = r["process"]
            add(f"{r['label']} after {e['epochs']} epochs (equal-epoch row)", e)
    return rows


HEADER = ["model", "epochs", "best ep", "s/epoch train", "s/epoch +valid", "peak MB (trainer)",
          "peak RSS MB (process)", "valid NDCG@10", "valid HR@10", "test NDCG@10", "test HR@10"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def pct(x):
    return "–" if x is None else f"{x * 100:+.1f}%"


def markdown_section(report: dict, rows: list[list[str]]) -> str:
    m, cmp, s = report["machine"], report["comparisons"], report["settings"]
    runs = report["runs"]
    shared = report["machine_shared"]
    lines = [
        MARK_BEGIN,
        "## SR training: our models vs RecBole SASRec (issue #3, item 6)",
        "",
        f"Command (from the repository root): `{report['command']}`  ",
        f"Date: {report['finished']} (UTC); total wall time {report['wall_minutes']:.1f} min.  ",
        f"Machine: {m['nproc']} CPUs (`nproc`), {m['cpu_model']}, {m['ram_gb']} GiB RAM; "
        f"torch {m['torch']} (RecBole venv: torch {runs.get('recbole-sasrec', {}).get('torch_version', '–')}, "
        f"recbole {runs.get('recbole-sasrec', {}).get('recbole_version', '–')}); "
        f"{s['threads']} torch threads in every run; CPU only.  ",
        f"Data: `{report['data']['source']}` prepared to `{report['data']['path']}` (fingerprint "
        f"{report['data']['fingerprint']}; {report['data']['users']} users, {report['data']['items']} items; "
        f"leave-one-out). Metrics: full ranking over all items, each instance's history items excluded, "
        f"ties at their expected rank; the best epoch is chosen on VALID NDCG@10, test is scored once on it.",
        "",
        markdown_table(rows),
        "",
        "s/epoch train: the training pass only; +valid: with that epoch's validation (ours: our full-ranking "
        "evaluator; RecBole: its own evaluator). peak MB (trainer): the library's figure (peak RSS of the "
        "process since training started); peak RSS MB (process): the whole process, sampled every 0.2 s "
        "(RecBole's includes its pandas data loading). Pop has no training loop: its 'epoch' is one counting "
        "pass. RecBole's valid/test figures are its best-valid model re-scored under our protocol "
        "(`delrec_protocol` in anchor.json).",
        "",
        "### Settings",
        "",
        f"- Ours: `delrec.sr.train_sr`, one subprocess per model, {s['epochs']} epochs, patience 0 (no early "
        f"stop), batch {s['batch']} SEQUENCES (each sequence predicts every next item: ~{s['predictions_per_batch']} "
        f"predictions per batch on games), Adam lr {s['lr']}, seed {s['seed']}; SASRec d=64, 2 layers, 2 heads, "
        f"inner 256, max len 50, dropout {s['dropout']} (pre-LN); GRU4Rec and Caser: library defaults "
        f"(= configs/sr/*.yaml). BCE: 1 uniformly sampled negative per position.",
        f"- RecBole 1.2.1 SASRec (`benchmarks/recbole_anchor.py`): {s['anchor_epochs']} epochs, d=64, 2 layers, "
        f"2 heads, inner 256, max len 50, CE, hidden and attention dropout {s['dropout']}, batch "
        f"{s['anchor_batch']} PREFIXES (one prediction each; {runs.get('recbole-sasrec', {}).get('train_rows', '–')} "
        f"training rows per epoch), Adam lr {s['anchor_lr']}, seed {s['seed']}; its own post-LN architecture. "
        f"RecBole picks its best epoch on its own valid NDCG@10 (history items NOT excluded).",
        f"- SASRec-CE was trained to {s['anchor_epochs']} epochs, evaluated (the equal-epoch row), then resumed "
        f"from its checkpoint to {s['epochs']} epochs in the same process.",
        "",
        "### Comparisons",
        "",
    ]
    rb = cmp.get("sasrec_ce_vs_recbole")
    if rb:
        lines += [
            "- **SASRec-CE vs RecBole SASRec** (measured side by side in this run, back to back). Goal: "
            "at least RecBole's accuracy at half its time per epoch.",
            f"  - time per epoch, training: {fmt(rb['seconds_per_epoch_train'][0], 1)} s vs "
            f"{fmt(rb['seconds_per_epoch_train'][1], 1)} s, ratio **{fmt(rb['time_per_epoch_ratio_train'], 3)}** "
            f"(with validation: {fmt(rb['seconds_per_epoch_with_valid'][0], 1)} s vs "
            f"{fmt(rb['seconds_per_epoch_with_valid'][1], 1)} s, "
            f"ratio {fmt(rb['time_per_epoch_ratio_with_valid'], 3)}).",
        ]
        if "equal_epochs_test_ndcg@10" in rb:
            lines += [
                f"  - test NDCG@10 after {rb['epochs_each']} epochs each: {fmt(rb['equal_epochs_test_ndcg@10'][0])} "
                f"vs {fmt(rb['equal_epochs_test_ndcg@10'][1])}, ratio **{fmt(rb['accuracy_ratio_test_ndcg@10'], 3)}** "
                f"(valid: {fmt(rb['equal_epochs_valid_ndcg@10'][0])} vs {fmt(rb['equal_epochs_valid_ndcg@10'][1])}; "
                f"test HR@10 {fmt(rb['equal_epochs_test_hr@10'][0])} vs {fmt(rb['equal_epochs_test_hr@10'][1])}).",
                f"  - goal met: **{'yes' if rb['goal_met'] else 'no'}**.",
            ]
    for key, text in (("sasrec_ce_vs_pop", "Pop"), ("sasrec_ce_vs_bce_1neg", "SASRec-BCE with 1 negative")):
        c = cmp.get(key)
        if c:
            lines.append(
                f"- SASRec-CE vs {text}: test NDCG@10 {fmt(c['test_ndcg@10'][0])} vs {fmt(c['test_ndcg@10'][1])}, "
                f"**{pct(c['relative_gain_test_ndcg@10'])}** (valid {pct(c['relative_gain_valid_ndcg@10'])})"
                + ("; Klenitskiy & Vasilev 2023 report +36% NDCG@10 on ML-1M at convergence, here both ran "
                   f"{c['epochs'][0]} epochs." if key.endswith("bce_1neg") else ".")
            )
    lines += ["", "### Machine load", ""]
    lines.append(
        "- Other processes' CPU use during each run (from /proc/stat, minus the run's own CPU time), in cores: "
        + ", ".join(f"{runs[n]['label']} {fmt(runs[n]['process'].get('other_processes_cores_mean'), 2)}"
                    for n in report["order"] if n in runs and "process" in runs[n]) + "."
    )
    if shared:
        lines.append(
            "- **The machine was shared**: other processes (another engineer's job) used CPU concurrently, so "
            "absolute seconds are inflated and noisy; the ratios were measured side by side in this one run "
            "(SASRec-CE and RecBole back to back), under the same conditions as far as one run allows."
        )
    else:
        lines.append("- The machine was otherwise idle during the runs (other processes below "
                     f"{SHARED_THRESHOLD} cores on average); the ratios were measured side by side in this one run.")
    lines += [
        "",
        f"Full figures (all metrics, per-epoch logs, settings): `{report['json']}`.",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


SHARED_THRESHOLD = 0.25  # cores used by other processes, on average, during a run


def rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="SR training benchmark: our SR models (one subprocess each) and RecBole's SASRec on the same "
        "prepared split, side by side; writes a JSON file and a section of benchmarks/RESULTS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "games",
                   help="raw games data (RecBole atomic files), prepared if --data does not hold a dataset")
    p.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "out" / "games", help="prepared dataset folder")
    p.add_argument("--run-dir", type=Path, default=ROOT / "benchmarks" / "out" / "sr_train",
                   help="per-run model folders, logs and RecBole's output (emptied per model)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--epochs", type=int, default=2,
                   help="training epochs of each of our models (2 keeps the default run, RecBole included, "
                   "near 45 min on 2 idle cores)")
    p.add_argument("--anchor-epochs", type=int, default=2,
                   help="RecBole SASRec epochs (~10+ min each on 2 cores); SASRec-CE is also evaluated after this "
                   "many epochs for the equal-epoch comparison; 0: skip RecBole")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of every run")
    p.add_argument("--batch", type=int, default=64, help="our batch size, in sequences")
    p.add_argument("--lr", type=float, default=2e-3, help="our Adam learning rate")
    p.add_argument("--dropout", type=float, default=0.2, help="SASRec dropout (ours and RecBole's hidden/attention)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anchor-batch", type=int, default=256, help="RecBole batch size, in prefixes")
    p.add_argument("--anchor-lr", type=float, default=None, help="RecBole learning rate (default: --lr)")
    p.add_argument("--recbole-venv", type=Path, default=ROOT / ".venv-recbole")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "sr_train.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md",
                   help="file whose sr_train section is (re)written")
    p.add_argument("--no-markdown", action="store_true", help="do not touch --markdown")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODELS]
        if unknown or not names:
            p.error(f"--models: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(MODELS)}")
        args.model_names = names
        if args.epochs < 1 or args.anchor_epochs < 0 or args.threads < 1:
            p.error("--epochs and --threads must be positive, --anchor-epochs non-negative")
        if args.anchor_epochs > args.epochs and "sasrec-ce" in names:
            p.error("--anchor-epochs must not exceed --epochs (SASRec-CE is evaluated after --anchor-epochs)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    started_wall = time.perf_counter()
    started = datetime.now(timezone.utc)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    data_info = ensure_prepared(args.source.resolve(), args.data.resolve())
    machine = machine_info()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    exe = Path(sys.executable).absolute()  # the venv's python, not the interpreter its symlink points to
    exe_text = str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe)
    command = " ".join([exe_text, "benchmarks/sr_train.py"]
                       + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    order = list(args.model_names)
    if args.anchor_epochs:
        at = order.index(ANCHOR_AFTER) + 1 if ANCHOR_AFTER in order else len(order)
        order.insert(at, "recbole-sasrec")
    mean_len = None
    try:
        from delrec.data.dataset import PreparedDataset

        train = PreparedDataset.load(args.data).instances("train")
        mean_len = sum(len(i.history) for i in train) / len(train)
    except Exception:  # only for the description of the batch size
        pass
    settings = {
        "epochs": args.epochs, "anchor_epochs": args.anchor_epochs, "threads": args.threads, "batch": args.batch,
        "lr": args.lr, "dropout": args.dropout, "seed": args.seed, "anchor_batch": args.anchor_batch,
        "anchor_lr": args.anchor_lr if args.anchor_lr is not None else args.lr, "patience": 0,
        "predictions_per_batch": round(args.batch * mean_len) if mean_len else None,
        "batch_units": {"ours": "sequences (every position predicts its next item)",
                        "recbole": "prefixes (one next-item prediction each)"},
    }
    report = {
        "benchmark": "sr_train", "command": command, "started": started.strftime("%Y-%m-%d %H:%M"),
        "machine": machine, "data": data_info, "settings": settings, "order": order, "runs": {},
        "json": rel(args.json),
    }
    print(f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}, {machine['ram_gb']} GiB; torch "
          f"{machine['torch']}; {args.threads} threads; order: {', '.join(order)}", flush=True)

    def finish(final: bool):
        report["comparisons"] = comparisons(report["runs"], args)
        report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
        report["wall_minutes"] = round((time.perf_counter() - started_wall) / 60, 2)
        others = [r["process"].get("other_processes_cores_mean") or 0.0
                  for r in report["runs"].values() if "process" in r]
        report["machine_shared"] = bool(others and max(others) >= SHARED_THRESHOLD)
        report["complete"] = final
        write_json(args.json, report)

    for name in order:
        if name == "recbole-sasrec":
            report["runs"][name] = run_anchor(args, args.data.resolve(), args.run_dir.resolve(), env)
        else:
            report["runs"][name] = train_one(name, args, args.data.resolve(), args.run_dir.resolve(), env)
        finish(final=False)  # partial results survive an interruption

    finish(final=True)
    rows = table_rows(report["runs"], order)
    print()
    print(text_table(rows))
    cmp = report["comparisons"]
    rb = cmp.get("sasrec_ce_vs_recbole")
    print()
    if rb:
        print(f"SASRec-CE / RecBole time per epoch (train): {fmt(rb['time_per_epoch_ratio_train'], 3)} "
              f"(with valid: {fmt(rb['time_per_epoch_ratio_with_valid'], 3)})")
        if "accuracy_ratio_test_ndcg@10" in rb:
            print(f"SASRec-CE / RecBole test NDCG@10 after {rb['epochs_each']} epochs each: "
                  f"{fmt(rb['accuracy_ratio_test_ndcg@10'], 3)}; goal (>= 1 at <= 0.5 time) met: {rb['goal_met']}")
    for key in ("sasrec_ce_vs_pop", "sasrec_ce_vs_bce_1neg"):
        if key in cmp:
            print(f"SASRec-CE {key[10:]}: test NDCG@10 {pct(cmp[key]['relative_gain_test_ndcg@10'])}")
    print(f"machine shared: {report['machine_shared']}; wrote {rel(args.json)}", end="")
    if not args.no_markdown:
        write_section(args.markdown, markdown_section(report, rows), MARK_BEGIN, MARK_END)
        print(f" and the sr_train section of {rel(args.markdown)}")
    else:
        print()
    failed = [n for n, r in report["runs"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
