"""Load benchmark of `delrec serve` (issue #17): latency and throughput of POST /recommend.

    .venv/bin/python benchmarks/serve_load.py                          # games, student-sized SASRec
    .venv/bin/python benchmarks/serve_load.py --model runs/games-student --data runs/games

1. Prepares the games data (`--source`, RecBole atomic files) into `--data` unless it is there, and
   trains the student-sized SASRec of configs/distill/student-games.yaml (hidden 32, 1 layer) for one
   epoch into `--model` unless a model folder is given: latency depends on the shapes, not the weights.
2. The floor, in this process on `--threads` torch threads: one history's top-20 the way the server
   computes it (`top_items`: encoder + one GEMV over the item table + top-k; and through the compiled
   package), and the GEMV + top-k alone, each the median of `--floor-repeats` runs.
3. For each server setting (`max_batch_size` 64: batching on; 1: off; 64 with `--compiled true`: the
   AOTInductor package of `delrec sr compile`, compiled first) it starts `delrec serve` on a free
   loopback port with `--num_threads --threads`, then for 1, 8 and 32 concurrent clients sends
   `--requests` requests (after `--warmup` untimed ones), each a test user's history with k 20. Clients
   are threads of this process on keep-alive HTTP connections (http.client); latency is per request,
   client side. The server's own count of batches gives the mean batch size.
4. Prints a table and writes `--json` and this benchmark's block of `--markdown`.
Clients and server share the machine's cores: on 2 cores the client threads cost server time too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from results_section import write_section  # benchmarks/ is on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- serve_load -->", "<!-- /serve_load -->"
CLIENTS = (1, 8, 32)
K = 20


def prepare(args) -> None:
    import torch

    from delrec.data.loaders import load_raw
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig
    from delrec.sr import SASRecConfig, TrainConfig, train_sr

    if not (args.data / "meta.json").is_file():
        print(f"preparing {args.source} -> {args.data}", flush=True)
        prepare_dataset(load_raw("recbole", args.source), PreprocessConfig(), args.data)
    if not (args.model / "model.safetensors").is_file():
        print(f"training a student-sized SASRec for 1 epoch -> {args.model}", flush=True)
        torch.set_num_threads(2)
        student = SASRecConfig(hidden_size=32, num_layers=1, num_heads=1, inner_size=64, dropout=0.2, max_length=50)
        train_sr(args.data, student, TrainConfig(epochs=1, progress=False, device="cpu"), args.model)


def floor(args, histories) -> dict:
    """Median seconds of one request's scoring in-process: the model path, and GEMV + top-k alone."""
    import torch

    from delrec.sr import load_model
    from delrec.sr.compiled import CompiledTopK
    from delrec.sr.evaluate import top_items

    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    compiled = CompiledTopK.load(args.model, K)
    table = model.item_embeddings().detach()
    state = torch.randn(1, table.shape[1])

    def median(run) -> float:
        times = []
        for i in range(args.floor_repeats):
            start = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - start)
        return statistics.median(times[len(times) // 10:])  # the first tenth warms caches up

    with torch.inference_mode():
        model_path = median(lambda i: top_items(model, [histories[i % len(histories)]], K, True, 1))
        compiled_path = median(lambda i: compiled.top_items([histories[i % len(histories)]]))
        gemv = median(lambda i: (state @ table.T).topk(K))
    return {"model_ms": model_path * 1e3, "compiled_ms": compiled_path * 1e3, "gemv_topk_ms": gemv * 1e3,
            "items": table.shape[0], "hidden_size": table.shape[1]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, max_batch_size: int, compiled: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [str(Path(sys.executable).with_name("delrec")), "serve", "--model", str(args.model), "--data",
               str(args.data), "--port", str(port), "--num_threads", str(args.threads), "--max_batch_size",
               str(max_batch_size), "--compiled", str(compiled).lower()]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if get(port, "/health")["status"] == "ok":
                return server, port
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"delrec serve exited: {server.stderr.read()}")
            time.sleep(0.2)
    raise SystemExit("delrec serve did not answer /health within 120 s")


def get(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def load(port: int, bodies: list[bytes], clients: int, count: int, warmup: int) -> dict:
    """`clients` threads, each on its own keep-alive connection, share `warmup + count` requests."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors = [0]
    started = threading.Barrier(clients + 1)

    def client(seed: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        started.wait()
        while True:
            with lock:
                number = issued[0]
                issued[0] += 1
            if number >= warmup + count:
                break
            body = bodies[(seed * 7919 + number) % len(bodies)]
            begin = time.perf_counter()
            connection.request("POST", "/recommend", body, {"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - begin
            with lock:
                if response.status != 200:
                    errors[0] += 1
                if number >= warmup:
                    latencies.append(elapsed)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    before = get(port, "/health")
    started.wait()
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    after = get(port, "/health")
    latencies.sort()
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients, "requests": len(latencies), "errors": errors[0],
        "p50_ms": latencies[len(latencies) // 2] * 1e3, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "requests_per_s": (warmup + count) / wall,
        "mean_batch": (after["queries"] - before["queries"]) / batches if batches else 0.0,
    }


def markdown_section(report: dict) -> str:
    f = report["floor"]
    lines = [
        MARK_BEGIN,
        "## Serving a student over HTTP: `delrec serve` under load (issue #17)",
        "",
        f"`{report['command']}` — {report['date']}, {report['machine']}; server on {report['threads']} torch "
        f"thread(s); clients are threads of the benchmark process on the same machine.",
        "",
        f"Model: `{report['model']}` ({f['items']} items, hidden size {f['hidden_size']}); each request is a test "
        f"user's history with k {K}. Floor, in-process, one request: the server's scoring path (`top_items`: "
        f"encoder + GEMV over the item table + top-k) {f['model_ms']:.3f} ms, through the compiled package "
        f"(`delrec sr compile`) {f['compiled_ms']:.3f} ms; the GEMV + top-k alone {f['gemv_topk_ms']:.3f} ms.",
        "",
        "| max_batch_size | compiled | clients | requests | p50 ms | p99 ms | requests/s | mean batch | "
        "p50 / its floor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["runs"]:
        lines.append(f"| {row['max_batch_size']} | {'yes' if row['compiled'] else 'no'} | {row['clients']} | "
                     f"{row['requests']} | {row['p50_ms']:.2f} | "
                     f"{row['p99_ms']:.2f} | {row['requests_per_s']:.0f} | {row['mean_batch']:.1f} | "
                     f"{row['p50_ms'] / f['compiled_ms' if row['compiled'] else 'model_ms']:.1f}x |")
    one = next(r for r in report["runs"] if r["max_batch_size"] > 1 and not r["compiled"] and r["clients"] == 1)
    overhead = one["p50_ms"] - f["model_ms"]
    lines += ["", report["verdict"], "",
              "Batching trades the tail for throughput: a request that arrives while a large batch is being scored "
              "waits for it, so p99 grows with the batch; `--max_batch_size` bounds that wait. The p50 at one client "
              f"is the floor plus HTTP and FastAPI (about {overhead:.1f} ms here), and the client threads share the two "
              "cores with the server.", "", MARK_END]
    return "\n".join(lines) + "\n"


def verdict(report: dict) -> str:
    by = {(r["max_batch_size"], r["compiled"], r["clients"]): r for r in report["runs"]}
    one = by[(64, False, 1)]
    goal = "met" if one["p50_ms"] < 5 else "NOT met"
    on, off, fast = (by[(64, False, max(CLIENTS))], by[(1, False, max(CLIENTS))], by[(64, True, max(CLIENTS))])
    return (f"Goal p50 < 5 ms at 1 client: {goal} ({one['p50_ms']:.2f} ms; compiled "
            f"{by[(64, True, 1)]['p50_ms']:.2f} ms). At {max(CLIENTS)} clients batching "
            f"serves {on['requests_per_s']:.0f} requests/s (mean batch {on['mean_batch']:.1f}) against "
            f"{off['requests_per_s']:.0f} without ({on['requests_per_s'] / off['requests_per_s']:.2f}x), p99 "
            f"{on['p99_ms']:.1f} vs {off['p99_ms']:.1f} ms; batching and compiled: "
            f"{fast['requests_per_s']:.0f} requests/s, p99 {fast['p99_ms']:.1f} ms.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "games")
    p.add_argument("--data", type=Path, default=Path("/tmp/delrec-bench/games"), help="prepared games folder")
    p.add_argument("--model", type=Path, default=Path("/tmp/delrec-bench/games-student-serve"),
                   help="SR/student folder (trained for one epoch if missing)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of the floor)")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per client count")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--floor-repeats", type=int, default=500)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)

    prepare(args)
    compile_command = [str(Path(sys.executable).with_name("delrec")), "sr", "compile", "--model", str(args.model),
                       "--topk", str(K)]
    subprocess.run(compile_command, check=True, stdout=subprocess.DEVNULL)
    from delrec.data.dataset import PreparedDataset

    dataset = PreparedDataset.load(args.data)
    instances = dataset.instances("test")
    histories = [inst.history for inst in instances[:1000]]
    bodies = [json.dumps({"history": [dataset.items[i]["raw_id"] for i in h], "k": K}).encode() for h in histories]
    report = {
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "threads": args.threads, "model": str(args.model), "floor": floor(args, histories), "runs": [],
    }
    print(f"floor: {report['floor']}", flush=True)
    print(f"{'batch':>5} {'compiled':>8} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'mean batch':>10}")
    for max_batch_size, compiled in ((64, False), (1, False), (64, True)):
        server, port = start_server(args, max_batch_size, compiled)
        try:
            for clients in CLIENTS:
                row = {"max_batch_size": max_batch_size, "compiled": compiled,
                       **load(port, bodies, clients, args.requests, args.warmup)}
                report["runs"].append(row)
                print(f"{max_batch_size:>5} {str(compiled):>8} {clients:>7} {row['p50_ms']:>8.2f} "
                      f"{row['p99_ms']:>8.2f} {row['requests_per_s']:>8.0f} {row['mean_batch']:>10.1f}", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=60)
    report["verdict"] = verdict(report)
    print(report["verdict"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from delrec.io import write_json

    write_json(args.json, report)
    write_section(args.markdown, markdown_section(report), MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
