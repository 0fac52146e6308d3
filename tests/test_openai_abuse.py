"""`delrec rank` against servers that misbehave, and scores that are no numbers.

A fake OpenAI-compatible server (http.server in a thread, an ephemeral port) answers each endpoint as a
test says: wrong JSON shapes, NaN, overflowing numbers, a trickle, a flood, a redirect to another server.
Every case must end as the house error (exit 2, one stderr line naming the URL and the field) with nothing
written. The score check shared by every backend is tested on the transformers backend with NaN weights and
on canned backends.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers

import delrec.ranking.openai as openai_backend
from cli_checks import one_line_error, run_cli, snapshot
from delrec.errors import DelrecError
from delrec.io import read_jsonl
from delrec.llm.scoring import CandidateScores
from delrec.ranking import hf
from delrec.ranking.base import Backend, ReadoutConfig, rankings_writer, read_out
from delrec.ranking.requests import RankingRequest
from delrec.ranking.trie import beam_search, build_trie

MODELS = {"object": "list", "data": [{"id": "tiny", "max_model_len": 512}]}
TRICKLE_SECONDS = 0.1  # between two bytes of a trickled answer
TIMEOUT = 0.5  # --timeout of the trickle tests: the good answer would take ~15 s at that pace


def echoed(body: dict, value: float = -1.0) -> dict:
    """A completions answer echoing each prompt with log-probability `value` for all its tokens but the first."""
    return {"choices": [{"index": i, "text": "", "logprobs": {"token_logprobs": [None] + [value] * (len(ids) - 1)}}
                        for i, ids in enumerate(body["prompt"])]}


def reply(answer, status: int = 200, headers: dict | None = None):
    """A route answering `answer`: bytes, text, or a function of the request's JSON body giving either."""

    def respond(handler: BaseHTTPRequestHandler, body: dict) -> None:
        data = answer(body) if callable(answer) else answer
        data = data.encode() if isinstance(data, str) else data
        handler.send_response(status)
        for name, value in {"content-type": "application/json", "content-length": str(len(data)),
                            **(headers or {})}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    return respond


def completions(make) -> dict:
    """Routes with the good /models and `make(request body) -> answer object` for /completions."""
    return {"/v1/completions": reply(lambda body: json.dumps(make(body)))}


def trickle(headers_too: bool):
    """A route sending a good /models answer a byte every `TRICKLE_SECONDS`, from its status line on or after its
    headers (a socket timeout bounds each read, and each byte comes well within one)."""

    def respond(handler: BaseHTTPRequestHandler, body: dict) -> None:
        data = json.dumps(MODELS).encode()
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
        start = 0 if headers_too else len(head)
        try:
            handler.wfile.write(head[:start])
            for byte in (head + data)[start:]:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(TRICKLE_SECONDS)
        except OSError:  # the client hung up, as it should
            pass
        handler.close_connection = True

    return respond


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        self.server.seen.append((self.path, self.headers.get("authorization")))
        self.server.routes.get(self.path, reply('{"error": "no such route"}', 404))(self, body)

    do_POST = do_GET


class FakeServer(ThreadingHTTPServer):
    """Good answers on /v1/models and /v1/completions unless `routes` (path -> route) says otherwise; `seen` lists
    each request's path and Authorization header."""

    daemon_threads = True

    def __init__(self, routes: dict):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes = {"/v1/models": reply(json.dumps(MODELS)),
                       "/v1/completions": reply(lambda body: json.dumps(echoed(body))), **routes}
        self.seen: list[tuple[str, str | None]] = []
        self.root = f"http://127.0.0.1:{self.server_port}/v1"


@pytest.fixture
def serve():
    """`serve(routes)` starts a `FakeServer`; all stop with the test."""
    servers = []

    def start(routes: dict | None = None) -> FakeServer:
        server = FakeServer(routes or {})
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def rank_argv(root: str, model, data, out, *extra) -> list:
    return ["rank", "--backend", "openai", "--base_url", root, "--model", model, "--data", data, "--out", out,
            "--max_instances", "2", "--no_progress", "--timeout", "10", *extra]


