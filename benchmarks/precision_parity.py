"""Does bfloat16 training learn what float32 training learns? (issue #30) Stage 2 on the real LLM, the same seed and
rows, 30 steps in each precision; both adapters then ranked on every valid user IN FLOAT32, so only the training
precision differs, and compared user by user.

    .venv/bin/python benchmarks/precision_parity.py --model runs/gemma          # ~20 min on 2 cores

Steps: `delrec llm finetune` (plain template, no soft prompt, answer loss, LoRA r 8 on all linear layers, batch 8,
30 steps = 240 Last.fm rows, `mixed_precision: no` with float32 weights, then `bf16` with bfloat16 weights: the two
defaults a CPU can get); the adapter of step 30 (`checkpoints/checkpoint-30`, not the best-by-valid one, which could
be step 0 in one run and not the other) on the float32 base; `delrec.llm.scoring.score_candidates` on the valid
users; per user HR@1 and NDCG@5 (ties at their expected value); the paired difference with its standard error and
the two-standard-error verdict. The rankings are written to `--out` and committed under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import llm_machine as machine, prepare_data  # benchmarks/ is on sys.path when a benchmark runs as a script
from results_section import write_section

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- precision_parity -->", "<!-- /precision_parity -->"
PRECISIONS = {"no": "float32", "bf16": "auto"}  # mixed_precision -> dtype (auto: bfloat16 weights under bf16)


def train(model: str, data: Path, out: Path, precision: str, steps: int, batch: int) -> float:
    from delrec.llm.loading import LoraSettings, ModelConfig
    from delrec.llm.stage2 import FinetuneArguments, finetune
    from delrec.llm.trainer import TrainingSettings

    started = time.perf_counter()
    args = FinetuneArguments(data=str(data), out=str(out), soft_prompt="none", template="plain", domain="artist",
                             max_train_instances=steps * batch, eval_max_instances=1, test_max_instances=1)
    settings = TrainingSettings(learning_rate=5e-4, max_steps=steps, per_device_train_batch_size=batch,
                                eval_steps=steps, logging_steps=5, mixed_precision=precision, seed=0, progress=False)
    finetune(args, ModelConfig(model, dtype=PRECISIONS[precision], device="cpu"),
             LoraSettings(r=8, lora_alpha=16, lora_dropout=0.05), settings)
    return time.perf_counter() - started


def rank_valid(model: str, adapter: Path, dataset) -> list[dict]:
    """Per valid user: the candidates' float32 log-likelihoods under base + `adapter`, and the target's index."""
    from peft import PeftModel

    from delrec.llm.loading import ModelConfig, load_model
    from delrec.llm.scoring import score_candidates
    from delrec.prompts import get_template
    from delrec.ranking.models import describe_model
    from delrec.ranking.requests import build_requests
    from delrec.llm.tokenization import encode_completion

    base, tokenizer = load_model(ModelConfig(model, dtype="float32", device="cpu"))
    scored = PeftModel.from_pretrained(base, str(adapter)).eval()
    reqs = build_requests(dataset, "valid", describe_model(model), get_template("plain", None), tokenizer, 511,
                          lambda titles: max(len(encode_completion(tokenizer, t)) for t in titles))
    scores = score_candidates(scored, tokenizer, [r.prompt for r in reqs], [list(r.titles) for r in reqs],
                              batch_size=16, progress=True)
    return [{"instance": i, "target": r.candidates.index(r.target), "logprob": s.logprob}
            for i, (r, s) in enumerate(zip(reqs, scores))]


def user_metrics(row: dict) -> dict:
    """HR@1 and NDCG@5 of one user, ties at their expected value (delrec.metrics' convention)."""
    target = row["logprob"][row["target"]]
    greater = sum(v > target for v in row["logprob"])
    ties = sum(v == target for v in row["logprob"]) - 1
    ranks = range(greater + 1, greater + ties + 2)  # the target's possible 1-based ranks, equally likely
    hr1 = sum(r == 1 for r in ranks) / len(ranks)
    ndcg5 = sum(1 / math.log2(r + 1) for r in ranks if r <= 5) / len(ranks)
    return {"hr@1": hr1, "ndcg@5": ndcg5}


def paired(a: list[float], b: list[float]) -> dict:
    from delrec.metrics import NOISE_SE, paired_difference

    result = paired_difference(a, b)
    return {"bf16": round(sum(a) / result.n, 4), "float32": round(sum(b) / result.n, 4),
            "diff": round(result.difference, 4), "se": round(result.margin / NOISE_SE, 4),
            "within_2se": result.verdict == "within noise", "detectable": round(result.margin, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the imported Gemma folder (`delrec llm import gemma-3-270m`)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "precision_parity")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "precision_parity")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args()

    import torch

    from delrec.data.dataset import PreparedDataset

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = args.out / "data-lastfm"
    prepare_data("lastfm", data)
    dataset = PreparedDataset.load(data)
    args.results.mkdir(parents=True, exist_ok=True)
    per_user, seconds = {}, {}
    for precision in PRECISIONS:
        run = args.out / precision
        seconds[precision] = train(args.model, data, run, precision, args.steps, args.batch)
        rows = rank_valid(args.model, run / "checkpoints" / f"checkpoint-{args.steps}", dataset)
        (args.results / f"valid_rankings_{precision}.json").write_text(json.dumps(rows) + "\n", encoding="utf-8")
        per_user[precision] = [user_metrics(r) for r in rows]
        print(precision, f"{seconds[precision]:.0f} s", flush=True)
    comparison = {k: paired([u[k] for u in per_user["bf16"]], [u[k] for u in per_user["no"]])
                  for k in ("hr@1", "ndcg@5")}
    report = {"command": " ".join(["python benchmarks/precision_parity.py", *sys.argv[1:]]), "machine": machine(),
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "users": len(per_user["no"]),
              "train_seconds": seconds, "comparison": comparison, "wall_seconds": time.perf_counter() - started}
    (args.results / "summary.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m = report["machine"]
    lines = [MARK_BEGIN, "### bfloat16 training learns what float32 training learns (issue #30)", "",
             f"`{report['command']}` — {report['finished']} UTC, {m['cpu_model']}, {m['nproc']} cores; stage 2 on "
             f"Last.fm, plain template, {args.steps} steps of {args.batch}, seed 0, in each precision; the step-"
             f"{args.steps} adapters ranked on all {report['users']} valid users in float32; rankings in "
             "`benchmarks/results/precision_parity/`. Training took "
             f"{seconds['no'] / 60:.1f} min in float32 and {seconds['bf16'] / 60:.1f} min in bfloat16 "
             "(evaluation included).", "",
             "| metric | bfloat16-trained | float32-trained | paired diff | SE | within 2 SE |", "|---|---:|---:|---:|---:|---|"]
    for name, c in comparison.items():
        lines.append(f"| {name} | {c['bf16']} | {c['float32']} | {c['diff']:+} | {c['se']} | "
                     f"{'yes' if c['within_2se'] else 'NO'} |")
    lines += [MARK_END]
    write_section(args.markdown, "\n".join(lines) + "\n", MARK_BEGIN, MARK_END)
    print(json.dumps(comparison, indent=1))


if __name__ == "__main__":
    main()
