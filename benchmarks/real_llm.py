"""The real LLM against its FLOP floor on CPU (issues #12 and #30): every LLM path - candidate scoring, stage 1
(soft rows only) and stage 2 (LoRA), each with the answer and the title-listwise loss - timed on today's code and
settings and on the new ones side by side in one run, each against its floor at the bfloat16 GEMM rate measured in
the same run, with peak RSS and (with --profile) the top operators of one step.

    .venv/bin/python benchmarks/real_llm.py --model runs/gemma --profile        # speed, ~25 min on 2 cores
    .venv/bin/python benchmarks/real_llm.py --model runs/gemma --mode agreement  # bfloat16 vs float32 rankings
    .venv/bin/python benchmarks/real_llm.py --device cuda --shape gemma-3-270m   # on a GPU, random weights

Variants (each path of each variant runs in a fresh process, so peak RSS is the path's own):

- `today`: the code of `--baseline` (a commit before issue #30, unpacked with `git archive`) with the settings the
  Gemma configs used: float32 weights, no autocast, transformers' default attention (SDPA).
- `new`: this checkout with the library defaults: `mixed_precision: auto` (bfloat16 where this CPU measures it
  faster: frozen weights in bfloat16, LoRA matrices and soft rows in float32, the Trainer's autocast), eager
  attention on CPU, training with compiled decoder layers where `torch_compile: auto` compiles them (the warm-up
  step absorbs the compilation; its seconds are reported apart); scoring in float32 (the default: bfloat16 rankings agree too little), and once more with
  `--dtype bfloat16` (`new-bf16`); the training paths once more without compiled layers (`new-eager`), so that what
  compilation adds is measured side by side too.

Paths, on LLaRA's Last.fm rows (`../shared/data/lastfm`, 20 fixed candidates), `--train-batch` examples a step,
one untimed warm-up step: `scoring` (the first `--score-instances` test instances, plain template,
`delrec.llm.scoring.score_candidates`); `stage1-answer`, `stage1-listwise` (a P = 100 soft prompt, the only thing
that trains, on stage-2 `lsr` prompts: the same shape as stage 1's TA/RPS prompts); `stage2-answer`,
`stage2-listwise` (LoRA r 8 on all linear layers, the soft prompt frozen; LoRA dropout as the Gemma config of each
variant: 0.05 `today`, 0 `new`). The optimizer and the loss
are those of the stages (AdamW; `answer_log_probs`, `listwise_loss`).

Floors: FLOPs from the model's shape (2 x parameters per token through each linear layer, 2 x 2 x heads x head_dim x
context for attention, 2 x hidden x vocab per position whose logits are needed), real tokens only (padding is
waste), divided by the best GEMM rate measured here (MLP block and LM head shapes, float32 and bfloat16). A training
step's floor is 2 x its forward: the backward needs activation gradients only (frozen matrices get no weight
gradients; LoRA's are negligible).

`--mode agreement`: the first `--agreement-instances` test instances of Last.fm (then valid ones: it has 122 test
users) and of games (`--games`, a prepared folder), scored by the new path in float32 and in bfloat16: top-1 agreement, the largest
log-likelihood difference and HR@1 of each (the bar for bfloat16 scoring by default: top-1 >= 95%).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# benchmarks/ is on sys.path when a benchmark runs as a script
from common import FlopModel, gemm_rates, llm_machine as machine, prepare_data, scoring_flops, synchronize
from results_section import write_section

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- real_llm -->", "<!-- /real_llm -->"
AGREE_BEGIN, AGREE_END = "<!-- real_llm_agreement -->", "<!-- /real_llm_agreement -->"
PATHS = ("scoring", "stage1-answer", "stage1-listwise", "stage2-answer", "stage2-listwise")
DEFAULT_BASELINE = "f743908"  # main before issue #30
SOFT_TOKENS = 100
PROMPT_LIMIT = 1024  # longest prompt + answer, in tokens
SHAPES = {  # random-weight models of these shapes when real weights are not at hand (speed does not need them)
    "gemma-3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                         sliding_window=512, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True),
}
TIE = 1e-4


# ----------------------------------------------------------------------------- the floor


# ----------------------------------------------------------------------------- one path, in a worker process


def variant_settings(variant: str, device: str) -> dict:
    """dtype, attention, autocast and scoring dtype of a variant; `new` asks the library (this checkout only);
    `new-bf16` is `new` scoring with `--dtype bfloat16` (not the default: see the agreement block)."""
    if variant == "today":
        return {"train_dtype": "float32", "score_dtype": "float32", "attention": None, "autocast": False,
                "lora_dropout": 0.05}  # the Gemma configs' LoRA dropout at the baseline
    from delrec.llm.loading import ModelConfig
    from delrec.llm.trainer import TrainingSettings, training_model_config, training_precision

    precision = training_precision(TrainingSettings(), device)
    config = training_model_config(ModelConfig("model", dtype="auto", device=device), precision)
    return {"train_dtype": config.dtype, "score_dtype": "bfloat16" if variant == "new-bf16" else "float32",
            "attention": None, "autocast": precision == "bf16", "precision": precision,
            "lora_dropout": gemma_config_dropout()}


def gemma_config_dropout() -> float:
    """The LoRA dropout the shipped Gemma stage-2 config trains with now."""
    import yaml

    return float(yaml.safe_load((ROOT / "configs" / "delrec" / "gemma-lastfm-finetune.yaml").read_text())["lora_dropout"])


def load(model_path: str, dtype: str, attention: str | None, device: str):
    from delrec.llm.loading import ModelConfig, load_model

    return load_model(ModelConfig(model_path, dtype=dtype, device=device, attn_implementation=attention))


def stage_rows(dataset, tokenizer, soft, count: int, template: str = "lsr"):
    from delrec.llm.instances import InstanceOptions, build_instances
    from delrec.prompts import get_template

    return list(build_instances(dataset, get_template(template), InstanceOptions(
        split="train", soft_prompt=soft.placeholder_text() if soft else None, sr_model="SASRec", domain="artist",
        max_instances=count), tokenizer).rows)


def run_path(args) -> dict:
    """Time one path of one variant: seconds, floor FLOPs, losses, peak RSS, and a profile of one more step."""
    import torch

    from delrec.data.dataset import PreparedDataset

    torch.set_num_threads(args.threads)
    settings = variant_settings(args.variant, args.device)
    dataset = PreparedDataset.load(args.data)
    if args.path == "scoring":
        model, tokenizer = load(args.model, settings["score_dtype"], settings["attention"], args.device)
        result = time_scoring(model, tokenizer, dataset, args)
    else:
        model, tokenizer = load(args.model, settings["train_dtype"], settings["attention"], args.device)
        result = time_training(model, tokenizer, dataset, args, settings)
    import delrec

    return {**result, "settings": {**settings, "attention": model.config._attn_implementation,
                                   "weights": str(model.dtype).removeprefix("torch.")},
            "delrec": str(Path(delrec.__file__).parent),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_gpu_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device.startswith("cuda")
                            else None)}


def time_scoring(model, tokenizer, dataset, args) -> dict:
    from delrec.llm.scoring import score_candidates
    from delrec.llm.tokenization import encode_completion, encode_prompt

    reqs = requests(args.model, dataset, tokenizer, args.score_instances)
    flops = FlopModel(model.config)
    floor = scoring_flops(flops, [encode_prompt(tokenizer, r.prompt) for r in reqs],
                          [[encode_completion(tokenizer, t) for t in r.titles] for r in reqs])

    def run(chosen):
        return score_candidates(model, tokenizer, [r.prompt for r in chosen], [list(r.titles) for r in chosen],
                                batch_size=args.batch_size)

    run(reqs[:1])  # warm-up
    synchronize(args.device)
    started = time.perf_counter()
    scores = run(reqs)
    synchronize(args.device)
    seconds = time.perf_counter() - started
    profile = profiled(lambda: run(reqs[:2]), args) if args.profile else None
    return {"items": len(reqs), "unit": "instances", "seconds": seconds, "floor_flops": floor, "profile": profile,
            "logprobs": [s.logprob for s in scores],
            "targets": [r.candidates.index(r.target) for r in reqs]}


def time_training(model, tokenizer, dataset, args, settings: dict) -> dict:
    """Seconds per step (warm-up excluded) and the floor FLOPs of the timed steps."""
    import torch

    from delrec.llm.listwise import ListwiseCollator, listwise_loss
    from delrec.llm.loading import LoraSettings, apply_lora
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.trainer import AnswerCollator, answer_log_probs

    stage, objective = args.path.split("-")
    soft = SoftPrompt("sasrec", SOFT_TOKENS).add_to(model, tokenizer)
    batch, steps = args.train_batch, args.train_steps
    rows = stage_rows(dataset, tokenizer, soft, batch * (steps + 2))
    if stage == "stage1":
        trained = soft.train_only_soft_prompt(model)
        if trained.shape[0] == SOFT_TOKENS:
            optimizer = torch.optim.AdamW([trained], lr=1e-2, weight_decay=0.0)
        else:  # today's code: the whole matrix, masked, with Adam state for the soft rows only
            from delrec.llm.stage1 import SoftRowsAdamW

            optimizer = SoftRowsAdamW(trained, soft.token_ids, lr=1e-2)
    else:
        soft.freeze(model)
        named = {f.name for f in dataclasses.fields(LoraSettings)}  # `today`'s tree said alpha/dropout
        shape = {"lora_alpha": 16, "lora_dropout": settings["lora_dropout"]} if "lora_alpha" in named else \
            {"alpha": 16, "dropout": settings["lora_dropout"]}
        model = apply_lora(model, LoraSettings(r=8, **shape))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    if args.variant == "new":  # the stages' decision: compiled decoder layers where `torch_compile: auto` says so
        from delrec.llm.trainer import TrainingSettings, compile_layers, compiles_layers

        settings["compiled"] = compiles_layers(TrainingSettings(), model)
        if settings["compiled"]:
            compile_layers(model)
    model.train()
    answers, listwise = AnswerCollator(tokenizer.pad_token_id), ListwiseCollator(tokenizer)
    flops = FlopModel(model.config)
    autocast = (torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if settings["autocast"]
                else contextlib.nullcontext())

    def step(index: int) -> tuple[float, float]:
        chunk = rows[index * batch:(index + 1) * batch]
        with autocast:
            if objective == "listwise":
                inputs = listwise(chunk)
                loss = listwise_loss(model, inputs["prompts"], inputs["candidates"], inputs["targets"],
                                     batch_size=args.batch_size * 4)
                floor = 2 * scoring_flops(flops, inputs["prompts"], inputs["candidates"])
            else:
                inputs = answers([{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in
                                                                             zip(r["input_ids"], r["completion_mask"])]}
                                  for r in chunk])
                inputs = {k: v.to(args.device) for k, v in inputs.items()}
                log_probs, keep = answer_log_probs(model, inputs)
                loss = -log_probs.sum() / keep.sum()
                answer = int((inputs["labels"][:, 1:] != -100).sum(1).max()) + 1
                floor = sum(2 * (flops.tokens(len(r["input_ids"])) + flops.logits(answer)) for r in chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), floor

    started = time.perf_counter()
    step(0)  # warm-up (and compilation, where the layers are compiled)
    warmup_seconds = time.perf_counter() - started
    step_seconds, floor_flops, losses = [], 0.0, []
    for index in range(1, steps + 1):
        synchronize(args.device)
        started = time.perf_counter()
        loss, floor = step(index)
        synchronize(args.device)
        step_seconds.append(time.perf_counter() - started)
        floor_flops += floor
        losses.append(round(loss, 4))
    # the median step times the steps: one step stalled by a neighbour on the shared host (seen: -35%) moves it little
    seconds = statistics.median(step_seconds) * steps
    profile = profiled(lambda: step(steps + 1), args) if args.profile else None
    real = sum(len(r["input_ids"]) for r in rows[batch:(steps + 1) * batch])
    padded = sum(max(len(r["input_ids"]) for r in rows[i * batch:(i + 1) * batch]) * batch for i in range(1, steps + 1))
    return {"items": steps * batch, "unit": "examples", "seconds": seconds, "floor_flops": floor_flops,
            "losses": losses, "warmup_seconds": round(warmup_seconds, 1),
            "step_seconds": [round(t, 2) for t in step_seconds],
            "padding_share": round(1 - real / padded, 3), "profile": profile,
            "mean_tokens": round(real / (steps * batch), 1)}


def profiled(run, args, top: int = 10) -> list[dict]:
    """The top operators of one run by self time (torch.profiler), each with its share of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run()
    events = [e for e in prof.key_averages() if e.self_device_time_total or e.self_cpu_time_total]
    key = (lambda e: e.self_device_time_total) if args.device.startswith("cuda") else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    return [{"op": e.key, "share": round(key(e) / total, 3), "ms": round(key(e) / 1e3, 1), "calls": e.count}
            for e in sorted(events, key=key, reverse=True)[:top]]


