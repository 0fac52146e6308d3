"""Ranking benchmark (issue #6, item 5): instances/s per backend and read-out, and shared-prefix vs naive scoring.

    .venv/bin/python benchmarks/ranking.py                       # lastfm test split (122 instances), CPU
    .venv/bin/python benchmarks/ranking.py --data synthetic --instances 100 --naive-instances 10

Steps, one after the other in one process (so timings are taken under the same conditions):

1. Prepares the data into `--out/data` unless it is there: LLaRA's lastfm rows
   (`../shared/data/lastfm`, 20 fixed candidates per instance) or the built-in synthetic dataset.
2. Builds a random tiny LLM on it (`delrec.llm.tiny`, `--size`, no pre-training: speed does not
   depend on the weights; a random model never emits EOS, so free generation always spends its
   whole budget, the worst case).
3. Runs `delrec.ranking.rank` (the code behind `delrec rank`) on the first `--instances` test
   instances with the plain template for each read-out on the hf backend: score (shared prompt
   KV cache), constrained (`--beams` beams over the candidate trie), generate (greedy; budget =
   longest candidate title + 8 tokens). One untimed warm-up run comes first.
4. Scores the first `--naive-instances` of the same requests with `score_candidates` (each prompt
   once, its KV cache shared by the candidates) and with `score_candidates_naive` (one full
   forward per candidate): max abs difference of the log-likelihoods and the speed ratio
   (goal >= 5x).
5. Prints a table and writes `--json` and this benchmark's block of `--markdown` (only between
   `<!-- ranking -->` and `<!-- /ranking -->`; the file is re-read right before writing).

The vLLM columns stay empty until the vLLM backend lands (`--backends hf,vllm` then fills them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LASTFM = ROOT.parent / "shared" / "data" / "lastfm"
MARK_BEGIN, MARK_END = "<!-- ranking -->", "<!-- /ranking -->"
READOUTS = ("score", "constrained", "generate")
HEADER = ["read-out", "hf inst/s", "vllm inst/s", "HR@1", "HR@5", "NDCG@5", "ValidRatio"]


def prepare_data(source: str, folder: Path):
    from delrec.data.dataset import PreparedDataset
    from delrec.data.loaders import load_raw
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig
    from delrec.data.synthetic import make_synthetic

    if (folder / "meta.json").is_file():
        return PreparedDataset.load(folder)
    if source == "lastfm":
        if not LASTFM.is_dir():
            sys.exit(f"lastfm data not found at {LASTFM}; use --data synthetic")
        raw = load_raw("rows", LASTFM)
    else:
        raw = make_synthetic(num_users=300, num_items=500, min_length=8, max_length=20, seed=0)
    return prepare_dataset(raw, PreprocessConfig(num_candidates=20), folder)


def build_model(data: Path, folder: Path, size: str) -> dict:
    from delrec.llm.tiny import BUILD_INFO_FILE, TinyLLMConfig, build_tiny_llm

    if (folder / BUILD_INFO_FILE).is_file():
        return json.loads((folder / BUILD_INFO_FILE).read_text())
    return build_tiny_llm(data, folder, TinyLLMConfig(arch="llama", size=size, pretrain_steps=0), progress=False)


def run_readouts(args, model: Path, data: Path) -> dict:
    from delrec.ranking import RankArguments, ReadoutConfig, backend_module, rank

    results = {}
    for backend in args.backends.split(","):
        module = backend_module(backend)
        known = {f.name for f in dataclasses.fields(module.Options)}
        options = module.Options(**{k: v for k, v in (("device", args.device), ("batch_size", args.batch_size))
                                    if k in known})

        def run(readout: str, instances: int) -> dict:
            out = args.out / "rankings" / f"{backend}-{readout}"
            return rank(RankArguments(model=str(model), data=str(data), out=str(out), backend=backend,
                                      max_instances=instances, progress=False),
                        ReadoutConfig(readout=readout, num_beams=args.beams), options)

        run("score", min(4, args.instances))  # warm-up, untimed
        for readout in READOUTS:
            results[f"{backend}/{readout}"] = metrics = run(readout, args.instances)
            print(f"  {backend:5s} {readout:12s} {metrics['instances_per_second']:8.2f} instances/s", flush=True)
    return results


def shared_vs_naive(args, model_path: Path, data_path: Path) -> dict:
    import torch

    from delrec.data.dataset import PreparedDataset
    from delrec.llm.loading import ModelConfig, load_model
    from delrec.llm.scoring import score_candidates, score_candidates_naive
    from delrec.llm.tokenization import encode_prompt
    from delrec.prompts import get_template
    from delrec.ranking.models import describe_model
    from delrec.ranking.requests import build_requests

    model, tokenizer = load_model(ModelConfig(str(model_path), dtype="float32", device=args.device))
    spec = describe_model(str(model_path))
    requests = build_requests(PreparedDataset.load(data_path), "test", spec, get_template(spec.template), tokenizer,
                              model.config.max_position_embeddings, lambda titles: 64, args.naive_instances)
    prompts, titles = [r.prompt for r in requests], [list(r.titles) for r in requests]
    score_candidates(model, tokenizer, prompts[:2], titles[:2], batch_size=args.batch_size)  # warm-up
    timings, scores = {}, {}
    for name, run in (
        ("shared", lambda: score_candidates(model, tokenizer, prompts, titles, batch_size=args.batch_size)),
        ("naive", lambda: score_candidates_naive(model, tokenizer, prompts, titles)),
    ):
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        scores[name] = run()
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - started
    diff = max(abs(a - b) for s, n in zip(scores["shared"], scores["naive"]) for a, b in zip(s.logprob, n.logprob))
    return {
        "instances": len(requests),
        "candidates_per_instance": sum(len(t) for t in titles) / len(titles),
        "mean_prompt_tokens": sum(len(encode_prompt(tokenizer, p)) for p in prompts) / len(prompts),
        "shared_seconds": timings["shared"],
        "naive_seconds": timings["naive"],
        "shared_instances_per_second": len(requests) / timings["shared"],
        "naive_instances_per_second": len(requests) / timings["naive"],
        "speedup": timings["naive"] / timings["shared"],
        "max_abs_logprob_diff": diff,
    }


def readout_rows(report: dict) -> list[list[str]]:
    rows = []
    for readout in READOUTS:
        hf = report["readouts"].get(f"hf/{readout}")
        vllm = report["readouts"].get(f"vllm/{readout}")
        quality = hf[hf["dataset"]["split"]]
        rows.append([
            readout + (f" ({report['settings']['beams']} beams)" if readout == "constrained" else ""),
            f"{hf['instances_per_second']:.2f}",
            f"{vllm['instances_per_second']:.2f}" if vllm else "pending (vLLM backend)",
            f"{quality['hr@1']:.3f}",
            f"{quality['hr@5']:.3f}" if "hr@5" in quality else "–",
            f"{quality['ndcg@5']:.3f}" if "ndcg@5" in quality else "–",
            f"{quality['valid_ratio']:.3f}" if "valid_ratio" in quality else "–",
        ])
    return rows


def markdown_section(report: dict) -> str:
    s, m, n = report["settings"], report["machine"], report["shared_vs_naive"]
    table = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    table += ["| " + " | ".join(row) + " |" for row in readout_rows(report)]
    model = report["model"]
    return "\n".join([
        MARK_BEGIN,
        "## LLM ranking: read-outs and shared-prefix scoring (issue #6, item 5)",
        "",
        f"Command (from the repository root): `{report['command']}`  ",
        f"Date: {report['finished']} (UTC); total wall time {report['wall_seconds']:.0f} s.  ",
        f"Machine: {m['nproc']} CPUs (`nproc`), {m['cpu_model']}; torch {m['torch']}, transformers "
        f"{m['transformers']}; {s['threads']} torch thread(s); device {s['device']}; shared with other jobs.  ",
        f"Model: random tiny Llama (`delrec.llm.tiny`, size {s['size']}: hidden {model['hidden_size']}, "
        f"{model['num_hidden_layers']} layers, {model['parameters'] / 1e6:.1f} M parameters, vocabulary "
        f"{model['vocab_size']}), float32, batch size {s['batch_size']}.  ",
        f"Data: {s['data']} test split, first {report['instances']} instances, {n['candidates_per_instance']:.0f} "
        f"fixed candidates each, plain template (mean prompt {n['mean_prompt_tokens']:.0f} tokens).",
        "",
        *table,
        "",
        "Instances/s: `delrec rank` read-out time over the instances (model loading excluded), after an untimed "
        "warm-up run. Quality figures are those of a random model (chance: HR@1 = "
        f"{1 / n['candidates_per_instance']:.2f}) and "
        "only show that the pipeline runs; a random model never emits EOS, so generate always spends its whole "
        "budget and matches nothing.",
        "",
        f"Shared-prefix vs naive scoring ({n['instances']} instances x {n['candidates_per_instance']:.0f} "
        "candidates, `score_candidates` vs `score_candidates_naive`):",
        "",
        "| scoring | seconds | inst/s | speed-up | max abs diff of log-likelihoods |",
        "|---|---:|---:|---:|---:|",
        f"| shared prompt KV cache | {n['shared_seconds']:.2f} | {n['shared_instances_per_second']:.2f} | "
        f"{n['speedup']:.1f}x | {n['max_abs_logprob_diff']:.1e} |",
        f"| naive (one forward per candidate) | {n['naive_seconds']:.2f} | {n['naive_instances_per_second']:.2f} | "
        "1.0x | – |",
        "",
        "vLLM figures: pending; the vLLM backend (issue #6) fills the `vllm inst/s` column with "
        "`--backends hf,vllm` on the same model and data.",
        MARK_END,
        "",
    ])


def write_markdown(path: Path, section: str) -> None:
    """Replace only this benchmark's block (re-read right before writing: others edit the file too)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    begin, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if begin != -1 and end > begin:
        new = text[:begin] + section.rstrip("\n") + text[end + len(MARK_END):]
    elif text:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        new = "# Benchmark results\n\n" + section
    tmp = path.with_name(path.name + ".ranking.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def machine() -> dict:
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model_name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                      platform.processor())
    return {"nproc": os.cpu_count(), "cpu_model": model_name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("lastfm", "synthetic"), default="lastfm")
    p.add_argument("--size", choices=("tiny", "small"), default="small", help="tiny LLM size (delrec.llm.tiny)")
    p.add_argument("--instances", type=int, default=122, help="test instances per read-out run")
    p.add_argument("--naive-instances", type=int, default=20, help="instances for shared vs naive scoring")
    p.add_argument("--beams", type=int, default=5, help="beams of the constrained read-out")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU is shared)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backends", default="hf", help="comma-separated: hf, vllm")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ranking")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "ranking.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = args.out / f"data-{args.data}"
    dataset = prepare_data(args.data, data)
    model = args.out / f"model-{args.data}-{args.size}"
    model_info = build_model(data, model, args.size)
    print(f"ranking {args.instances} {args.data} test instances, tiny LLM ({args.size}), {args.threads} thread(s):")
    readouts = run_readouts(args, model, data)
    naive = shared_vs_naive(args, model, data)
    report = {
        "command": " ".join(["python benchmarks/ranking.py", *sys.argv[1:]]),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": time.perf_counter() - started,
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "json", "markdown")},
        "dataset": {"path": str(data), "fingerprint": dataset.fingerprint},
        "model": {k: model_info[k] for k in ("parameters", "vocab_size", "hidden_size", "num_hidden_layers")},
        "instances": readouts["hf/score"]["instances"],
        "readouts": readouts,
        "shared_vs_naive": naive,
    }
    widths = (24, 10, 24, 6, 6, 7, 10)
    for row in [HEADER, *readout_rows(report)]:
        print(" ".join(f"{cell:{'<' if i == 0 else '>'}{w}s}" for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"\nshared-prefix vs naive scoring on {naive['instances']} instances: {naive['speedup']:.1f}x faster "
          f"({naive['shared_seconds']:.2f} s vs {naive['naive_seconds']:.2f} s), max abs diff "
          f"{naive['max_abs_logprob_diff']:.1e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(args.markdown, markdown_section(report))
    print(f"wrote {args.json} and the ranking block of {args.markdown}")


if __name__ == "__main__":
    main()
