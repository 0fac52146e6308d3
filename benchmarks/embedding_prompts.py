"""Do prompted title embeddings carry more item knowledge than the title alone? (issue #14)

    .venv/bin/python benchmarks/embedding_prompts.py                          # lastfm then games, ~15 min on 2 cores
    .venv/bin/python benchmarks/embedding_prompts.py --datasets lastfm --llm runs/lastfm-gemma/llm/model

Decoder LLMs often give better text embeddings when the text sits in a prompt that asks for a summary
(PromptEOL: `This sentence : "X" means in one word:"`). For each wrapper in WRAPPERS, every title of the
catalogue is wrapped and embedded with `delrec.ranking.teacher_signals.embed_texts` at two read-outs: the last layer at
the last token (`delrec teacher export`'s default, BIGRec's) and the middle layer averaged over the tokens. Each
table is then judged by `delrec.distill.embedding.item_knn_hit_rate` (the 20 items nearest to the last history
item, history excluded), on a seeded `--users` training instances (far less noise than a small valid split) and
on valid users (at most `--users`). The table is printed; results go to benchmarks/results/embedding_prompts.json
and this benchmark's block of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# benchmarks/ is on sys.path when a benchmark runs as a script
from common import DATASETS, ensure_data, ensure_llm, log, machine, markdown_table, rel, text_table
from results_section import write_section
from delrec.io import write_json

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- embedding_prompts -->", "<!-- /embedding_prompts -->"
WRAPPERS = {
    "the title alone": "{title}",
    "This item: ... means in one word": 'This item: "{title}" means in one word: "',
    "the same, with the domain": 'This {domain}: "{title}" means in one word: "',
    "Describe ... in one word": 'Describe "{title}" in one word: "',
}
DOMAINS = {"lastfm": "artist", "games": "video game"}  # what "{domain}" names, per benchmark dataset
K = 20


def readouts(num_layers: int) -> dict[str, tuple[int, str]]:
    return {"last": (-1, "last"), "mid-mean": (num_layers // 2, "mean")}


def run_dataset(name: str, args, model, tokenizer) -> dict:
    from delrec.distill.embedding import item_knn_hit_rate
    from delrec.ranking.teacher_signals import embed_texts

    dataset, _ = ensure_data(name)
    splits = {"train": dataset.instances("train"), "valid": dataset.instances("valid")}
    record = {"items": dataset.num_items, "domain": DOMAINS[name], "wrappers": {}}
    for label, wrapper in WRAPPERS.items():
        texts = [wrapper.format(title=title, domain=DOMAINS[name]) for title in dataset.titles]
        record["wrappers"][label] = {}
        for readout, (layer, pooling) in readouts(model.config.num_hidden_layers).items():
            began = time.perf_counter()
            table = embed_texts(model, tokenizer, texts, args.batch_size, False, label, layer, pooling)
            seconds = time.perf_counter() - began
            knn = {split: item_knn_hit_rate(table, instances, K, args.users, args.seed)
                   for split, instances in splits.items()}
            record["wrappers"][label][readout] = {"layer": layer, "pooling": pooling, "seconds": round(seconds, 1),
                                                  **knn}
            log(f"{name} / {label} / {readout}: train {knn['train']['hit_rate']:.4f}, valid "
                f"{knn['valid']['hit_rate']:.4f} (chance {knn['train']['chance']:.4f}; {seconds:.0f} s)")
    return record


def table_rows(record: dict) -> list[list[str]]:
    rows = [["wrapper", "train, last / mid-mean", "valid, last / mid-mean", "embedding s, last / mid-mean"]]
    for label, by_readout in record["wrappers"].items():
        cells = [" / ".join(f"{r[split]['hit_rate']:.4f}" for r in by_readout.values()) for split in ("train", "valid")]
        rows.append([label, *cells, " / ".join(f"{r['seconds']:.0f}" for r in by_readout.values())])
    first = next(iter(next(iter(record["wrappers"].values())).values()))
    rows.append(["chance", f"{first['train']['chance']:.4f}", f"{first['valid']['chance']:.4f}", ""])
    return rows


def markdown_section(report: dict) -> str:
    m = report["machine"]
    lines = [MARK_BEGIN, "## Prompted title embeddings: item knowledge by the item-kNN check (issue #14)", "",
             f"Command: `{report['command']}`  ",
             f"Date: {report['date']}; {report['minutes']:.1f} min. Machine: {m['nproc']} CPUs, {m['cpu_model']}; "
             f"torch {m['torch']}; {report['threads']} torch thread(s). LLM: `{report['llm']}` in {report['dtype']}.",
             "",
             f"HR@{K} of the {K} items nearest to the last history item (`item_knn_hit_rate`: cosine on the "
             "per-feature standardised table, history excluded) on a seeded "
             f"{report['users']} training instances and at most {report['users']} valid users. Read-outs: last = the "
             "last layer at the last token (the export's default), mid-mean = the middle layer averaged over the "
             "tokens (BOS excluded). Wrappers (`{domain}` per dataset): "
             + "; ".join(f"{label}: `{w}`" for label, w in WRAPPERS.items()) + ".", ""]
    for name, record in report["datasets"].items():
        users = next(iter(next(iter(record["wrappers"].values())).values()))
        lines += [f"**{name}** ({record['items']} items; domain `{record['domain']}`; {users['train']['users']} "
                  f"training instances, {users['valid']['users']} valid users)", "",
                  markdown_table(table_rows(record)), ""]
    return "\n".join(lines + [MARK_END])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="lastfm,games", help=f"comma-separated: {', '.join(DOMAINS)}")
    p.add_argument("--llm", type=Path, default=None, help="an LLM folder (default: Gemma 3 270M, imported once)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="the LLM's dtype")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="titles per LLM forward")
    p.add_argument("--users", type=int, default=3000, help="instances per split the item-kNN check samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_prompts.json")
    p.add_argument("--results-md", dest="results_md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    args.dataset_names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in args.dataset_names if n not in DOMAINS or n not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    return args


def main(argv=None) -> int:
    import torch

    from delrec.llm.loading import ModelConfig, load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    llm = ensure_llm(args)
    model, tokenizer = load_model(ModelConfig(str(llm), dtype=args.dtype, device="cpu"))
    model.eval()
    report = {"command": "python benchmarks/embedding_prompts.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M (UTC)"), "machine": machine(),
              "threads": args.threads, "llm": rel(llm), "dtype": args.dtype, "users": args.users, "datasets": {}}
    for name in args.dataset_names:
        report["datasets"][name] = run_dataset(name, args, model, tokenizer)
        print(f"\n{name}\n" + text_table(table_rows(report["datasets"][name])), flush=True)
    report["minutes"] = round((time.perf_counter() - started) / 60, 1)
    write_json(args.json, report)
    write_section(args.results_md, markdown_section(report), MARK_BEGIN, MARK_END)
    log(f"wrote {rel(args.json)} and the {MARK_BEGIN} block of {rel(args.results_md)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