def requests(model_path, dataset, tokenizer, count: int, splits: tuple[str, ...] = ("test",)):
    """The first `count` instances of `splits` that fit the model's context, in turn (Last.fm has 122 test users:
    valid fills up to 200), prompt + answer within PROMPT_LIMIT tokens as `delrec rank` shortens them (packed scoring
    keeps sliding windows in its masks, so Gemma's 512-token window no longer caps them)."""
    from delrec.errors import DelrecError
    from delrec.llm.tokenization import encode_completion
    from delrec.prompts import get_template
    from delrec.ranking.models import describe_model
    from delrec.ranking.requests import requests_for

    spec, template, longest = describe_model(str(model_path)), get_template("plain"), PROMPT_LIMIT
    found = []
    for split in splits:
        instances, candidates = dataset.instances(split), dataset.candidates(split)
        for index in range(len(instances)):
            if len(found) >= count:
                return found
            try:
                found += requests_for(instances[index:index + 1], candidates[index:index + 1], dataset.titles, split,
                                      spec, template, tokenizer, longest,
                                      lambda titles: max(len(encode_completion(tokenizer, t)) for t in titles))
            except DelrecError:
                continue
    return found


# ----------------------------------------------------------------------------- agreement


def agreement(got: list[list[float]], expected: list[list[float]], targets: list[int]) -> dict:
    top1 = sum(b[max(range(len(a)), key=lambda j: (a[j], -j))] >= max(b) - TIE for a, b in zip(got, expected))
    diff = max(abs(x - y) for a, b in zip(got, expected) for x, y in zip(a, b))
    return {"instances": len(expected), "top1_agreement": round(top1 / len(expected), 4),
            "max_abs_logprob_diff": round(diff, 4), "hr@1": round(hr_at_1(got, targets), 4),
            "reference_hr@1": round(hr_at_1(expected, targets), 4)}


