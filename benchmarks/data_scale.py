"""How the cost of `delrec data prepare` grows with the data (issue #35, item 4).

Generates synthetic interaction CSVs (`interactions.csv` + `items.csv`, the generic csv format) of 1M, 10M and
100M interactions - 20 per user on average, items 1/40 of the interactions, Zipf-like popularity, string user ids,
integer timestamps: the shape of the measurement in the issue (100,000 users, 2.04M interactions, 50,000 items) -
then runs `delrec data prepare --format csv` on each in a fresh process and records wall time, peak RSS (the
process's maxrss) and interactions per second. With `--baseline DIR`, the same command also runs from another
checkout (e.g. the commit before the Arrow data layer) at the sizes up to `--baseline_max`, side by side in one run.

    .venv/bin/python benchmarks/data_scale.py --sizes 1e6 1e7 1e8 --baseline ../old-checkout --baseline_max 1e7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, cpu_model, log, markdown_table, rel
from results_section import write_section

OUT = ROOT / "benchmarks" / "out" / "data_scale"
RESULTS = ROOT / "benchmarks" / "results" / "data_scale.json"
CHUNK = 5_000_000  # rows generated and written at a time


def generate(interactions: int, folder: Path, seed: int = 0) -> dict:
    """Write a synthetic csv dataset of `interactions` rows (unless one of that size is there); its shape."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pv

    users, items = max(interactions // 20, 1), max(interactions // 40, 100)
    shape = {"interactions": interactions, "users": users, "items": items, "seed": seed}
    done = folder / "shape.json"
    if done.is_file() and json.loads(done.read_text()) == shape:
        return shape
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    titles = pa.table({"item": np.arange(items), "title": [f"Item {k} title" for k in range(items)]})
    unquoted = pv.WriteOptions(quoting_style="none", quoting_header="none")  # as pandas and Spark write csv; quoted files read line by line
    pv.write_csv(titles, folder / "items.csv", unquoted)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    cumulative = np.cumsum(popularity / popularity.sum())
    with pv.CSVWriter(folder / "interactions.csv", pa.schema([("user", pa.string()), ("item", pa.int64()),
                                                            ("timestamp", pa.int64())]), write_options=unquoted) as writer:
        for start in range(0, interactions, CHUNK):
            n = min(CHUNK, interactions - start)
            user = rng.integers(0, users, n)
            item = np.minimum(np.searchsorted(cumulative, rng.random(n)), items - 1)
            stamp = 1_600_000_000 + rng.integers(0, 86_400 * 365, n)
            user = pc.binary_join_element_wise("u", pc.cast(pa.array(user), pa.string()), "")
            writer.write_table(pa.table({"user": user, "item": item, "timestamp": stamp}))
    done.write_text(json.dumps(shape))
    return shape


def prepare(checkout: Path, data: Path, out: Path) -> dict:
    """Run `delrec data prepare` from `checkout` in a fresh process: wall seconds and peak RSS."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "delrec", "data", "prepare", "--format", "csv", "--input",
                                str(data), "--out", str(out), "--overwrite"], cwd=checkout,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(checkout)})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"prepare failed in {checkout}: {process.stderr.read().decode()[-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "fingerprint": meta["fingerprint"], "users": meta["counts"]["users"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--baseline", type=Path, help="another checkout to run side by side (the old data layer)")
    parser.add_argument("--baseline_max", type=float, default=1e7, help="largest size the baseline runs at")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and prepared folders")
    args = parser.parse_args()
    rows = []
    for size in map(int, args.sizes):
        data = OUT / f"raw-{size}"
        log(f"generating {size:,} interactions")
        shape = generate(size, data)
        runs = [("arrow", ROOT)] + ([("baseline", args.baseline.resolve())]
                                   if args.baseline and size <= args.baseline_max else [])
        for name, checkout in runs:
            log(f"prepare {size:,} with {name}")
            result = prepare(checkout, data, OUT / f"prepared-{name}-{size}")
            row = {"interactions": size, "layer": name, **result, "users_generated": shape["users"],
                   "items_generated": shape["items"],
                   "interactions_per_second": round(size / result["seconds"]),
                   "peak_rss_bytes_per_interaction": round(result["peak_rss_mb"] * 2**20 / size, 1)}
            rows.append(row)
            log(json.dumps(row))
        same = {r["fingerprint"] for r in rows if r["interactions"] == size}
        if len([r for r in rows if r["interactions"] == size]) > 1:
            log(f"same prepared dataset from both layers: {len(same) == 1}")
        if not args.keep:
            subprocess.run(["rm", "-rf", str(data), *map(str, OUT.glob(f"prepared-*-{size}"))], check=True)
    record = {"command": " ".join(["benchmarks/data_scale.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "machine": {"nproc": os.cpu_count(), "cpu_model": cpu_model()}, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    header = ["interactions", "layer", "seconds", "interactions/s", "peak RSS MB", "bytes/interaction", "fingerprint"]
    table = markdown_table([header] + [[f"{r['interactions']:,}", r["layer"], str(r["seconds"]),
                                        f"{r['interactions_per_second']:,}", str(r["peak_rss_mb"]),
                                        str(r["peak_rss_bytes_per_interaction"]), r["fingerprint"]] for r in rows])
    print(table)
    write_section(ROOT / "benchmarks" / "RESULTS.md", "\n".join([
        "<!-- data_scale -->",
        "## Data preparation at scale: the Arrow data layer (issue #35, item 4)",
        "",
        f"`.venv/bin/python {record['command']}` - {record['date']}, {record['machine']['cpu_model']}, "
        f"{record['machine']['nproc']} cores. Synthetic csv data (20 interactions per user, items 1/40 of the "
        "interactions, Zipf-like popularity), `delrec data prepare --format csv` in a fresh process; peak RSS is "
        "the process's maxrss; `baseline` is the checkout given with --baseline (the line-by-line data layer), run "
        "side by side in the same invocation. Per-size rows: benchmarks/results/data_scale.json.",
        "", table, "", "<!-- /data_scale -->"]), "<!-- data_scale -->", "<!-- /data_scale -->")
    log(f"wrote {rel(RESULTS)} and its RESULTS.md block")


if __name__ == "__main__":
    main()
