"""CPU speed of the real LLM (issue #12, item 4): LoRA training examples/s and candidate scoring instances/s on
Last.fm prompts, float32 against bfloat16, the HF backend against vLLM, each against its FLOP floor.

    .venv/bin/python benchmarks/real_llm.py                     # Gemma 3 270M (`delrec llm import`, cached), 2 threads
    .venv/bin/python benchmarks/real_llm.py --score-instances 8 --train-steps 2 --backends hf

Steps, one after the other in one process (so the ratios are measured side by side):

1. The model: `--model FOLDER`, or `gemma-3-270m` imported into `--out/model` (delrec.llm.gguf_import; the
   conversion is cached). The data: LLaRA's Last.fm rows (`../shared/data/lastfm`, 20 fixed candidates).
2. This machine's GEMM rate per dtype, at the shapes the model runs (a token block through an MLP
   matrix, and the LM head over a few positions): the best of those is the floor's FLOP/s.
3. Per dtype: scoring the first `--score-instances` Last.fm test instances (plain template, summed
   log-likelihood, `delrec.llm.scoring.score_candidates`: the prompt once, the candidates from its
   KV cache), after one untimed warm-up instance; then `--train-steps` LoRA steps (r 8, all linear
   layers, `--train-batch` examples each; the first step is a warm-up and is not counted) with the
   stage-2 loss (`delrec.llm.training.answer_log_probs`: answer tokens only, logits only at the
   answer positions) and AdamW on the LoRA parameters; and the same with the title-listwise loss
   (`delrec.llm.listwise`: one prompt pass, the 20 candidate titles from its KV cache, a softmax
   cross-entropy over their log-likelihoods), whose floor is 2 x the scoring floor of its examples.
4. With vllm: the same requests scored by the vLLM backend (float32, compiled), engine start-up
   timed apart; where its time goes is estimated from the requests it sends (tokens computed
   versus the transformers backend's).
5. The floor: FLOPs from the model's shape (2 x parameters per token through each linear layer,
   2 x 2 x heads x head_dim x context for attention, 2 x hidden x vocab per position whose logits
   are computed) divided by the best measured GEMM rate. A LoRA step's floor is 2 x its forward
   (the backward needs activation gradients only: frozen matrices get no weight gradients).
6. Agreement of bfloat16 with float32 (top-1, max |difference| of log-likelihoods, HR@1 of each)
   and of vLLM with HF, then a table on stdout, `--json`, and this benchmark's block of
   `--markdown` (between `<!-- real_llm -->` and `<!-- /real_llm -->`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ranking import machine, prepare_data  # benchmarks/ is on sys.path when a benchmark runs as a script
from results_section import write_section

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- real_llm -->", "<!-- /real_llm -->"
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
TIE = 1e-4


# ----------------------------------------------------------------------------- the floor


def gemm_rates(dtypes: list[str], hidden: int, intermediate: int, vocab: int, tokens: int = 1024) -> dict:
    """GFLOP/s of `x @ W` per dtype at the model's two dominant shapes (median of a few repeats)."""
    import torch

    from delrec.llm.loading import DTYPES

    rates = {}
    for name in dtypes:
        dtype = DTYPES[name]
        shapes = {"mlp": (tokens, hidden, intermediate), "lm_head": (64, hidden, vocab)}
        rates[name] = {}
        for label, (m, k, n) in shapes.items():
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b  # warm-up
            seconds = []
            for _ in range(5):
                started = time.perf_counter()
                a @ b
                seconds.append(time.perf_counter() - started)
            rates[name][label] = round(2 * m * k * n / sorted(seconds)[2] / 1e9, 1)
    return rates


