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
   instances with the plain template for each read-out and each of `--backends`: score (hf:
   shared prompt KV cache; vllm: prefix-cached next-token log-probs), constrained (`--beams`
   beams over the candidate trie), generate (greedy; budget = longest candidate title + 8
   tokens). One untimed warm-up run per backend comes first. vLLM runs in this process
   (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so both backends use the same `--threads`), compiled
   (not eager), with the backend's default KV cache.
4. Scores the first `--naive-instances` of the same requests with `score_candidates` (each prompt
   once, its KV cache shared by the candidates) and with `score_candidates_naive` (one full
   forward per candidate): max abs difference of the log-likelihoods and the speed ratio
   (goal >= 5x). With vllm, the same for the vLLM backend's scoring against one
   `prompt_logprobs` request per (prompt + candidate), which vLLM computes without its prefix cache.
5. With vllm, compares the two backends' rankings files: top-1 agreement of the score read-out
   (ties within 1e-4 aside), max |difference| of the candidate log-likelihoods, identical
   constrained rankings and identical greedy generations.
6. Prints a table and writes `--json` and this benchmark's block of `--markdown` (only between
   `<!-- ranking -->` and `<!-- /ranking -->`; the file is re-read right before writing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# benchmarks/ is on sys.path when a benchmark runs as a script
from common import llm_machine as machine, prepare_data
from results_section import write_section

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- ranking -->", "<!-- /ranking -->"
READOUTS = ("score", "constrained", "generate")
TIE = 1e-4  # log-likelihoods this close are a tie: either top-1 is right
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
HEADER = ["read-out", "hf inst/s", "vllm inst/s", "HR@1", "HR@5", "NDCG@5", "ValidRatio"]




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
            out = rankings_dir(args, backend, readout)
            return rank(RankArguments(model=str(model), data=str(data), out=str(out), backend=backend,
                                      max_instances=instances, progress=False),
                        ReadoutConfig(readout=readout, num_beams=args.beams), options)

        run("score", min(4, args.instances))  # warm-up, untimed
        for readout in READOUTS:
            results[f"{backend}/{readout}"] = metrics = run(readout, args.instances)
            print(f"  {backend:5s} {readout:12s} {metrics['instances_per_second']:8.2f} instances/s", flush=True)
    return results


def rankings_dir(args, backend: str, readout: str) -> Path:
    return args.out / "rankings" / f"{backend}-{readout}"


def agreement(args) -> dict:
    """How far the vllm backend's rankings files agree with the hf backend's, read-out by read-out."""
    from delrec.io import read_jsonl

    rows = {(backend, readout): [row for _, row in read_jsonl(rankings_dir(args, backend, readout) / "rankings.jsonl")]
            for backend in ("hf", "vllm") for readout in READOUTS}
    top1, diff = 0, 0.0
    for hf, vllm in zip(rows["hf", "score"], rows["vllm", "score"]):
        hf_logprob, vllm_logprob = dict(zip(hf["items"], hf["logprob"])), dict(zip(vllm["items"], vllm["logprob"]))
        top1 += hf_logprob[vllm["items"][0]] >= max(hf["logprob"]) - TIE
        diff = max([diff, *(abs(hf_logprob[item] - vllm_logprob[item]) for item in hf["items"])])
    pairs = {readout: list(zip(rows["hf", readout], rows["vllm", readout])) for readout in READOUTS}
    return {
        "instances": len(pairs["score"]),
        "score_top1_agreement": top1 / len(pairs["score"]),
        "score_max_abs_logprob_diff": diff,
        "constrained_identical_rankings": sum(a["items"] == b["items"] for a, b in pairs["constrained"])
        / len(pairs["constrained"]),
        "generate_identical": sum(a["text"] == b["text"] for a, b in pairs["generate"]) / len(pairs["generate"]),
    }


def naive_requests(args, model_path: Path, data_path: Path, tokenizer, max_length: int):
    """The first `--naive-instances` test requests: prompts and their candidate titles."""
    from delrec.data.dataset import PreparedDataset
    from delrec.prompts import get_template
    from delrec.ranking.models import describe_model
    from delrec.ranking.requests import build_requests

    spec = describe_model(str(model_path))
    requests = build_requests(PreparedDataset.load(data_path), "test", spec, get_template(spec.template), tokenizer,
                              max_length, lambda titles: 64, args.naive_instances)
    return [r.prompt for r in requests], [list(r.titles) for r in requests]


