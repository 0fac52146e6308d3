"""`delrec serve` under abuse: bodies too large, too slow or abandoned, JSON that breaks the parser, NaN scores.

Socket-level cases talk raw HTTP/1.1 to a real uvicorn server in a thread of this process (an ephemeral
port, a 1000-byte body limit and a 0.5 s read timeout); the JSON cases use FastAPI's TestClient. Every
refusal must be the house shape, `{"error": ...}` with a 4xx/5xx status, and leave at most one log line.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.sr import load_model

pytest.importorskip("fastapi", reason="delrec serve needs the [serve] extra (FastAPI + uvicorn)")

import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import delrec.serving  # noqa: E402
from delrec.serving import Query, Recommender, ScoreError, create_app  # noqa: E402

READ_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def recommender(sr_model, tiny_llm_data):
    return Recommender(load_model(sr_model), PreparedDataset.load(tiny_llm_data))


@pytest.fixture(scope="module")
def known_id(tiny_llm_data):
    return PreparedDataset.load(tiny_llm_data).items[0]["raw_id"]


@pytest.fixture(scope="module")
def live(recommender):
    """A uvicorn server on an ephemeral port: (port, server); uvicorn leaves logging alone (log_config=None)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    app = create_app(recommender, max_body_bytes=1000, read_timeout=READ_TIMEOUT)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield listener.getsockname()[1], server
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def head(length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /recommend HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
            .encode())


def until_closed(connection: socket.socket) -> tuple[int, dict]:
    """The response, read until the server closes the connection (a socket timeout fails the test)."""
    connection.settimeout(5)
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in headers.lower()
    return int(status_line.split()[1]), json.loads(body)


def served_records(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name.startswith("uvicorn")]


def test_a_declared_oversized_body_gets_413_before_it_is_sent(live):
    port, _ = live
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head(50_000_000))  # not a byte of the body
        status, answer = until_closed(connection)
    assert status == 413
    assert answer == {"error": "the body has 50000000 bytes, more than the 1000 this server accepts"}


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(live):
    port, _ = live
    chunk = b"258\r\n" + b" " * 600 + b"\r\n"  # 600 bytes, twice: over the 1000 with no Content-Length to go by
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head() + chunk + chunk)
        status, answer = until_closed(connection)
    assert status == 413 and answer == {"error": "the body is longer than the 1000 bytes this server accepts"}


def test_a_half_sent_body_times_out_with_408_and_frees_the_connection(live, caplog):
    port, server = live
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    with socket.create_connection(("127.0.0.1", port)) as connection:
        started = time.monotonic()
        connection.sendall(head(100) + b'{"history": ')
        status, answer = until_closed(connection)
        waited = time.monotonic() - started
    assert status == 408 and answer == {
        "error": "the body did not arrive within 0.5 s (12 bytes came); the connection is closed"}
    assert READ_TIMEOUT <= waited < READ_TIMEOUT + 2
    deadline = time.monotonic() + 2
    while server.server_state.connections:  # the server let go of the socket, not just the client
        assert time.monotonic() < deadline, "the timed-out connection is still held"
        time.sleep(0.01)
    (record,) = served_records(caplog)
    assert record.exc_info is None and "12 body byte(s) in 0.5 s, the read timeout" in record.getMessage()


def test_a_client_gone_mid_body_costs_one_log_line(live, caplog, known_id):
    port, _ = live
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head(100) + b'{"history": ')
    deadline = time.monotonic() + 5
    while not served_records(caplog):
        assert time.monotonic() < deadline, "the disconnect was not logged"
        time.sleep(0.01)
    (record,) = served_records(caplog)
    assert record.levelno == logging.WARNING and record.exc_info is None
    message = record.getMessage()
    assert "\n" not in message and message.endswith(
        "POST /recommend: the client disconnected after 12 body byte(s); nothing answered")
    with socket.create_connection(("127.0.0.1", port)) as connection:  # and the server goes on
        body = json.dumps({"history": [known_id], "k": 2}).encode()
        connection.sendall(head(len(body)).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + body)
        status, answer = until_closed(connection)
    assert status == 200 and len(answer["items"]) == 2


@pytest.fixture(scope="module")
def client(recommender):
    with TestClient(create_app(recommender)) as client:
        yield client