def hr_at_1(scores: list[list[float]], targets: list[int]) -> float:
    """HR@1 with ties at their expected value."""
    total = 0.0
    for values, target in zip(scores, targets):
        winners = [j for j, v in enumerate(values) if v == max(values)]
        total += (target in winners) / len(winners)
    return total / len(scores)


def run_agreement(args, model_path: str) -> dict:
    import torch

    from delrec.data.dataset import PreparedDataset
    from delrec.llm.scoring import score_candidates

    torch.set_num_threads(args.threads)
    results = {}
    for name in ("lastfm", "games"):
        folder = args.out / f"data-{name}"
        dataset = prepare_data("lastfm", folder) if name == "lastfm" else PreparedDataset.load(args.games)
        scores = {}
        for dtype in ("float32", "bfloat16"):
            model, tokenizer = load(model_path, dtype, None, args.device)
            reqs = requests(model_path, dataset, tokenizer, args.agreement_instances, ("test", "valid"))
            scores[dtype] = [s.logprob for s in score_candidates(model, tokenizer, [r.prompt for r in reqs],
                                                                 [list(r.titles) for r in reqs],
                                                                 batch_size=args.batch_size, progress=True)]
            del model
        results[name] = agreement(scores["bfloat16"], scores["float32"], [r.candidates.index(r.target) for r in reqs])
        print(name, results[name], flush=True)
    return results