def timed(run) -> tuple:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def comparison(shared, naive, shared_seconds: float, naive_seconds: float, extra: dict) -> dict:
    diff = max(abs(a - b) for s, n in zip(shared, naive) for a, b in zip(s.logprob, n.logprob))
    return {
        "instances": len(shared),
        **extra,
        "shared_seconds": shared_seconds,
        "naive_seconds": naive_seconds,
        "shared_instances_per_second": len(shared) / shared_seconds,
        "naive_instances_per_second": len(shared) / naive_seconds,
        "speedup": naive_seconds / shared_seconds,
        "max_abs_logprob_diff": diff,
    }


def vllm_shared_vs_naive(args, model_path: Path, data_path: Path) -> dict:
    """The vllm backend's scoring vs one `prompt_logprobs` request per (prompt + candidate + EOS)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from delrec.llm.scoring import CandidateScores
    from delrec.llm.tokenization import encode_completion, encode_prompt
    from delrec.ranking.models import describe_model
    from delrec.ranking.vllm import Options, open_backend

    with open_backend(describe_model(str(model_path)), Options(device=args.device)) as backend:
        prompts, titles = naive_requests(args, model_path, data_path, backend.tokenizer, backend.max_length)

        def naive():
            params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
            prompt_ids = [encode_prompt(backend.tokenizer, p) for p in prompts]
            completions = [[encode_completion(backend.tokenizer, t) for t in cands] for cands in titles]
            outputs = iter(backend.llm.generate(
                [TokensPrompt(prompt_token_ids=ids + c) for ids, cands in zip(prompt_ids, completions) for c in cands],
                params, use_tqdm=False))
            scores = []
            for ids, cands in zip(prompt_ids, completions):
                logprob = []
                for completion in cands:  # row len(ids) + k holds log P(completion[k] | the ids before it)
                    rows = next(outputs).prompt_logprobs
                    logprob.append(sum(rows[len(ids) + k][token].logprob for k, token in enumerate(completion)))
                scores.append(CandidateScores(logprob, [len(c) for c in cands]))
            return scores

        backend.score(prompts[:2], titles[:2])  # warm-up
        shared, shared_seconds = timed(lambda: backend.score(prompts, titles))
        backend.llm.reset_prefix_cache()  # the naive requests would not read it anyway
        naive_scores, naive_seconds = timed(naive)
    return comparison(shared, naive_scores, shared_seconds, naive_seconds, {})


def shared_vs_naive(args, model_path: Path, data_path: Path) -> dict:
    from delrec.llm.loading import ModelConfig, load_model
    from delrec.llm.scoring import score_candidates, score_candidates_naive
    from delrec.llm.tokenization import encode_prompt

    model, tokenizer = load_model(ModelConfig(str(model_path), dtype="float32", device=args.device))
    prompts, titles = naive_requests(args, model_path, data_path, tokenizer, model.config.max_position_embeddings)
    score_candidates(model, tokenizer, prompts[:2], titles[:2], batch_size=args.batch_size)  # warm-up
    shared, shared_seconds = timed(
        lambda: score_candidates(model, tokenizer, prompts, titles, batch_size=args.batch_size))
    naive, naive_seconds = timed(lambda: score_candidates_naive(model, tokenizer, prompts, titles))
    return comparison(shared, naive, shared_seconds, naive_seconds, {
        "candidates_per_instance": sum(len(t) for t in titles) / len(titles),
        "mean_prompt_tokens": sum(len(encode_prompt(tokenizer, p)) for p in prompts) / len(prompts),
    })


def readout_rows(report: dict) -> list[list[str]]:
    rows = []
    for readout in READOUTS:
        hf = report["readouts"].get(f"hf/{readout}")
        vllm = report["readouts"].get(f"vllm/{readout}")
        quality = hf[hf["dataset"]["split"]]
        rows.append([
            readout + (f" ({report['settings']['beams']} beams)" if readout == "constrained" else ""),
            f"{hf['instances_per_second']:.2f}",
            f"{vllm['instances_per_second']:.2f}" if vllm else "not run",
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
        *vllm_lines(report),
        MARK_END,
        "",
    ])


def vllm_lines(report: dict) -> list[str]:
    """The vLLM rows of the scoring table, the engine settings and the agreement with the hf backend."""
    if "vllm/score" not in report["readouts"]:
        return ["", "vLLM: not run; `--backends hf,vllm` fills the `vllm inst/s` column and adds the agreement "
                "figures."]
    n, a = report["vllm_shared_vs_naive"], report["agreement"]
    engine = report["readouts"]["vllm/score"]["backend"]
    cache = (f"{engine['kv_cache_memory_bytes'] >> 20} MiB" if engine["kv_cache_memory_bytes"]
             else f"{engine['gpu_memory_utilization']} of GPU memory")
    return [
        f"| vLLM backend: prefix-cached next-token log-probs | {n['shared_seconds']:.2f} | "
        f"{n['shared_instances_per_second']:.2f} | {n['speedup']:.1f}x | {n['max_abs_logprob_diff']:.1e} |",
        f"| vLLM naive (`prompt_logprobs`, one request per candidate) | {n['naive_seconds']:.2f} | "
        f"{n['naive_instances_per_second']:.2f} | 1.0x | – |",
        "",
        f"vLLM {engine['vllm']} ({engine['device']}), in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the same "
        f"{report['settings']['threads']} thread(s) as hf), dtype {engine['dtype']}, "
        f"{'eager' if engine['enforce_eager'] else 'compiled (not eager)'}, KV cache {cache} in blocks of "
        f"{engine['block_size']} tokens, prefix caching on, {engine['chunk_size']} instances per engine call; its "
        f"start-up (not timed above) took {report['readouts']['vllm/score']['load_seconds']:.0f} s. "
        "The vLLM speed-up row compares the backend's scoring with vLLM's own per-candidate `prompt_logprobs` "
        "requests (vLLM 0.32 does not read its prefix cache for those).",
        "",
        f"vLLM vs hf on the same {a['instances']} instances (from the two backends' rankings files):",
        "",
        "| score: top-1 agreement (ties within 1e-4 aside) | score: max abs diff of log-likelihoods | "
        "constrained: identical rankings | generate: identical greedy texts |",
        "|---:|---:|---:|---:|",
        f"| {100 * a['score_top1_agreement']:.1f}% | {a['score_max_abs_logprob_diff']:.1e} | "
        f"{100 * a['constrained_identical_rankings']:.1f}% | {100 * a['generate_identical']:.1f}% |",
    ]




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

    backends = args.backends.split(",")
    if "vllm" in backends:
        for key, value in VLLM_ENV.items():  # read when vllm is imported
            os.environ.setdefault(key, value)

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
    vllm = {"vllm_shared_vs_naive": vllm_shared_vs_naive(args, model, data), "agreement": agreement(args)} \
        if "vllm" in backends else {}
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
        **vllm,
    }
    widths = (24, 10, 24, 6, 6, 7, 10)
    for row in [HEADER, *readout_rows(report)]:
        print(" ".join(f"{cell:{'<' if i == 0 else '>'}{w}s}" for i, (cell, w) in enumerate(zip(row, widths))))
    for name, result in (("hf", naive), ("vllm", vllm.get("vllm_shared_vs_naive"))):
        if result:
            print(f"{name}: shared-prefix vs naive scoring on {result['instances']} instances: "
                  f"{result['speedup']:.1f}x faster ({result['shared_seconds']:.2f} s vs "
                  f"{result['naive_seconds']:.2f} s), max abs diff {result['max_abs_logprob_diff']:.1e}")
    if vllm:
        print("vllm vs hf:", json.dumps(vllm["agreement"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_section(args.markdown, markdown_section(report), MARK_BEGIN, MARK_END)
    print(f"wrote {args.json} and the ranking block of {args.markdown}")


if __name__ == "__main__":
    main()
