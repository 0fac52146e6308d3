"""Peak memory and seconds per row of a stage-2 listwise LoRA step, by rows per forward pass (issue #31).

Eight games rows in one pass were OOM-killed on a 24 GB machine: eager attention (the CPU default, measured
faster than SDPA for Gemma's head_dim 256) keeps B x heads x T^2 probabilities per layer for the backward pass, so
memory grows with the batch times the square of the longest prompt in it. This measures what gradient accumulation
buys: the same rows in passes of `--micro-batches` rows each (every size in a fresh process: its own peak RSS).

    .venv/bin/python benchmarks/step_memory.py --model runs/gemma --data benchmarks/out/delrec_games/data

Rows: the first `--rows` training instances of the prepared dataset with the `plain` template (as the
games harness builds them: 20 candidates drawn per row, history truncated to 1024 tokens), LoRA r 8 on all linear
layers, bfloat16 where the CPU measures it faster (`delrec.device`), one untimed warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import llm_machine as machine  # benchmarks/ is on sys.path when a benchmark runs as a script
from results_section import write_section

ROOT = Path(__file__).resolve().parent.parent


def measure(args) -> dict:
    """One micro-batch size in this process: seconds per row over `--rows` rows, and the process's peak RSS."""
    import torch
    from peft import LoraConfig, get_peft_model

    from delrec.data.dataset import PreparedDataset
    from delrec.device import cpu_prefers_bfloat16
    from delrec.llm.instances import InstanceOptions, build_instances
    from delrec.llm.listwise import ListwiseCollator, listwise_loss
    from delrec.llm.loading import ModelConfig, load_model, max_positions
    from delrec.prompts import get_template

    torch.set_num_threads(args.threads)
    dtype = "bfloat16" if cpu_prefers_bfloat16() else "float32"
    model, tokenizer = load_model(ModelConfig(str(args.model), dtype=dtype, device="cpu"))
    options = InstanceOptions(split="train", max_instances=args.rows + args.micro_batch, max_length=1024,
                              allow_truncation=True, model_positions=max_positions(model))
    rows = build_instances(PreparedDataset.load(args.data), get_template("plain"), options, tokenizer).rows
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    collate = ListwiseCollator(tokenizer, negatives=args.negatives, seed=0)

    def step(start: int) -> None:
        loss = listwise_loss(model, **collate([rows[i] for i in range(start, start + args.micro_batch)]))
        loss.backward()

    step(args.rows)  # warm-up on rows past the timed ones
    started = time.perf_counter()
    for start in range(0, args.rows, args.micro_batch):
        step(start)
    seconds = time.perf_counter() - started
    return {"micro_batch": args.micro_batch, "negatives": args.negatives, "rows": args.rows, "dtype": dtype,
            "seconds_per_row": round(seconds / args.rows, 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "gemma")
    p.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "out" / "delrec_games" / "data",
                   help="a prepared dataset folder (default: the games harness's)")
    p.add_argument("--micro-batches", default="1,2,4", help="rows per forward pass, each in a fresh process")
    p.add_argument("--rows", type=int, default=8, help="timed rows per size (a multiple of every micro-batch)")
    p.add_argument("--negatives", type=int, default=None,
                   help="score the target + this many of the other candidates (a sampled softmax; default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/step_memory[-negN].json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    suffix = f"-neg{args.negatives}" if args.negatives else ""
    args.json = args.json or ROOT / "benchmarks" / "results" / f"step_memory{suffix}.json"
    if args.micro_batch:
        print(json.dumps(measure(args)))
        return
    results = []
    for size in [int(s) for s in args.micro_batches.split(",")]:
        command = [sys.executable, __file__, "--model", str(args.model), "--data", str(args.data), "--rows",
                   str(args.rows), "--threads", str(args.threads), "--micro-batch", str(size),
                   *(["--negatives", str(args.negatives)] if args.negatives else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            results.append({"micro_batch": size, "failed": done.returncode, "stderr": done.stderr[-300:]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = {"date": stamp, "machine": machine(), "model": str(args.model), "data": str(args.data), "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    begin, end = f"<!-- step_memory{suffix} -->", f"<!-- /step_memory{suffix} -->"
    scored = f", {args.negatives} sampled negatives" if args.negatives else ""
    lines = [begin, f"## Stage-2 listwise step: memory and speed by rows per forward pass{scored} (issue #31)", "",
             f"`.venv/bin/python benchmarks/step_memory.py --micro-batches {args.micro_batches} --rows {args.rows}"
             + (f" --negatives {args.negatives}" if args.negatives else "") + "` "
             f"({stamp}; {report['machine']['cpu_model']}, {report['machine']['nproc']} cores, torch "
             f"{report['machine']['torch']}; data {args.data.name}, Gemma 3 270M + LoRA r 8).", "",
             "| rows per pass | s per row | peak RSS (GB) |", "|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['micro_batch']} | " + (f"{r['seconds_per_row']} | {r['peak_rss_gb']} |" if "failed" not in r
                                                  else f"failed (exit {r['failed']}) | |"))
    lines += ["", "The games LoRA runs take 2 rows per pass and accumulate 4 (8 rows a step).", end]
    write_section(args.markdown, "\n".join(lines) + "\n", begin, end)
    print("\n".join(lines[4:-1]))


if __name__ == "__main__":
    main()
