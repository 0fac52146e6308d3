"""`delrec serve`: the served answer is `sr predict`'s, bad requests get 400 naming the field, load is batched.

In-process tests use FastAPI's TestClient (the app's lifespan runs, so the scoring thread is real);
one test starts the console script on a free port, talks HTTP to it and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.io import read_jsonl
from delrec.sr import load_model
from delrec.sr.evaluate import write_predictions

pytest.importorskip("fastapi", reason="delrec serve needs the [serve] extra (FastAPI + uvicorn)")

from fastapi.testclient import TestClient  # noqa: E402

from delrec.serving import Batcher, Query, Recommender, create_app  # noqa: E402


@pytest.fixture(scope="module")
def recommender(sr_model, tiny_llm_data):
    return Recommender(load_model(sr_model), PreparedDataset.load(tiny_llm_data))


@pytest.fixture(scope="module")
def client(recommender):
    with TestClient(create_app(recommender, max_batch_size=8)) as client:
        yield client


def raw_history(dataset: PreparedDataset, history) -> list:
    return [dataset.items[i]["raw_id"] for i in history]


def test_served_answers_equal_the_offline_predictions(client, sr_model, tiny_llm_data, tmp_path):
    dataset = PreparedDataset.load(tiny_llm_data)
    write_predictions(tmp_path / "p.jsonl", load_model(sr_model), dataset, "test", 20)
    for instance, (_, row) in zip(dataset.instances("test"), read_jsonl(tmp_path / "p.jsonl")):
        response = client.post("/recommend", json={"history": raw_history(dataset, instance.history)})
        assert response.status_code == 200
        served = response.json()["items"]
        assert [item["id"] for item in served] == [dataset.items[i]["raw_id"] for i in row["items"]]
        assert [item["title"] for item in served] == [dataset.items[i]["title"] for i in row["items"]]
        assert [item["score"] for item in served] == pytest.approx(row["scores"], abs=1e-5)


def test_k_and_keep_history(client, tiny_llm_data):
    dataset = PreparedDataset.load(tiny_llm_data)
    history = raw_history(dataset, dataset.instances("test")[0].history)
    top3 = client.post("/recommend", json={"history": history, "k": 3}).json()["items"]
    assert len(top3) == 3 and not {item["id"] for item in top3} & set(history)
    everything = client.post("/recommend", json={"history": history, "k": 40, "keep_history": True}).json()["items"]
    assert len(everything) == 40 and set(history) <= {item["id"] for item in everything}
    scores = [item["score"] for item in everything]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("body, field", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "the body must be a JSON object"),
    (b'{"histroy": ["1"]}', "unknown field 'histroy'"),
    (b'{"history": "1 2"}', "field 'history': expected a list"),
    (b'{"history": []}', "field 'history': empty"),
    (b'{"history": ["no-such-item"]}', "field 'history[0]': unknown item id 'no-such-item'"),
    (b'{"history": [null]}', "field 'history[0]': unknown item id None"),
    (b'{"history": "LONG"}', "field 'history': 1001 items, more than the 1000"),
    (b'{"history": "OK", "k": 0}', "field 'k': expected an integer from 1 to the catalogue size (40), got 0"),
    (b'{"history": "OK", "k": 41}', "got 41"),
    (b'{"history": "OK", "k": "5"}', "got '5'"),
    (b'{"history": "OK", "keep_history": "yes"}', "field 'keep_history'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_get_400_naming_the_field(body, field, client, tiny_llm_data):
    known = PreparedDataset.load(tiny_llm_data).items[0]["raw_id"]
    body = body.replace(b'"OK"', json.dumps([known]).encode()).replace(b'"LONG"', json.dumps([known] * 1001).encode())
    response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert field in response.json()["error"]
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_an_internal_failure_is_a_500_and_the_server_goes_on(recommender, monkeypatch, tiny_llm_data):
    history = [PreparedDataset.load(tiny_llm_data).items[0]["raw_id"]]
    answer = recommender.answer
    calls = []

    def fail_once(queries):
        calls.append(len(queries))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return answer(queries)

    monkeypatch.setattr(recommender, "answer", fail_once)
    with TestClient(create_app(recommender)) as client:
        failed = client.post("/recommend", json={"history": history})
        assert failed.status_code == 500 and "out of memory" in failed.json()["error"]
        assert client.post("/recommend", json={"history": history}).status_code == 200


def test_waiting_queries_are_scored_as_one_batch_with_the_same_answers(recommender, tiny_llm_data, monkeypatch):
    dataset = PreparedDataset.load(tiny_llm_data)
    queries = [Query(inst.history, 1 + i % 7, i % 3 == 0) for i, inst in enumerate(dataset.instances("test")[:20])]
    alone = [recommender.answer([q])[0] for q in queries]
    release = threading.Event()
    answer, sizes = recommender.answer, []

    def held(batch):  # the first batch waits, so the other 19 queue up behind it
        sizes.append(len(batch))
        release.wait(timeout=10)
        return answer(batch)

    monkeypatch.setattr(recommender, "answer", held)
    batcher = Batcher(recommender, max_batch_size=64)
    futures = [batcher.submit(queries[0])]
    while not sizes:
        time.sleep(0.001)
    futures += [batcher.submit(q) for q in queries[1:]]
    release.set()
    answers = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert sizes == [1, 19] and batcher.batches == 2 and batcher.queries == 20
    for got, expected in zip(answers, alone):
        assert [i["id"] for i in got["items"]] == [i["id"] for i in expected["items"]]
        assert [i["score"] for i in got["items"]] == pytest.approx([i["score"] for i in expected["items"]], abs=1e-5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_console_script_serves_over_http_and_stops_on_sigterm(sr_model, tiny_llm_data, tmp_path):
    port = free_port()
    script = Path(sys.executable).with_name("delrec")
    server = subprocess.Popen([str(script), "serve", "--model", str(sr_model), "--data", str(tiny_llm_data), "--port",
                               str(port), "--num_threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = call(base + "/health")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.1)
        assert status == 200 and health["items"] == 40 and health["torch_threads"] == 1
        dataset = PreparedDataset.load(tiny_llm_data)
        status, answer = call(base + "/recommend", {"history": raw_history(dataset, [0, 1, 2]), "k": 5})
        assert status == 200 and len(answer["items"]) == 5
        status, error = call(base + "/recommend", {"history": ["nope"]})
        assert status == 400 and "unknown item id 'nope'" in error["error"]
        second = subprocess.run([str(script), "serve", "--model", str(sr_model), "--data", str(tiny_llm_data),
                                 "--port", str(port)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 2 and second.stderr.strip() == (  # the port is taken: one line, exit 2
            f"delrec serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another "
            "--port, or a --host of this machine")
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode == -signal.SIGTERM, err  # uvicorn re-raises the signal after its graceful shutdown
    assert f"on http://127.0.0.1:{port}" in out and "stopped: 1 request(s) scored in 1 batch(es)" in out



def test_the_shipped_config_validates_and_flags_override_it():
    from delrec.cli.serve import ServeArguments
    from delrec.config import parse_command

    config = Path(__file__).resolve().parents[1] / "configs" / "serve" / "student.yaml"
    (args,) = parse_command([ServeArguments], ["--config", str(config), "--port", "9001"], "delrec serve")
    assert (args.model, args.data, args.port, args.num_threads) == ("runs/games-student-dllm2rec", "runs/games", 9001, 1)
    with pytest.raises(DelrecError, match="port must be in 1..65535, got 0"):
        parse_command([ServeArguments], ["--config", str(config), "--port", "0"], "delrec serve")