@pytest.mark.parametrize("body, error", [
    (b'{"history": "OK", "k": ' + b"9" * 5000 + b"}",
     "the body holds a number of 5000 digits; a k or an item id has at most 100"),
    (b'{"history": "OK", "k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "the body nests arrays or objects too deeply; a request is one flat JSON object"),
    (b'{"history": "OK", "k": ' + b'{"k": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
     "the body nests arrays or objects too deeply; a request is one flat JSON object"),
    (b'{"history": "OK", "k": NaN}', "the body is not valid JSON (NaN is not a JSON value)"),
    (b'{"history": ["' + b"x" * 100_000 + b'"]}',
     f"field 'history[0]': unknown item id '{'x' * 79}... (100002 characters); expected a raw item id of the "
     "dataset's items.jsonl"),
    (b'{"history": "OK", "k": 1, "k": 2}', "field 'k' appears twice in one object; give each field once"),
], ids=["5000-digit k", "100000-deep array", "100000-deep object", "NaN", "100 KB id", "duplicate key"])
def test_json_that_breaks_the_parser_gets_400(body, error, client, known_id, caplog):
    response = client.post("/recommend", content=body.replace(b'"OK"', json.dumps([known_id]).encode()),
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json() == {"error": error}
    assert not served_records(caplog)
    assert client.get("/health").json()["status"] == "ok"


def test_a_nan_model_is_a_500_with_one_log_line_never_nan_in_json(sr_model, tiny_llm_data, known_id, caplog):
    model = load_model(sr_model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    broken = Recommender(model, PreparedDataset.load(tiny_llm_data))
    with TestClient(create_app(broken)) as client:
        response = client.post("/recommend", json={"history": [known_id]})
        assert response.status_code == 500
        error = json.loads(response.text, parse_constant=pytest.fail)["error"]  # strict JSON: no NaN anywhere
        assert error == ("internal error: ScoreError: the model gave this history a score that is not a finite "
                         "number; its weights are likely broken (NaN or inf): retrain or restore the model folder")
        assert client.get("/health").json()["status"] == "ok"
    (record,) = served_records(caplog)
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert record.getMessage() == f"testclient:50000 POST /recommend: {error}"


def test_a_non_finite_compiled_score_fails_only_its_own_query(sr_model, tiny_llm_data):
    """The compiled graph skips eager torch, and its checks: the server's own guard is the last one."""
    dataset = PreparedDataset.load(tiny_llm_data)

    def top_items(histories):
        return [[(5, float("inf") if tuple(history) == (0,) else 2.0), (6, 1.0)] for history in histories]

    compiled = SimpleNamespace(exclude_history=True, topk=20, top_items=top_items,
                               path=Path("/srv/models/student/compiled/top20.pt2"))
    recommender = Recommender(load_model(sr_model), dataset, compiled=compiled)
    poisoned, healthy = recommender.answer([Query((0,), 2, False), Query((1,), 2, False)])
    error = (f"the model scored item {dataset.items[5]['raw_id']!r} inf for this history, not a finite number; its "
             "weights are likely broken (NaN or inf): retrain or restore the model folder")
    assert isinstance(poisoned, ScoreError) and str(poisoned) == error
    assert [(item["id"], item["score"]) for item in healthy["items"]] == [
        (dataset.items[5]["raw_id"], 2.0), (dataset.items[6]["raw_id"], 1.0)]
    with TestClient(create_app(recommender)) as client:
        response = client.post("/recommend", json={"history": [dataset.items[0]["raw_id"]], "k": 2})
        assert response.status_code == 500 and response.json() == {"error": f"internal error: ScoreError: {error}"}
        assert client.get("/health").json()["compiled"] == "top20.pt2"


def test_the_cli_passes_its_limits_and_health_names_no_path(sr_model, tiny_llm_data, monkeypatch):
    served = []
    monkeypatch.setattr(delrec.serving, "serve", lambda app, host, port: served.append(app))
    assert main(["serve", "--model", str(sr_model), "--data", str(tiny_llm_data), "--max_body_bytes", "10"]) == 0
    with TestClient(served[0]) as client:
        health = client.get("/health").json()
        assert (health["model"], health["data"]) == (sr_model.name, tiny_llm_data.name)
        assert not [value for value in health.values() if isinstance(value, str) and "/" in value]
        response = client.post("/recommend", content=b'{"history": ["an id"]}')
        assert response.status_code == 413 and response.json() == {
            "error": "the body has 22 bytes, more than the 10 this server accepts"}


@pytest.mark.parametrize("flag, value, error", [
    ("--max_body_bytes", "0", "max_body_bytes must be at least 1, got 0"),
    ("--read_timeout", "0", "read_timeout must be a positive number of seconds, got 0.0"),
    ("--read_timeout", "inf", "read_timeout must be a positive number of seconds, got inf"),
])
def test_bad_limits_are_refused(flag, value, error, capsys):
    assert main(["serve", "--model", "m", "--data", "d", flag, value]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"delrec serve: error: {error}"]
