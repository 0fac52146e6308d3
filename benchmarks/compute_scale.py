"""How training and LLM export cost grow past one process (issue #35, item 4): SR epoch time at 1M and 10M
interactions, and `delrec rank` / `delrec teacher export` throughput with 1 and 2 processes.

SR: the synthetic data of benchmarks/data_scale.py (20 interactions per user, items 1/40 of the interactions),
prepared with `delrec data prepare`; SASRec with its defaults and the trainer's defaults (full-softmax `ce`,
batches of 64 sequences bucketed by length), in a fresh process each. `--sr_batches N` times N batches drawn at
random (seeded) from an epoch's batch list, after 3 warm-up batches, with the trainer's own step
(`process_batch_loss`, backward, Adam): the epoch time is their mean times the epoch's batch count, with its
standard error. `--sr_batches 0` times every batch of the epoch instead (the measured epoch).

Export: the same `delrec rank` (and, with `--sr_model`, `delrec teacher export --mode rerank`) on the CPU, once as
one process with 2 torch threads and once as 2 processes of `accelerate launch` with 1 thread each (the 2 cores
shared out either way), side by side. The hf backend answers `--batch_size` x 8 instances at a time (a chunk, the
unit the processes share), so `--instances` must span at least two chunks for the second process to get any work
(default: 32 instances, batch size 2: two chunks of 16). The outputs must be byte-identical (rankings.jsonl; the
teacher's tensors: its json differs in its timings only). The rerank export first embeds every item's title for
the teacher's item embeddings, in the main process alone (the step is not split over processes): on a large
catalogue that pass, not the sharded ranking, sets its time.

    .venv/bin/python benchmarks/compute_scale.py --sizes 1e6 1e7 --sr_batches 40 --llm runs/gemma \\
        --data benchmarks/out/delrec_games/data --instances 32 --batch_size 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, cpu_model, log, markdown_table, rel
from data_scale import generate, prepare
from results_section import write_section

OUT = ROOT / "benchmarks" / "out" / "compute_scale"
RESULTS = ROOT / "benchmarks" / "results" / "compute_scale.json"
WARMUP = 3


def sr_epoch(data: Path, batches: int, seed: int = 0) -> dict:
    """In this process: time SASRec's training batches on the prepared dataset `data` (module docstring)."""
    import numpy as np
    import torch

    from delrec.data.dataset import PreparedDataset
    from delrec.sr import SASRecConfig, TrainConfig, build_model
    from delrec.sr.trainer import epoch_batches, process_batch_loss, resolve_train_positions, training_sequences

    class Alone:  # one process: the whole batch is this process's share
        rank, count = 0, 1

    torch.manual_seed(seed)
    dataset = PreparedDataset.load(data)
    config = TrainConfig(seed=seed)
    model = build_model(SASRecConfig(), dataset.num_items, dataset.fingerprint)
    positions = resolve_train_positions(config.train_positions, dataset)
    sequences = training_sequences(dataset, model.max_length, model.pad_id)
    epoch = epoch_batches(sequences[1], config.batch_size, config.bucket_by_length, np.random.default_rng([seed, 1]))
    rng = np.random.default_rng(seed)
    timed = list(range(len(epoch))) if batches <= 0 or batches >= len(epoch) else rng.choice(len(epoch), batches, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    seconds = []
    for order, batch in enumerate([*timed[:WARMUP], *timed]):
        started = time.perf_counter()
        loss = process_batch_loss(model, sequences, epoch[batch], config, positions, None, 0.0, Alone())[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if order >= WARMUP:
            seconds.append(time.perf_counter() - started)
    seconds = np.array(seconds)
    mean, se = seconds.mean(), seconds.std(ddof=1) / np.sqrt(len(seconds)) if len(seconds) > 1 else 0.0
    return {"items": dataset.num_items, "sequences": len(sequences[1]), "batches_per_epoch": len(epoch),
            "timed_batches": len(seconds), "seconds_per_batch": round(float(mean), 4),
            "epoch_seconds": round(float(mean * len(epoch)), 1), "epoch_seconds_se": round(float(se * len(epoch)), 1),
            "measured_epoch": len(seconds) == len(epoch), "threads": torch.get_num_threads(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_command(argv: list[str], processes: int, out: Path) -> float:
    """`python -m delrec ARGV --out OUT` as one process (2 threads) or 2 launched processes (1 thread each): wall
    seconds, start-up included."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    if processes == 1:
        command = [sys.executable, "-m", "delrec", *argv]
    else:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu-2proc.yaml"), "--main_process_port", str(free_port()),
                   "-m", "delrec", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    started = time.perf_counter()
    done = subprocess.run([*command, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return seconds


def export_rows(args) -> list[dict]:
    common = ["--data", str(args.data), "--max_instances", str(args.instances), "--batch_size", str(args.batch_size),
              "--device", "cpu", "--no_progress"]
    commands = {"rank": (["rank", "--model", str(args.llm), "--split", "test", *common], ["rankings.jsonl"])}
    if args.sr_model:
        commands["teacher export (rerank)"] = (
            ["teacher", "export", "--model", str(args.llm), "--mode", "rerank", "--sr_model", str(args.sr_model),
             *common], ["rankings.safetensors", "item_embeddings.safetensors"])
    rows = []
    for name, (argv, compared) in commands.items():
        outputs = {}
        for processes in (1, 2):
            log(f"{name} with {processes} process(es)")
            out = OUT / f"{argv[0]}-{processes}proc"
            seconds = run_command(argv, processes, out)
            outputs[processes] = [(out / file).read_bytes() for file in compared if (out / file).is_file()]
            rows.append({"command": name, "processes": processes, "threads_each": 2 // processes,
                         "instances": args.instances, "wall_seconds": round(seconds, 1),
                         "instances_per_second": round(args.instances / seconds, 3)})
            log(json.dumps(rows[-1]))
        same = bool(outputs[1]) and outputs[1] == outputs[2]
        for row in rows[-2:]:
            row["same_output"] = same
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7], help="SR: interactions of each size")
    parser.add_argument("--sr_batches", type=int, default=40, help="SR: batches timed per size (0: the whole epoch)")
    parser.add_argument("--llm", type=Path, help="export: the LLM folder ranked with (e.g. runs/gemma); none: skipped")
    parser.add_argument("--data", type=Path, help="export: the prepared dataset")
    parser.add_argument("--sr_model", type=Path, help="export: an SR model of --data, for the rerank teacher export")
    parser.add_argument("--instances", type=int, default=32, help="export: instances per run")
    parser.add_argument("--batch_size", type=int, default=2,
                        help="export: sequences per forward pass; a process's unit of work is batch_size x 8 instances")
    parser.add_argument("--sr_worker", nargs=2, metavar=("DATA", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sr_worker:
        print(json.dumps(sr_epoch(Path(args.sr_worker[0]), int(args.sr_worker[1]))))
        return
    sr_rows = []
    for size in map(int, args.sizes):
        raw, prepared = OUT / f"raw-{size}", OUT / f"prepared-{size}"
        log(f"generating and preparing {size:,} interactions")
        generate(size, raw)
        if not (prepared / "meta.json").is_file():
            prepare(ROOT, raw, prepared)
        log(f"SASRec batches on {size:,} interactions")
        done = subprocess.run([sys.executable, __file__, "--sr_worker", str(prepared), str(args.sr_batches)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        sr_rows.append({"interactions": size, **json.loads(done.stdout.strip().splitlines()[-1])})
        log(json.dumps(sr_rows[-1]))
    export = export_rows(args) if args.llm else []
    record = {"command": " ".join(["benchmarks/compute_scale.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "machine": {"nproc": os.cpu_count(), "cpu_model": cpu_model()}, "sr": sr_rows, "export": export}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    sr_table = markdown_table([["interactions", "items", "batches/epoch", "timed", "s/batch", "epoch s (+- SE)",
                                "peak RSS MB"]] + [
        [f"{r['interactions']:,}", f"{r['items']:,}", f"{r['batches_per_epoch']:,}",
         "all" if r["measured_epoch"] else str(r["timed_batches"]), str(r["seconds_per_batch"]),
         f"{r['epoch_seconds']:,} +- {r['epoch_seconds_se']}", str(r["peak_rss_mb"])] for r in sr_rows])
    export_table = markdown_table([["command", "processes x threads", "instances", "wall s", "instances/s",
                                    "same output as 1 process"]] + [
        [r["command"], f"{r['processes']} x {r['threads_each']}", str(r["instances"]), str(r["wall_seconds"]),
         str(r["instances_per_second"]), "yes" if r["same_output"] else "NO"] for r in export])
    print(sr_table + ("\n\n" + export_table if export else ""))
    write_section(ROOT / "benchmarks" / "RESULTS.md", "\n".join([
        "<!-- compute_scale -->",
        "## SR epochs at 1M-10M interactions, LLM exports on 1 and 2 processes (issue #35, item 4)",
        "",
        f"`.venv/bin/python {record['command']}` - {record['date']}, {record['machine']['cpu_model']}, "
        f"{record['machine']['nproc']} cores. SR: SASRec defaults, full-softmax ce, batches of 64 sequences, "
        "synthetic data of benchmarks/data_scale.py; epoch time = mean seconds of the timed batches (drawn at "
        "random from the epoch, after 3 warm-up batches) x batches per epoch, +- its standard error. Export: wall "
        f"time of the whole command (start-up included) on {rel(args.data) if args.data else '-'} with batch size "
        f"{args.batch_size} (chunks of {args.batch_size * 8} instances, the unit the processes share), 1 process x 2 "
        "threads against `accelerate launch` 2 processes x 1 thread, run back to back. Rows: "
        f"{rel(RESULTS)}.",
        "", sr_table, "", export_table if export else "", "<!-- /compute_scale -->"]),
        "<!-- compute_scale -->", "<!-- /compute_scale -->")
    log(f"wrote {rel(RESULTS)} and its RESULTS.md block")


if __name__ == "__main__":
    main()