class FlopModel:
    """FLOPs of a decoder forward pass from its config (gated MLP, grouped-query attention, sliding windows)."""

    def __init__(self, config):
        text = getattr(config, "text_config", config)
        self.hidden = text.hidden_size
        heads = text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or self.hidden // heads
        kv_heads = getattr(text, "num_key_value_heads", heads)
        self.attention_width = heads * self.head_dim
        per_layer = (self.hidden * self.attention_width * 2 + self.hidden * kv_heads * self.head_dim * 2
                     + 3 * self.hidden * text.intermediate_size)
        self.layers = text.num_hidden_layers
        self.linear_per_token = 2 * per_layer * self.layers
        self.vocab = text.vocab_size
        types = getattr(text, "layer_types", None) or ["full_attention"] * self.layers
        window = getattr(text, "sliding_window", None)
        self.windows = [window if kind == "sliding_attention" and window else None for kind in types]

    def tokens(self, count: int, context_start: int = 0) -> float:
        """FLOPs of `count` tokens at positions context_start.. (each attends to itself and all before, or its window)."""
        attention = 0.0
        for window in self.windows:
            for position in range(context_start, context_start + count):
                attention += 4 * self.attention_width * (min(position + 1, window) if window else position + 1)
        return count * self.linear_per_token + attention

    def logits(self, positions: int) -> float:
        return 2.0 * self.hidden * self.vocab * positions


def scoring_flops(flops: FlopModel, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]]) -> float:
    """The useful FLOPs of `score_candidates`: each prompt once (+ its last logits), each candidate's m - 1 new tokens."""
    total = 0.0
    for prompt, candidates in zip(prompt_ids, candidate_ids):
        total += flops.tokens(len(prompt)) + flops.logits(1)
        for candidate in candidates:
            total += flops.tokens(len(candidate) - 1, len(prompt)) + flops.logits(len(candidate) - 1)
    return total


# ----------------------------------------------------------------------------- the measurements


def requests(model_path: Path, dataset, tokenizer, count: int):
    from delrec.llm.tokenization import encode_completion
    from delrec.prompts import get_template
    from delrec.ranking.models import describe_model
    from delrec.ranking.requests import build_requests

    spec = describe_model(str(model_path))
    return build_requests(dataset, "test", spec, get_template("plain"), tokenizer, 1024,
                          lambda titles: max(len(encode_completion(tokenizer, t)) for t in titles), count)


def time_scoring(model, tokenizer, reqs, batch_size: int) -> tuple[float, list]:
    from delrec.llm.scoring import score_candidates

    score_candidates(model, tokenizer, [reqs[0].prompt], [list(reqs[0].titles)], batch_size=batch_size)  # warm-up
    started = time.perf_counter()
    scores = score_candidates(model, tokenizer, [r.prompt for r in reqs], [list(r.titles) for r in reqs],
                              batch_size=batch_size, progress=True)
    return time.perf_counter() - started, scores