# ----------------------------------------------------------------------------- the parent


def baseline_tree(rev: str, out: Path) -> Path:
    """The code of commit `rev`, unpacked once under `out` (git archive: no worktree state to clean up)."""
    tree = out / f"baseline-{rev}"
    if not (tree / "delrec" / "__init__.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "delrec", "prompts"], check=True,
                                 capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def worker(args, variant: str, path: str, tree: Path) -> dict:
    """Run one path of one variant in a fresh process whose `delrec` is the one in `tree`."""
    out = args.out / f"{variant}-{path}.json"
    command = [sys.executable, __file__, "--worker", "--variant", variant, "--path", path, "--model", str(args.model),
               "--data", str(args.data), "--result", str(out), "--threads", str(args.threads),
               "--device", args.device, "--score-instances", str(args.score_instances),
               "--train-steps", str(args.train_steps), "--train-batch", str(args.train_batch),
               "--batch-size", str(args.batch_size), *(["--profile"] if args.profile else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "benchmarks")])}
    env.pop("DELREC_CPU_BFLOAT16", None)
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def row(result: dict, variant: str, path: str, rate: float) -> dict:
    floor_seconds = result["floor_flops"] / (rate * 1e9)
    return {"variant": variant, "path": path, "unit": result["unit"],
            "per_second": round(result["items"] / result["seconds"], 3),
            "floor_per_second": round(result["items"] / floor_seconds, 3),
            "ratio": round(result["seconds"] / floor_seconds, 2), "mfu": round(floor_seconds / result["seconds"], 3),
            "peak_rss_gb": result["peak_rss_gb"],
            "weights": result["settings"]["weights"], "attention": result["settings"]["attention"],
            "autocast": result["settings"]["autocast"] and path != "scoring",  # scoring runs without autocast
            "compiled": bool(result["settings"].get("compiled")), "warmup_seconds": result.get("warmup_seconds"),
            "lora_dropout": result["settings"].get("lora_dropout") if path.startswith("stage2") else None}


