"""DELRec end to end on Last.fm with the tiny local LLM: does the distilled soft prompt help?

    .venv/bin/python benchmarks/delrec_lastfm.py [--work benchmarks/out/delrec_lastfm] [--threads 1]

Every step runs the shipped CLI commands and configs (configs/delrec/lastfm-*.yaml) with paths and
a CPU-sized budget given as flags, in a fresh work folder:

1. prepare ../shared/data/lastfm (LLaRA's rows: 50,800 training rows = every prefix of 976 users;
   122 valid and 122 test users, each with 20 fixed candidates);
2. the tiny Llama (hidden 128, 2 layers) + BPE tokenizer, pre-trained PRETRAIN_STEPS steps on the
   training histories (`delrec llm build-tiny`);
3. SASRec (configs/sr/sasrec.yaml, at most SASREC_EPOCHS epochs) and popularity, then SASRec's
   predictions for train and valid (with --prefix_predictions, for Temporal Analysis);
4. stage 1 (`delrec llm distill-pattern`, lastfm-distill.yaml): the soft prompt on TA + RPS, on a
   seeded subsample of the training rows; RPS agreement and TA accuracy on all valid instances;
5. stage 2 (`delrec llm finetune`) twice with the same data, steps and seed: with the stage-1 soft
   prompt (lastfm-finetune.yaml) and without any (lastfm-finetune-no-soft-prompt.yaml, the plain
   template); each keeps the checkpoint with the best VALID NDCG@5 and is scored once on test.

Test figures are over the 20 fixed candidates of each test instance (chance HR@1 = 0.05), the same
candidates SASRec and popularity are scored on. Nothing is tuned on test. Writes
benchmarks/results/delrec_lastfm.json and the block between `<!-- delrec_lastfm -->` and
`<!-- /delrec_lastfm -->` in benchmarks/RESULTS.md (re-read right before writing: other
benchmarks own the rest of the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from results_section import write_section  # benchmarks/ is on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parents[1]
LASTFM = ROOT.parent / "shared" / "data" / "lastfm"
CONFIGS = ROOT / "configs" / "delrec"
MARK_BEGIN, MARK_END = "<!-- delrec_lastfm -->", "<!-- /delrec_lastfm -->"
KEYS = ("hr@1", "hr@5", "ndcg@5")
# Budget: the whole run in about 20 minutes on 2 shared cores.
PRETRAIN_STEPS = 200
SASREC_EPOCHS = 8
STAGE1_INSTANCES = 1500  # per task
STAGE2_INSTANCES = 3000
BATCH = 16
NOISE = 0.04  # about one standard error of a difference in mean NDCG@5 over 122 instances


def run(argv: list[str]) -> float:
    """Run one delrec command in this process; return its wall time. A failure stops the benchmark."""
    from delrec.cli import main

    print("$ delrec " + " ".join(argv), flush=True)
    started = time.perf_counter()
    code = main(argv)
    if code:
        sys.exit(f"delrec {' '.join(argv[:2])} failed with exit code {code}")
    return time.perf_counter() - started


def chance(num_candidates: int) -> dict[str, float]:
    import math

    return {"hr@1": 1 / num_candidates, "hr@5": 5 / num_candidates,
            "ndcg@5": sum(1 / math.log2(r + 1) for r in range(1, 6)) / num_candidates}


def benchmark(work: Path, threads: int) -> dict:
    from delrec.data.dataset import PreparedDataset

    data, tiny, sasrec, pop = work / "data", work / "tiny", work / "sasrec", work / "pop"
    stage1, with_soft, without = work / "stage1", work / "stage2-soft-prompt", work / "stage2-no-soft-prompt"
    seconds: dict[str, float] = {}
    common = ["--num_threads", str(threads), "--progress", "false"]

    seconds["prepare"] = run(["data", "prepare", "--format", "rows", "--input", str(LASTFM), "--out", str(data)])
    seconds["tiny_llm"] = run(["llm", "build-tiny", "--data", str(data), "--out", str(tiny),
                               "--pretrain_steps", str(PRETRAIN_STEPS), "--threads", str(threads)])
    seconds["sasrec"] = run(["sr", "train", "--config", str(ROOT / "configs" / "sr" / "sasrec.yaml"), "--data",
                             str(data), "--out", str(sasrec), "--epochs", str(SASREC_EPOCHS), "--patience", "3",
                             "--num_threads", str(threads), "--no_progress"])
    run(["sr", "train", "--data", str(data), "--model", "pop", "--out", str(pop), "--no_progress"])
    seconds["sr_predict"] = sum(
        run(["sr", "predict", "--model", str(sasrec), "--data", str(data), "--split", split, "--prefix_predictions",
             "--out", str(sasrec / f"{split}.jsonl")]) for split in ("train", "valid"))
    seconds["stage1"] = run([
        "llm", "distill-pattern", "--config", str(CONFIGS / "lastfm-distill.yaml"), "--data", str(data),
        "--train_predictions", str(sasrec / "train.jsonl"), "--valid_predictions", str(sasrec / "valid.jsonl"),
        "--out", str(stage1), "--model_name_or_path", str(tiny), "--max_train_instances", str(STAGE1_INSTANCES),
        "--per_device_train_batch_size", str(BATCH), *common,
    ])
    stage2 = ["--data", str(data), "--model_name_or_path", str(tiny), "--max_train_instances", str(STAGE2_INSTANCES),
              "--per_device_train_batch_size", str(BATCH), *common]
    seconds["stage2_soft_prompt"] = run(["llm", "finetune", "--config", str(CONFIGS / "lastfm-finetune.yaml"),
                                         "--stage1", str(stage1), "--out", str(with_soft), *stage2])
    seconds["stage2_no_soft_prompt"] = run(["llm", "finetune", "--config",
                                            str(CONFIGS / "lastfm-finetune-no-soft-prompt.yaml"),
                                            "--out", str(without), *stage2])

    dataset = PreparedDataset.load(data)
    metrics = {name: json.loads((folder / "metrics.json").read_text())
               for name, folder in [("sasrec", sasrec), ("pop", pop), ("stage1", stage1), ("with", with_soft),
                                    ("without", without)]}
    build = json.loads((tiny / "build_info.json").read_text())
    stage1_metrics = metrics["stage1"]
    return {
        "benchmark": "delrec_lastfm",
        "command": "python benchmarks/delrec_lastfm.py",
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "torch_threads": threads, **_versions()},
        "dataset": {"name": "lastfm (LLaRA)", **dataset.stats(), "num_candidates": dataset.num_candidates},
        "settings": {"pretrain_steps": PRETRAIN_STEPS, "sasrec_max_epochs": SASREC_EPOCHS,
                     "stage1_instances_per_task": STAGE1_INSTANCES, "stage2_instances": STAGE2_INSTANCES,
                     "batch_size": BATCH, "stage1_config": "configs/delrec/lastfm-distill.yaml",
                     "stage2_configs": ["configs/delrec/lastfm-finetune.yaml",
                                        "configs/delrec/lastfm-finetune-no-soft-prompt.yaml"]},
        "tiny_llm": {k: build[k] for k in ("parameters", "hidden_size", "num_hidden_layers", "vocab_size",
                                           "pretrain_steps", "final_loss")},
        "stage1": {"valid": stage1_metrics["valid"], "valid_before_training": stage1_metrics["valid_before_training"],
                   "steps": stage1_metrics["global_step"], "best_checkpoint": Path(stage1_metrics["best_checkpoint"]).name},
        "test": {
            "SASRec": _pick(metrics["sasrec"]["candidates"]["test"]),
            "popularity": _pick(metrics["pop"]["candidates"]["test"]),
            "DELRec (stage-1 soft prompt + LoRA)": _pick(metrics["with"]["test"]),
            "LoRA without soft prompt (plain template)": _pick(metrics["without"]["test"]),
            "chance": chance(dataset.num_candidates),
        },
        "valid": {
            "SASRec": _pick(metrics["sasrec"]["candidates"]["valid"]),
            "DELRec (stage-1 soft prompt + LoRA)": _pick(metrics["with"]["valid"]),
            "LoRA without soft prompt (plain template)": _pick(metrics["without"]["valid"]),
            "DELRec before stage 2 (zero-shot with the soft prompt)": _pick(metrics["with"]["valid_before_training"]),
            "plain template before stage 2 (zero-shot)": _pick(metrics["without"]["valid_before_training"]),
        },
        "stage2_steps": {"with": metrics["with"]["global_step"], "without": metrics["without"]["global_step"]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _pick(values: dict) -> dict[str, float]:
    return {k: round(values[k], 4) for k in KEYS}


def _versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| model | HR@1 | HR@5 | NDCG@5 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {v['hr@1']:.3f} | {v['hr@5']:.3f} | {v['ndcg@5']:.3f} |" for name, v in rows.items()]
    return lines


def section(report: dict) -> str:
    s1, m, model = report["stage1"], report["machine"], report["tiny_llm"]
    sec = report["seconds"]
    with_soft = report["test"]["DELRec (stage-1 soft prompt + LoRA)"]
    without = report["test"]["LoRA without soft prompt (plain template)"]
    base = report["test"]["chance"]
    above = {name: report["test"][name]["hr@1"] > base["hr@1"] + NOISE / 2
             for name in ("SASRec", "DELRec (stage-1 soft prompt + LoRA)", "LoRA without soft prompt (plain template)")}
    difference = with_soft["ndcg@5"] - without["ndcg@5"]
    # per-instance NDCG@5 has a standard deviation of about 0.3 here, so over 122 test instances a
    # difference between two models below ~0.04 (one standard error of the difference) is noise
    verdict = ("helped" if difference > NOISE else "hurt" if difference < -NOISE
               else "made no measurable difference")
    lines = [
        MARK_BEGIN,
        "## DELRec on Last.fm with the tiny LLM: stage 1 soft prompt, stage 2 LoRA (issue #5)",
        "",
        f"Command (from the repository root): `{report['command']}`  ",
        f"Date: {report['finished']} (UTC).  ",
        f"Machine: {m['nproc']} CPUs, shared with another engineer's benchmark; {m['torch_threads']} torch thread; "
        f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}.  ",
        f"LLM: tiny Llama from `delrec llm build-tiny` ({model['parameters'] / 1e6:.1f} M parameters, hidden "
        f"{model['hidden_size']}, {model['num_hidden_layers']} layers, vocabulary {model['vocab_size']}), pre-trained "
        f"{model['pretrain_steps']} steps on the training histories (final loss {model['final_loss']}).  ",
        f"Data: LLaRA's Last.fm, {report['dataset']['instances']['train']} training rows, "
        f"{report['dataset']['instances']['test']} test users with {report['dataset']['num_candidates']} fixed "
        "candidates each. Stage 1: "
        f"{report['settings']['stage1_instances_per_task']} TA + {report['settings']['stage1_instances_per_task']} RPS "
        f"training instances ({s1['steps']} steps); stage 2: {report['settings']['stage2_instances']} training "
        f"instances ({report['stage2_steps']['with']} steps) for both variants, same seed. Candidates are ranked by "
        "mean token log-likelihood; checkpoints picked on valid NDCG@5.",
        "",
        "Test, 20 fixed candidates per instance:",
        "",
        *table(report["test"]),
        "",
        f"Stage 1 on valid (all {report['dataset']['instances']['valid']} instances): RPS agreement "
        f"{s1['valid']['rps_agreement']:.3f} (chance {s1['valid']['rps_chance']:.3f}; before training "
        f"{s1['valid_before_training']['rps_agreement']:.3f}), TA accuracy {s1['valid']['ta_accuracy']:.3f} (chance "
        f"{s1['valid']['ta_chance']:.3f}; before training {s1['valid_before_training']['ta_accuracy']:.3f}).",
        "",
        "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()) + ".",
        "",
        f"Verdict at this scale: the distilled soft prompt {verdict} (test NDCG@5 {with_soft['ndcg@5']:.3f} with "
        f"it, {without['ndcg@5']:.3f} without; differences under {NOISE} are within the noise of "
        f"{report['dataset']['instances']['test']} test instances). Clearly above chance on test HR@1 (by more "
        f"than {NOISE / 2}): " + ", ".join(f"{name} {'yes' if yes else 'no'}" for name, yes in above.items()) + ".",
        MARK_END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "delrec_lastfm",
                        help="Work folder (emptied first).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per step.")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "delrec_lastfm.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    if not LASTFM.is_dir():
        sys.exit(f"Last.fm data not found at {LASTFM}")
    shutil.rmtree(args.work, ignore_errors=True)
    started = time.perf_counter()
    report = benchmark(args.work, args.threads)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_section(args.markdown, section(report), MARK_BEGIN, MARK_END)
    print("\n".join(table(report["test"])))
    print(json.dumps({"stage1": report["stage1"], "seconds": report["seconds"]}, indent=2))


if __name__ == "__main__":
    main()