def time_training(model, tokenizer, dataset, args, flops: FlopModel, objective: str = "answer") -> dict:
    """Seconds per LoRA step (warm-up step excluded) on Last.fm plain-template stage-2 examples, and its floor FLOPs.

    `answer`: the answer-only LM loss; `listwise`: the title-listwise loss over the 20 candidates."""
    import torch

    from delrec.llm.instances import InstanceOptions, build_instances
    from delrec.llm.listwise import ListwiseCollator, listwise_loss
    from delrec.llm.loading import LoraSettings, apply_lora
    from delrec.llm.training import AnswerCollator, answer_log_probs
    from delrec.prompts import get_template

    batch, steps = args.train_batch, args.train_steps
    rows = build_instances(dataset, get_template("plain"), InstanceOptions(
        split="train", sr_model="SASRec", domain="artist", max_instances=batch * (steps + 1)), tokenizer).rows
    examples = [{"input_ids": r["input_ids"],
                 "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]} for r in rows]
    peft_model = apply_lora(model, LoraSettings(r=8, alpha=16, dropout=0.05))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    collate = AnswerCollator(tokenizer.pad_token_id)
    peft_model.train()
    seconds, floor_flops, real_tokens, padded_tokens, losses = [], 0.0, 0, 0, []
    for step in range(steps + 1):
        chunk = examples[step * batch:(step + 1) * batch]
        inputs = collate(chunk)
        listwise = ListwiseCollator(tokenizer)([rows[i] for i in range(step * batch, (step + 1) * batch)])
        started = time.perf_counter()
        if objective == "listwise":
            loss = listwise_loss(peft_model, **listwise, batch_size=args.batch_size * 4)
        else:
            log_probs, keep = answer_log_probs(peft_model, inputs)
            loss = -log_probs.sum() / keep.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if step == 0:
            continue  # warm-up
        seconds.append(elapsed)
        losses.append(round(loss.item(), 4))
        if objective == "listwise":
            floor_flops += 2 * scoring_flops(flops, listwise["prompts"], listwise["candidates"])
        else:
            answer = int((inputs["labels"][:, 1:] != -100).sum(1).max()) + 1
            for example in chunk:
                floor_flops += 2 * (flops.tokens(len(example["input_ids"])) + flops.logits(answer))
        real_tokens += sum(len(e["input_ids"]) for e in chunk)
        padded_tokens += inputs["input_ids"].numel()
    peft_model.unload()
    total = sum(seconds)
    return {"steps": steps, "batch": batch, "seconds_per_step": round(total / steps, 3),
            "examples_per_second": round(steps * batch / total, 4), "floor_flops": floor_flops,
            "mean_tokens_per_example": round(real_tokens / (steps * batch), 1),
            "padding_share": round(1 - real_tokens / padded_tokens, 3), "losses": losses}


def vllm_scoring(model_path: Path, reqs, dtype: str) -> dict:
    from delrec.ranking.models import describe_model
    from delrec.ranking.vllm import CPU_BLOCK_SIZE, Options, open_backend

    started = time.perf_counter()
    with open_backend(describe_model(str(model_path)), Options(device="cpu", dtype=dtype, max_model_len=1024)) as b:
        start_seconds = time.perf_counter() - started
        prompts, titles = [r.prompt for r in reqs[:1]], [list(r.titles) for r in reqs[:1]]
        b.score(prompts, titles)  # warm-up
        started = time.perf_counter()
        scores = b.score([r.prompt for r in reqs], [list(r.titles) for r in reqs])
        seconds = time.perf_counter() - started
        block = b.settings()["block_size"] or CPU_BLOCK_SIZE
    return {"start_seconds": round(start_seconds, 1), "seconds": seconds, "scores": scores, "block_size": block}


def vllm_token_work(prompt_ids, candidate_ids, block: int) -> dict:
    """Tokens the vLLM scoring requests compute (prefix cache: whole blocks are reused) vs the HF backend's."""
    vllm_tokens, requests_sent, hf_tokens = 0, 0, 0
    for prompt, candidates in zip(prompt_ids, candidate_ids):
        vllm_tokens += len(prompt)  # the prompt alone, computed and cached
        prefixes = {tuple(c[:j]) for c in candidates for j in range(1, len(c))}  # each trie node with children
        for prefix in prefixes:
            length = len(prompt) + len(prefix)
            vllm_tokens += length - ((length - 1) // block) * block  # its last, partial block is recomputed
        requests_sent += 1 + len(prefixes)
        hf_tokens += len(prompt) + sum(len(c) - 1 for c in candidates)
    return {"vllm_tokens": vllm_tokens, "hf_tokens": hf_tokens, "vllm_requests": requests_sent}


def agreement(got, expected, targets_index) -> dict:
    top1 = sum(b.logprob[max(range(len(a.logprob)), key=lambda j: (a.logprob[j], -j))] >= max(b.logprob) - TIE
               for a, b in zip(got, expected))
    diff = max(abs(x - y) for a, b in zip(got, expected) for x, y in zip(a.logprob, b.logprob))
    return {"top1_agreement": round(top1 / len(expected), 4), "max_abs_logprob_diff": diff,
            "hr@1": round(hr_at_1(got, targets_index), 4), "reference_hr@1": round(hr_at_1(expected, targets_index), 4)}


def hr_at_1(scores, targets_index) -> float:
    """HR@1 with ties at their expected value."""
    total = 0.0
    for score, target in zip(scores, targets_index):
        best = max(score.logprob)
        winners = [j for j, v in enumerate(score.logprob) if v == best]
        total += (target in winners) / len(winners)
    return total / len(scores)


# ----------------------------------------------------------------------------- report


def run_row(name: str, dtype: str, count: int, seconds: float, floor_flops: float, rate: float, peak: float) -> dict:
    """Throughput of `count` items in `seconds`, against the floor at `rate` GFLOP/s (and at the best, `peak`)."""
    floor_seconds = floor_flops / (rate * 1e9)
    return {"run": name, "dtype": dtype, "measured": round(count / seconds, 3),
            "floor": round(count / floor_seconds, 3), "ratio": seconds / floor_seconds,
            "best_floor": round(count / (floor_flops / (peak * 1e9)), 3)}


def markdown_section(report: dict) -> str:
    m, rates, rows = report["machine"], report["gemm_gflops"], report["runs"]
    peak = report["floor_gflops"]
    lines = [
        MARK_BEGIN,
        "## The real LLM on CPU: Gemma 3 270M, LoRA training and candidate scoring (issue #12)",
        "",
        f"`{report['command']}` — {report['finished']} UTC, {m['cpu_model']}, {m['nproc']} cores, "
        f"{report['settings']['threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}; "
        f"{report['wall_seconds'] / 60:.1f} min in all. Model: {report['model']['parameters'] / 1e6:.0f} M parameters "
        f"({report['model']['linear_gflop_per_token']:.2f} GFLOP per token through the linear layers, "
        f"{report['model']['lm_head_gflop_per_position']:.2f} GFLOP per position for the LM head). Last.fm test "
        f"prompts (plain template, 20 candidates): {report['scoring_instances']} instances, "
        f"{report['mean_prompt_tokens']:.0f} prompt tokens on average.",
        "",
        "GEMM rate of this machine (GFLOP/s, MLP block and LM head shapes): "
        + "; ".join(f"{d}: {r['mlp']} / {r['lm_head']}" for d, r in rates.items())
        + f". Floor = useful FLOPs / the dtype's best GEMM rate; last column: at {peak} GFLOP/s, the best of all.",
        "",
        "| run | dtype | measured | floor (this dtype's GEMM rate) | measured / floor | floor at the best rate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['run']} | {row['dtype']} | {row['measured']} | {row['floor']} | {row['ratio']:.1f}x "
                     f"| {row['best_floor']} |")
    lines += ["", "Agreement:", ""]
    for name, value in report["agreement"].items():
        lines.append(f"- {name}: top-1 {100 * value['top1_agreement']:.1f}%, max |Δ log-likelihood| "
                     f"{value['max_abs_logprob_diff']:.2e}, HR@1 {value['hr@1']:.3f} vs {value['reference_hr@1']:.3f}")
    if "vllm_work" in report:
        w = report["vllm_work"]
        lines += ["", f"vLLM: engine start {report['vllm_start_seconds']} s (not timed above); its scoring requests "
                      f"compute {w['vllm_tokens']} tokens in {w['vllm_requests']} requests where the HF backend "
                      f"computes {w['hf_tokens']} (block size {w['block_size']})."]
    lines += ["", *report.get("notes", []), MARK_END]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="an imported model folder (default: import gemma-3-270m)")
    p.add_argument("--score-instances", type=int, default=24)
    p.add_argument("--train-steps", type=int, default=3, help="timed LoRA steps (one warm-up step more)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="scoring: sequences per forward pass")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--objectives", default="answer,listwise", help="stage-2 losses to time: answer, listwise")
    p.add_argument("--backends", default="hf,vllm", help="comma-separated: hf, vllm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "real_llm")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "real_llm.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args()
    backends, dtypes = args.backends.split(","), args.dtypes.split(",")
    if "vllm" in backends:
        for key, value in VLLM_ENV.items():
            os.environ.setdefault(key, value)

    import torch

    from delrec.llm.gguf_import import import_model
    from delrec.llm.loading import ModelConfig, load_model
    from delrec.llm.tokenization import encode_completion, encode_prompt

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_path = args.model or args.out / "model"
    if args.model is None and not (model_path / "config.json").is_file():
        import_model("gemma-3-270m", model_path)
    dataset = prepare_data("lastfm", args.out / "data-lastfm")

    runs, scores, report = [], {}, {"agreement": {}, "notes": []}
    flops = None
    for dtype in dtypes:
        model, tokenizer = load_model(ModelConfig(str(model_path), dtype=dtype, device="cpu"))
        if flops is None:
            flops = FlopModel(model.config)
            rates = gemm_rates(dtypes, flops.hidden, model.config.intermediate_size, flops.vocab)
            peak = max(max(r.values()) for r in rates.values())
            reqs = requests(model_path, dataset, tokenizer, args.score_instances)
            prompt_ids = [encode_prompt(tokenizer, r.prompt) for r in reqs]
            candidate_ids = [[encode_completion(tokenizer, t) for t in r.titles] for r in reqs]
            score_floor = scoring_flops(flops, prompt_ids, candidate_ids)
            targets = [r.candidates.index(r.target) for r in reqs]
            report.update(model={"parameters": sum(q.numel() for q in model.parameters()),
                                 "linear_gflop_per_token": flops.linear_per_token / 1e9,
                                 "lm_head_gflop_per_position": flops.logits(1) / 1e9},
                          gemm_gflops=rates, floor_gflops=peak, scoring_instances=len(reqs),
                          mean_prompt_tokens=sum(map(len, prompt_ids)) / len(reqs))
            print(f"GEMM GFLOP/s: {rates}; floor at {peak} GFLOP/s", flush=True)
        rate = max(rates[dtype].values())
        seconds, scores[f"hf/{dtype}"] = time_scoring(model, tokenizer, reqs, args.batch_size)
        runs.append(run_row("scoring, hf (instances/s)", dtype, len(reqs), seconds, score_floor, rate, peak))
        print(runs[-1], flush=True)
        for objective in args.objectives.split(","):
            train = time_training(model, tokenizer, dataset, args, flops, objective)
            examples = train["steps"] * train["batch"]
            name = f"LoRA training, {objective} loss, batch {train['batch']} (examples/s)"
            runs.append({**run_row(name, dtype, examples, examples / train["examples_per_second"],
                                   train["floor_flops"], rate, peak), "details": train})
            print(runs[-1], flush=True)
        del model
    if "bfloat16" in dtypes and "float32" in dtypes:
        report["agreement"]["hf bfloat16 vs float32"] = agreement(scores["hf/bfloat16"], scores["hf/float32"], targets)
    if "vllm" in backends:
        result = vllm_scoring(model_path, reqs, "float32")
        runs.append(run_row("scoring, vllm (instances/s)", "float32", len(reqs), result["seconds"], score_floor,
                            max(rates["float32"].values()), peak))
        report["agreement"]["vllm vs hf, float32"] = agreement(result["scores"], scores["hf/float32"], targets)
        report["vllm_start_seconds"] = result["start_seconds"]
        report["vllm_work"] = {**vllm_token_work(prompt_ids, candidate_ids, result["block_size"]),
                               "block_size": result["block_size"]}
        print(runs[-1], flush=True)
    report.update({
        "command": " ".join(["python benchmarks/real_llm.py", *sys.argv[1:]]),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": time.perf_counter() - started,
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("json", "markdown")},
        "runs": runs,
    })
    print(f"{'run':<62} {'dtype':<9} {'measured':>9} {'floor':>9} {'ratio':>7}")
    for row in runs:
        print(f"{row['run']:<62} {row['dtype']:<9} {row['measured']:>9} {row['floor']:>9} {row['ratio']:>6.1f}x")
    print(json.dumps(report["agreement"], indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    write_section(args.markdown, markdown_section(report), MARK_BEGIN, MARK_END)
    print(f"wrote {args.json} and the real_llm block of {args.markdown}")


if __name__ == "__main__":
    main()