def with_logprobs(value: str):
    """/completions routes whose echoed log-probabilities are the JSON text `value` (NaN, 1e400, ...)."""
    return {"/v1/completions": reply(lambda body: json.dumps(echoed(body)).replace("-1.0", value))}


GENERATE = ("--readout", "generate")
CASES = {  # name: (endpoint, routes, extra flags, facts of the message)
    "models: a list": ("/models", {"/v1/models": reply("[]")}, (), ["a list of 0", "expected a JSON object"]),
    "models: null": ("/models", {"/v1/models": reply("null")}, (), ["sent null", "expected a JSON object"]),
    "models: names, not objects": ("/models", {"/v1/models": reply('{"data": ["m"]}')}, (),
                                   ["field 'data[0]'", "'m'"]),
    "max_model_len: text": ("/models", {"/v1/models": reply('{"data": [{"id": "m", "max_model_len": "abc"}]}')}, (),
                            ["field 'data[0].max_model_len'", "'abc'", "a context length"]),
    "max_model_len: negative": ("/models", {"/v1/models": reply('{"data": [{"id": "m", "max_model_len": -5}]}')},
                                (), ["field 'data[0].max_model_len'", "sent -5, which is invalid"]),
    "max_model_len: 5000 digits": (
        "/models", {"/v1/models": reply('{"data": [{"id": "m", "max_model_len": ' + "9" * 5000 + "}]}")}, (),
        ["invalid JSON", "5000 digits"]),
    "models: nested 200000 deep": ("/models", {"/v1/models": reply("[" * 200_000 + "]" * 200_000)}, (),
                                   ["invalid JSON", "nested too deeply"]),
    "completions: a list": ("/completions", {"/v1/completions": reply("[]")}, (), ["expected a JSON object"]),
    "choices: null": ("/completions", completions(lambda body: {"choices": None}), (),
                      ["field 'choices'", "sent null"]),
    "choices: strings": ("/completions", completions(lambda body: {"choices": ["x"] * len(body["prompt"])}), (),
                         ["field 'choices[0]'", "'x'"]),
    "choices: one missing": ("/completions", completions(lambda body: {"choices": echoed(body)["choices"][1:]}), (),
                             ["field 'choices'", "answered 15 choices for 16 prompts"]),
    "index: text": ("/completions", completions(lambda body: {"choices": [
        {**choice, "index": "a"} for choice in echoed(body)["choices"]]}), (), ["field 'choices[0].index'", "'a'"]),
    "index: twice": ("/completions", completions(lambda body: {"choices": [
        {**choice, "index": 0} for choice in echoed(body)["choices"]]}), (),
        ["field 'choices[1].index'", "sent 0", "each once"]),
    "logprobs: a list": ("/completions", completions(lambda body: {"choices": [
        {"index": i, "logprobs": [1, 2]} for i in range(len(body["prompt"]))]}), (),
        ["field 'choices[0].logprobs'", "expected an object"]),
    "token_logprobs: text": ("/completions", with_logprobs('"abc"'), (),
                             ["field 'choices[0].logprobs.token_logprobs[", "'abc'", "a log-probability"]),
    "token_logprobs: NaN": ("/completions", with_logprobs("NaN"), (), ["invalid JSON", "NaN is not a JSON number"]),
    "token_logprobs: Infinity": ("/completions", with_logprobs("-Infinity"), (),
                                 ["invalid JSON", "Infinity is not a JSON number"]),
    "token_logprobs: 1e400, infinite as a float": ("/completions", with_logprobs("-1e400"), (),
                                                   ["field 'choices[0].logprobs.token_logprobs[", "-inf"]),
    "token_logprobs: 1e308, summing to infinity": ("/completions", with_logprobs("1e308"), (),
                                                   ["field 'choices[0].logprobs.token_logprobs[", "1e+308"]),
    "generate: text a number": ("/completions", completions(lambda body: {"choices": [
        {"index": i, "text": 12345} for i in range(len(body["prompt"]))]}), GENERATE,
        ["field 'choices[0].text'", "12345"]),
    "generate: token ids out of range": ("/completions", completions(lambda body: {"choices": [
        {"index": i, "text": "", "token_ids": [10**12, -5]} for i in range(len(body["prompt"]))]}), GENERATE,
        ["field 'choices[0].token_ids[0]'", "1000000000000", "a token id"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_misbehaving_server_is_one_line_naming_the_url_and_the_field(case, serve, export_llama, tiny_llm_data,
                                                                        tmp_path, capsys):
    endpoint, routes, extra, facts = CASES[case]
    server = serve(routes)
    code = run_cli(rank_argv(server.root, export_llama, tiny_llm_data, tmp_path / "ranks", *extra))
    one_line_error(capsys, code, server.root + endpoint, *facts)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
def test_a_trickling_server_is_cut_off_at_the_timeout(headers_too, serve, export_llama, tiny_llm_data, tmp_path,
                                                      capsys):
    server = serve({"/v1/models": trickle(headers_too)})
    argv = [*rank_argv(server.root, export_llama, tiny_llm_data, tmp_path / "ranks"), "--timeout", str(TIMEOUT)]
    started = time.monotonic()
    code = run_cli(argv)
    assert time.monotonic() - started < 5
    one_line_error(capsys, code, f"{server.root}/models: no complete answer within --timeout {TIMEOUT:g} s")
    assert snapshot(tmp_path) == {}


def test_an_answer_over_the_size_cap_is_refused(serve, export_llama, tiny_llm_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(openai_backend, "MAX_ANSWER_BYTES", 4096)  # the real cap, 64 MiB, works the same, slower
    server = serve({"/v1/models": reply(json.dumps({"pad": "a" * 10_000, **MODELS}))})
    code = run_cli(rank_argv(server.root, export_llama, tiny_llm_data, tmp_path / "ranks"))
    one_line_error(capsys, code, f"{server.root}/models: the answer is over 4,096 bytes")
    assert snapshot(tmp_path) == {}


def test_a_redirect_to_another_server_is_refused_and_gets_no_key(serve, export_llama, tiny_llm_data, tmp_path,
                                                                 capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    other = serve()
    server = serve({"/v1/models": reply(b"", 307, {"location": f"{other.root}/models"})})
    code = run_cli(rank_argv(server.root, export_llama, tiny_llm_data, tmp_path / "ranks"))
    line = one_line_error(capsys, code, f"{server.root}/models", f"redirects (HTTP 307) to {other.root}/models")
    assert "sk-secret" not in line
    assert other.seen == []
    assert snapshot(tmp_path) == {}


def test_a_redirect_within_the_server_is_followed_with_the_key(serve, export_llama, tiny_llm_data, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    server = serve({"/v1/models": reply(b"", 307, {"location": "/moved/v1/models"}),
                    "/moved/v1/models": reply(json.dumps(MODELS))})
    assert run_cli(rank_argv(server.root, export_llama, tiny_llm_data, tmp_path / "ranks")) == 0
    assert len(list(read_jsonl(tmp_path / "ranks" / "rankings.jsonl"))) == 2
    assert [path for path, _ in server.seen[:2]] == ["/v1/models", "/moved/v1/models"]
    assert {key for _, key in server.seen} == {"Bearer sk-secret"}


@pytest.mark.parametrize("base_url, fact", [
    ("http://user:hunter2@127.0.0.1:9/v1", "--base_url holds a password"),
    ("localhost:8000/v1", "--base_url localhost:8000/v1: expected an http:// or https:// URL"),
    ("http://[::1/v1", "--base_url http://[::1/v1: expected"),
    ("http://127.0.0.1:99999/v1", "a port from 1 to 65535"),
])
def test_a_base_url_that_is_no_server_url_is_refused(base_url, fact, export_llama, tiny_llm_data, tmp_path, capsys):
    line = one_line_error(capsys, run_cli(rank_argv(base_url, export_llama, tiny_llm_data, tmp_path / "ranks")), fact)
    assert "hunter2" not in line  # a password is never printed
    assert snapshot(tmp_path) == {}


# ----------------------------------------------------------------------------- scores that are no numbers


@pytest.fixture
def no_loading_bar():
    """transformers draws its own "Loading weights" bar on stderr, which --no_progress does not reach."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


@pytest.mark.parametrize("readout", ["score", "constrained"])
def test_nan_scores_of_the_hf_backend_are_refused(readout, tiny_llama, tiny_llm_data, tmp_path, capsys, monkeypatch,
                                                  no_loading_bar):
    """Weights turned NaN after loading stand for a NaN adapter (which the loader refuses on its own): the check
    is on the scores, wherever their NaN comes from."""
    load = hf.load_model

    def poisoned(config):
        model, tokenizer = load(config)
        with torch.no_grad():
            model.get_output_embeddings().weight.fill_(math.nan)
        return model, tokenizer

    monkeypatch.setattr(hf, "load_model", poisoned)
    code = run_cli(["rank", "--model", tiny_llama, "--data", tiny_llm_data, "--out", tmp_path / "ranks", "--device",
                    "cpu", "--max_instances", "2", "--no_progress", "--readout", readout])
    one_line_error(capsys, code, f"--backend hf ({tiny_llama}): instance 0, candidate", "log-probability is nan",
                   "nothing was written")
    assert snapshot(tmp_path) == {}


class CannedBackend(Backend):
    """Scores one instance of three candidates (titles of one token each, then EOS) from fixed log-probabilities."""

    name, tokenizer, max_length, chunk_size = "canned", None, 10**6, 100

    def __init__(self, logprobs: list[float]):
        self.logprobs = logprobs

    def score(self, prompts, candidates):
        return [CandidateScores(self.logprobs, [2] * len(self.logprobs))]

    def constrained(self, prompts, candidates, num_beams):
        trie = build_trie([[token, 0] for token in range(1, len(self.logprobs) + 1)])
        first = dict(zip(range(1, len(self.logprobs) + 1), self.logprobs))
        return beam_search([trie], num_beams, lambda beams: [first if not beam.tokens else {0: 0.0} for beam in beams])

    def generate(self, prompts, max_new_tokens):
        raise NotImplementedError


REQUEST = RankingRequest(7, "prompt", (30, 31, 32), ("Crimson Voyage", "Hollow Kingdom", "Silent Harbor"), 30, 0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_score_is_refused_naming_the_backend_instance_and_candidate(value):
    with pytest.raises(DelrecError, match=rf"--backend canned: instance 7, candidate 31 \('Hollow Kingdom'\): the "
                                          rf"log-probability is {value}, not a finite number"):
        read_out(CannedBackend([-1.0, value, -2.0]), [REQUEST], ReadoutConfig(readout="score"))


def test_a_nan_beam_is_not_pruned_silently():
    """With one beam the NaN candidate would be dropped or kept at random (NaN compares false); it must surface."""
    with pytest.raises(DelrecError, match=r"instance 7, candidate 31 .*log-probability is nan"):
        read_out(CannedBackend([-1.0, math.nan, -2.0]), [REQUEST], ReadoutConfig(readout="constrained", num_beams=1))


def test_the_rankings_file_never_holds_nan(tmp_path):
    path = tmp_path / "rankings.jsonl"
    with pytest.raises(DelrecError, match=r"rankings.jsonl:2 field 'scores\[1\]': nan is not a finite number"):
        with rankings_writer(path) as write:
            write([{"scores": [-1.0]}])
            write([{"scores": [-1.0, math.nan]}])
    assert snapshot(tmp_path) == {}