def markdown_section(report: dict) -> str:
    m, rates, rows = report["machine"], report["gemm_gflops"], report["rows"]
    lines = [
        MARK_BEGIN,
        "## The real LLM at its FLOP floor: today's path and the new one, side by side (issue #30)",
        "",
        f"`{report['command']}` — {report['finished']} UTC, {m['cpu_model']}, {m['nproc']} cores, "
        f"{report['settings']['threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}; "
        f"{report['wall_seconds'] / 60:.1f} min in all. `today` = the code of {report['baseline']} with float32 "
        "weights; `new` = this code's defaults (`new-eager`: without compiled layers). Training: batch "
        f"{report['settings']['train_batch']}, the median of {report['settings']['train_steps']} timed steps after a "
        "warm-up, "
        "Last.fm `lsr` prompts with a 100-token soft prompt; scoring: "
        f"{report['settings']['score_instances']} Last.fm test instances (plain template, 20 candidates).",
        "",
        "GEMM rate (GFLOP/s, MLP block / LM head shapes): "
        + "; ".join(f"{d}: {r['mlp']} / {r['lm_head']}" for d, r in rates.items())
        + f". Floor = useful FLOPs (real tokens only) / {report['floor_gflops']} GFLOP/s, the best of them.",
        "",
        "| path | variant | weights, attention, autocast (LoRA dropout, compilation) | measured /s | floor /s | measured / floor "
        "| new / today "
        "| peak RSS GB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    today = {r["path"]: r for r in rows if r["variant"] == "today"}
    for r in rows:
        gain = f"{r['per_second'] / today[r['path']]['per_second']:.2f}x" if r["variant"] in ("new", "new-eager") and \
            r["path"] in today else ""
        dropout = "" if r.get("lora_dropout") is None else f", LoRA dropout {r['lora_dropout']}"
        dropout += f", compiled layers ({r['warmup_seconds']:.0f} s warm-up)" if r.get("compiled") else ""
        lines.append(f"| {r['path']} ({r['unit']}) | {r['variant']} | {r['weights']}, {r['attention']}, "
                     f"{'yes' if r['autocast'] else 'no'}{dropout} | {r['per_second']} | {r['floor_per_second']} | "
                     f"{r['ratio']:.2f}x | {gain} | {r['peak_rss_gb']} |")
    if report.get("profiles"):
        lines += ["", "Top operators of one step (torch.profiler, share of self CPU time):", ""]
        for name, ops in report["profiles"].items():
            lines.append(f"- {name}: " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in ops[:6]))
    lines += ["", *report.get("notes", []), MARK_END]
    return "\n".join(lines) + "\n"


def agreement_section(report: dict) -> str:
    m = report["machine"]
    lines = [AGREE_BEGIN, "### bfloat16 scoring against float32: do the rankings agree? (issue #30, item 4)", "",
             f"`{report['command']}` — {report['finished']} UTC, {m['cpu_model']}, {m['nproc']} cores; the new "
             "scoring path (eager attention, log-likelihoods finished in float32) with bfloat16 weights against "
             "float32 weights, first test (then valid) instances of each dataset (plain template).", "",
             "| dataset | instances | top-1 agreement | max abs log-likelihood diff | HR@1 bfloat16 | HR@1 float32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["agreement"].items():
        lines.append(f"| {name} | {r['instances']} | {100 * r['top1_agreement']:.1f}% | {r['max_abs_logprob_diff']} "
                     f"| {r['hr@1']} | {r['reference_hr@1']} |")
    lines += [AGREE_END]
    return "\n".join(lines) + "\n"


def random_model(shape: str, out: Path) -> Path:
    """A random-initialised model of a known shape with a tokenizer, for speed runs where real weights are absent."""
    folder = out / f"random-{shape}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from delrec.llm.tiny import TinyLLMConfig, tokenizer_corpus, train_tokenizer

    config = AutoConfig.for_model(**SHAPES[shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    titles = prepare_data("lastfm", out / "data-lastfm").titles
    train_tokenizer(tokenizer_corpus(titles, None), TinyLLMConfig(vocab_size=8192)).save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an imported model folder (default: import gemma-3-270m)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="no real weights: a random-initialised model of this shape (speed only)")
    p.add_argument("--mode", choices=("speed", "agreement"), default="speed")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--variants", default="today,new")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="the commit whose code is `today`")
    p.add_argument("--score-instances", type=int, default=24)
    p.add_argument("--agreement-instances", type=int, default=200)
    p.add_argument("--games", type=Path, default=ROOT / "runs" / "games", help="agreement: a prepared games folder")
    p.add_argument("--train-steps", type=int, default=5,
                   help="timed steps (one warm-up step more); their median times a step")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="scoring: sequences per forward pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="profile one more step of every path")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "real_llm")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = run_path(args)
        args.result.write_text(json.dumps(result) + "\n", encoding="utf-8")
        return

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.shape:
        args.model = str(random_model(args.shape, args.out))
    elif args.model is None:
        from delrec.llm.gguf_import import import_model

        args.model = str(args.out / "model")
        if not (Path(args.model) / "config.json").is_file():
            import_model("gemma-3-270m", args.model)
    report = {"command": " ".join(["python benchmarks/real_llm.py", *sys.argv[1:]]), "machine": machine(),
              "settings": {k: str(v) for k, v in vars(args).items() if k not in ("json", "markdown")}}
    if args.mode == "agreement":
        report["agreement"] = run_agreement(args, str(args.model))
        report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
        out = args.json or ROOT / "benchmarks" / "results" / "real_llm_agreement.json"
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_section(args.markdown, agreement_section(report), AGREE_BEGIN, AGREE_END)
        return

    import torch
    from transformers import AutoConfig

    torch.set_num_threads(args.threads)
    args.data = args.out / "data-lastfm"
    prepare_data("lastfm", args.data)
    flops = FlopModel(AutoConfig.from_pretrained(args.model))
    dtypes = ["float32", "bfloat16"]
    rates = gemm_rates(dtypes, flops.hidden, flops.intermediate, flops.vocab, args.device)
    peak = max(max(r.values()) for r in rates.values())
    print(f"GEMM GFLOP/s: {rates}; floor at {peak} GFLOP/s", flush=True)
    trees = {"today": baseline_tree(args.baseline, args.out), "new": ROOT, "new-bf16": ROOT, "new-eager": ROOT}
    rows, profiles, results = [], {}, {}
    for path in args.paths.split(","):
        extra = ["new-bf16"] if path == "scoring" else ["new-eager"] if "new" in args.variants.split(",") else []
        for variant in args.variants.split(",") + extra:
            result = worker(args, variant, path, trees[variant])
            results[f"{variant}/{path}"] = {k: v for k, v in result.items() if k not in ("logprobs", "targets")}
            rows.append(row(result, variant, path, peak))
            if result.get("profile"):
                profiles[f"{path}, {variant}"] = result["profile"]
            print(rows[-1], flush=True)
        if path == "scoring" and {"today", "new"} <= set(args.variants.split(",")):
            today, new = (json.loads((args.out / f"{v}-scoring.json").read_text()) for v in ("today", "new"))
            report["scoring_agreement"] = agreement(new["logprobs"], today["logprobs"], today["targets"])
    report.update(gemm_gflops=rates, floor_gflops=peak, rows=rows, profiles=profiles, results=results,
                  baseline=args.baseline, finished=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
                  wall_seconds=time.perf_counter() - started)
    print(f"{'path':<18} {'variant':<7} {'/s':>8} {'floor/s':>8} {'ratio':>7} {'MFU':>6} {'RSS GB':>7}")
    for r in rows:
        print(f"{r['path']:<18} {r['variant']:<7} {r['per_second']:>8} {r['floor_per_second']:>8} "
              f"{r['ratio']:>6.2f}x {r['mfu']:>6} {r['peak_rss_gb']:>7}")
    out = args.json or ROOT / "benchmarks" / "results" / ("real_llm.json" if args.device == "cpu"
                                                          else f"real_llm_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if args.device == "cpu":
        write_section(args.markdown, markdown_section(report), MARK_BEGIN, MARK_END)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
