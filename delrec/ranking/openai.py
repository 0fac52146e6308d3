"""The OpenAI-compatible backend: rank through any server's `/v1/completions` (vLLM, SGLang, llama.cpp).

`delrec rank --backend openai --base_url http://HOST:PORT/v1 --model EXPORT_DIR` ranks the fixed
candidates of a dataset through a server that serves the `delrec export` folder EXPORT_DIR. The
folder is read locally for what the server does not say: its tokenizer (prompts and titles are
sent as token ids, so the server sees exactly the ids training saw, BOS included) and its
delrec.json (template, domain, soft-prompt text).

All three read-outs rest on the legacy completions feature every such server keeps for
evaluation harnesses: `echo: true` with `logprobs` and `max_tokens: 0` returns the log-probability
of each prompt token given the tokens before it.
- score: one sequence per candidate, prompt + title + EOS; the candidate's log-likelihood is the
  sum over its title tokens, as `delrec.llm.scoring.score_candidates`.
- constrained: the same echoed sequences give the log-probability of every token at every node of
  the candidates' prefix trie, so the shared beam search (`delrec.ranking.trie.beam_search`) runs
  on them with no further calls: the hf and vllm backends' search, same scores, same tie-break.
- generate: greedy completion (`temperature: 0`), stopping at the tokenizer's EOS only
  (`ignore_eos` + `stop_token_ids`, vLLM's extension fields; other servers stop at their EOS).
Requests are batched: one HTTP call carries `request_batch` sequences (`prompt` as a list of
token-id lists). HTTP goes through the standard library: no client package needed.

The server is input like any file, and may be broken or hostile: every field read from its answers
is checked for type and range (an error names the URL and the field), each exchange has a
whole-response deadline and a size cap, and redirects are followed only within its origin, so the
API key and the prompts go to no other server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Sequence

from delrec.config import above, at_least
from delrec.errors import DelrecError, where
from delrec.io import loads_json
from delrec.llm.loading import TRUST_REMOTE_CODE_HELP, load_tokenizer
from delrec.llm.scoring import CandidateScores
from delrec.llm.tokenization import decode_completion, encode_completion, encode_prompt
from delrec.ranking.base import Backend
from delrec.ranking.models import ModelSpec
from delrec.ranking.trie import beam_search, build_trie

MAX_ANSWER_BYTES = 64 << 20  # an echo answer takes ~100 bytes a token: 64 sequences of 8k tokens fit
ERROR_DETAIL_BYTES = 4096  # of an HTTP error's body, for its message
MAX_CONTEXT = 2**31 - 1  # tokens: a declared context length beyond it is no context length
MAX_LOGPROB = 1e-3  # rounding can put a certain token's log-probability just above 0; more is no log-probability


@dataclass
class Options:
    """How to reach the server."""

    base_url: str | None = field(
        default=None,
        metadata={"help": "The server's OpenAI API root, e.g. http://127.0.0.1:8000/v1 (vLLM: `vllm serve DIR`, "
                  "or on CPU `python -m vllm.entrypoints.openai.api_server --model DIR`)."},
    )
    served_model: str | None = field(
        default=None, metadata={"help": "The model name the server knows (default: the first of GET /models)."}
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the bearer token, if the server wants one."},
    )
    request_batch: int = field(
        default=64, metadata={"help": "Sequences per HTTP request (each candidate of an instance is one).",
                              "range": at_least(1)}
    )
    chunk_size: int = field(
        default=16, metadata={"help": "Instances per read-out call (progress step).", "range": at_least(1)}
    )
    timeout: float = field(
        default=600.0, metadata={"help": "Seconds to wait for one HTTP response.", "range": above(0)}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "For the local tokenizer folder --model: " + TRUST_REMOTE_CODE_HELP})

    def __post_init__(self):
        if self.request_batch < 1 or self.chunk_size < 1:
            raise ValueError("request_batch and chunk_size must be at least 1")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")


def open_backend(spec: ModelSpec, options: Options) -> "OpenAIBackend":
    if not options.base_url:
        raise DelrecError("--backend openai needs --base_url, the server's OpenAI API root (e.g. "
                          "http://127.0.0.1:8000/v1)")
    if spec.kind == "stage2":
        raise DelrecError(f"{spec.path} is a DELRec stage-2 folder; servers load plain folders: merge it with "
                          f"`delrec export --model {spec.path} --out DIR`, serve DIR and rank with --model DIR")
    client = Client(options.base_url.rstrip("/"), os.environ.get(options.api_key_env), options.timeout)
    models = served_models(client)
    served = options.served_model or next(iter(models), None)
    if served is None:
        raise DelrecError(f"{client.url('/models')} lists no model; pass --served_model")
    if options.served_model and models and served not in models:
        raise DelrecError(f"--served_model {served}: the server serves {', '.join(models)}")
    tokenizer = load_tokenizer(spec.path, options.trust_remote_code)
    max_length = models.get(served) or _local_context(spec.path, tokenizer, options.trust_remote_code)
    return OpenAIBackend(client, served, tokenizer, max_length, options)


def served_models(client: "Client") -> dict[str, int | None]:
    """The server's models (GET /models) and the context length each declares (None: not said), every field
    checked: a server's answer is input like any file."""
    url = client.url("/models")
    answer = client.get("/models")
    _check(url, None, answer, "a JSON object listing the served models in 'data'", isinstance(answer, dict))
    listed = answer.get("data")
    _check(url, "data", listed, "a list of models", listed is None or isinstance(listed, list))
    models: dict[str, int | None] = {}
    for n, entry in enumerate(listed or []):
        _check(url, f"data[{n}]", entry, "an object with the model's 'id'", isinstance(entry, dict))
        name, length = entry.get("id"), entry.get("max_model_len")
        _check(url, f"data[{n}].id", name, "the model's name", isinstance(name, str) and bool(name))
        _check(url, f"data[{n}].max_model_len", length, f"a context length in tokens, 1 to {MAX_CONTEXT}",
               length is None or _is_int(length) and 1 <= length <= MAX_CONTEXT)
        models[name] = length
    return models


def _local_context(path: str, tokenizer, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length


class Client:
    """JSON over HTTP to one OpenAI-compatible server; failures are one-line `DelrecError`s naming the URL.

    Each exchange has a whole-response deadline (`timeout`) and a size cap (`MAX_ANSWER_BYTES`), and follows
    redirects only within the server's origin: a server, like a file, may be broken or hostile."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float):
        try:
            parts = urllib.parse.urlsplit(base_url)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a malformed IPv6 address or port
            parts, usable = None, False
        if parts is not None and parts.password is not None:
            raise DelrecError("--base_url holds a password (user:password@); delrec would print it in its messages "
                              "and send it in the clear: put the token in the API key variable (--api_key_env) "
                              "instead")
        if not usable:
            raise DelrecError(f"--base_url {base_url}: expected an http:// or https:// URL with a host (and a port "
                              "from 1 to 65535), e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.timeout = min(timeout, threading.TIMEOUT_MAX)  # ~292 years; a longer wait overflows the system timers

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str):
        """GET `path`: the first call, where a wrong --base_url shows, so a non-JSON answer says what to check."""
        hint = f"; is {self.base_url} an OpenAI API root (usually ending in /v1)?"
        return self._send(urllib.request.Request(self.url(path), headers=self.headers), hint)

    def post(self, path: str, body: dict):
        data = json.dumps(body).encode()
        return self._send(urllib.request.Request(self.url(path), data=data, headers=self.headers))

    def _send(self, request: urllib.request.Request, hint: str = ""):
        """The parsed JSON answer; one that is not JSON, or holds NaN, infinities, absurd nesting or numbers, is
        refused with `hint` appended. Its fields are the caller's to check."""
        url = request.full_url
        with _Deadline(self.timeout) as deadline:
            try:
                raw = self._exchange(request, deadline)
            except (OSError, http.client.HTTPException) as error:
                if deadline.expired:
                    raise self._late(url) from None
                reason = str(getattr(error, "reason", None) or error) or type(error).__name__
                raise DelrecError(f"{url}: no answer ({reason}); is the server running at {self.base_url}?") from None
        if deadline.expired:  # the timer cut the answer short, which can end like a complete one
            raise self._late(url)
        if len(raw) > MAX_ANSWER_BYTES:
            advice = hint or "; if the server's answers are that large, lower --request_batch"
            raise DelrecError(f"{url}: the answer is over {MAX_ANSWER_BYTES:,} bytes, more than an OpenAI API answer "
                              f"to delrec should be{advice}")
        try:
            return loads_json(raw.decode("utf-8"), url)
        except UnicodeDecodeError as error:
            problem = f"{url}: the answer is not UTF-8 text (byte {error.start})"
        except DelrecError as error:
            problem = str(error)
        raise DelrecError(problem + hint)

    def _exchange(self, request: urllib.request.Request, deadline: "_Deadline") -> bytes:
        """The answer's bytes, at most one over the cap; HTTP errors are `DelrecError`s with the server's words."""
        opener = urllib.request.build_opener(_SameOriginRedirects(), _TimedHTTP(deadline), _TimedHTTPS(deadline))
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return response.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as error:
            detail = error.read(ERROR_DETAIL_BYTES).decode("utf-8", "replace")
            raise DelrecError(f"{request.full_url}: HTTP {error.code} ({detail[:300]})") from None

    def _late(self, url: str) -> DelrecError:
        return DelrecError(f"{url}: no complete answer within --timeout {self.timeout:g} s; the server is too slow "
                           "or stalls: raise --timeout, or check the server")


class _Deadline:
    """One exchange's whole-response time limit. A socket timeout bounds each read, not their sum, so a server
    trickling a byte a second would hold the run forever; when the limit passes, a timer shuts the connection's
    socket down, which ends any read (status line, headers or body) at once."""

    def __init__(self, seconds: float):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        self.sockets.append(sock)
        if self.expired:  # connected just as the timer fired
            _shut(sock)

    def _expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            _shut(sock)

    def connection(self, http_class: type) -> type:
        """`http_class` (HTTPConnection or HTTPSConnection) whose socket this deadline watches once connected."""
        deadline = self

        class Watched(http_class):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        return Watched


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _TimedOpen:
    """A urllib HTTP(S) handler whose connections a `_Deadline` watches."""

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.deadline.connection(http_class), req, **kwargs)


class _TimedHTTP(_TimedOpen, urllib.request.HTTPHandler):
    pass


class _TimedHTTPS(_TimedOpen, urllib.request.HTTPSHandler):
    pass


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the server's origin (scheme, host and port). urllib would resend the
    request's headers, the API key among them, and its prompts to whatever server a redirect names; one the
    user did not name is refused instead, and the message says how to use it deliberately."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            raise DelrecError(f"{req.full_url}: the server redirects (HTTP {code}) to {newurl}, another server; "
                              "delrec does not follow it, as the request carries the prompts and any API key: if "
                              "you trust that server, pass its API root as --base_url")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, client: Client, served_model: str, tokenizer, max_length: int, options: Options):
        self.client = client
        self.served_model = served_model
        self.source = f"model '{served_model}' at {client.base_url}"
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chunk_size = options.chunk_size
        self.request_batch = options.request_batch

    def settings(self) -> dict:
        return {"base_url": self.client.base_url, "served_model": self.served_model, "max_model_len": self.max_length,
                "request_batch": self.request_batch, "chunk_size": self.chunk_size}

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[CandidateScores]:
        prompt_ids, completions, steps = self._candidate_steps(prompts, candidates)
        return [CandidateScores([sum(s) for s in owner], [len(c) for c in ids])
                for owner, ids in zip(steps, completions)]

    def constrained(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], num_beams: int
    ) -> list[list[tuple[int, float]]]:
        _, completions, steps = self._candidate_steps(prompts, candidates)
        table: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}  # (prompt, title prefix) -> next tokens
        for owner, (ids, values) in enumerate(zip(completions, steps)):
            for completion, logprobs in zip(ids, values):
                for k, (token, logprob) in enumerate(zip(completion, logprobs)):
                    table.setdefault((owner, tuple(completion[:k])), {})[token] = logprob
        tries = [build_trie(ids) for ids in completions]
        return beam_search(tries, num_beams, lambda beams: [table[beam.owner, beam.tokens] for beam in beams])

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        eos, vocabulary = self.tokenizer.eos_token_id, len(self.tokenizer)
        url = self.client.url("/completions")
        texts = []
        for start in range(0, len(prompts), self.request_batch):
            batch = [encode_prompt(self.tokenizer, p) for p in prompts[start : start + self.request_batch]]
            answer = self.client.post("/completions", {
                "model": self.served_model, "prompt": batch, "max_tokens": max_new_tokens, "temperature": 0.0,
                "ignore_eos": True, "stop_token_ids": [eos], "skip_special_tokens": True, "return_token_ids": True,
            })
            for name, choice in _choices(url, answer, len(batch)):
                ids, text = choice.get("token_ids"), choice.get("text")
                if ids is None:
                    _check(url, f"{name}.text", text, "the generated text", isinstance(text, str))
                    texts.append(text)
                    continue
                _check(url, f"{name}.token_ids", ids, "a list of token ids", isinstance(ids, list))
                for k, token in enumerate(ids):
                    _check(url, f"{name}.token_ids[{k}]", token, f"a token id from 0 to {vocabulary - 1}",
                           _is_int(token) and 0 <= token < vocabulary)
                texts.append(decode_completion(self.tokenizer, ids))
        return texts

    def _candidate_steps(self, prompts, candidates):
        """Prompt ids, completion ids and, per candidate, the log-probability of each completion token."""
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        completions = [[encode_completion(self.tokenizer, t) for t in titles] for titles in candidates]
        sequences = [(owner, ids) for owner, ids in enumerate(completions) for _ in ids]
        flat = [prompt_ids[owner] + c for owner, ids in enumerate(completions) for c in ids]
        starts = [len(prompt_ids[owner]) for owner, _ in sequences]
        logprobs = self._echo_logprobs(flat, starts)
        steps, position = [], 0
        for ids in completions:
            steps.append(logprobs[position : position + len(ids)])
            position += len(ids)
        return prompt_ids, completions, steps

    def _echo_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Per sequence: log P(token | tokens before it) for its tokens from `start` on, via echo."""
        url = self.client.url("/completions")
        found = []
        for first in range(0, len(sequences), self.request_batch):
            batch = sequences[first : first + self.request_batch]
            answer = self.client.post("/completions", {
                "model": self.served_model, "prompt": batch, "echo": True, "logprobs": 1, "max_tokens": 0,
                "temperature": 0.0,
            })
            for (name, choice), ids, start in zip(_choices(url, answer, len(batch)), batch,
                                                  starts[first : first + len(batch)]):
                found.append(_echoed(url, name, choice, start, len(ids)))
        return found


def _choices(url: str, answer, count: int) -> list[tuple[str, dict]]:
    """The answer's choices in prompt order (by `index`), each with its field name, one object per prompt."""
    _check(url, None, answer, "a JSON object with the 'choices'", isinstance(answer, dict))
    choices = answer.get("choices")
    _check(url, "choices", choices, "a list of choices", isinstance(choices, list))
    if len(choices) != count:
        raise DelrecError(f"{where(url, field='choices')}: the server answered {len(choices)} choices for {count} "
                          "prompts")
    ordered: list = [None] * count
    for n, choice in enumerate(choices):
        _check(url, f"choices[{n}]", choice, "an object", isinstance(choice, dict))
        index = choice.get("index", n)
        _check(url, f"choices[{n}].index", index, f"a prompt index from 0 to {count - 1}, each once",
               _is_int(index) and 0 <= index < count and ordered[index] is None)
        ordered[index] = (f"choices[{n}]", choice)
    return ordered


def _echoed(url: str, name: str, choice: dict, start: int, end: int) -> list[float]:
    """The echoed log-probabilities of tokens `start`..`end - 1` of the choice `name`, each checked."""
    logprobs = choice.get("logprobs")
    _check(url, f"{name}.logprobs", logprobs, "an object", logprobs is None or isinstance(logprobs, dict))
    values = (logprobs or {}).get("token_logprobs")
    field = f"{name}.logprobs.token_logprobs"
    _check(url, field, values, "a list", values is None or isinstance(values, list))
    if values is None or len(values) < end or any(v is None for v in values[start:end]):
        raise DelrecError(f"{url}: the server did not echo the prompt's log-probabilities (echo + logprobs); this "
                          "backend needs a server that does (vLLM, SGLang, llama.cpp)")
    for k in range(start, end):
        _check(url, f"{field}[{k}]", values[k], "a log-probability: a number, at most 0",
               _is_finite_number(values[k]) and values[k] <= MAX_LOGPROB)
    return [float(v) for v in values[start:end]]


def _check(url: str, field: str | None, value, expected: str, valid: bool) -> None:
    """Refuse a value of the server's answer that the protocol does not allow, in one line naming the field."""
    if not valid:
        raise DelrecError(f"{where(url, field=field)}: the server sent {_shown(value)}, which is invalid here; "
                          f"expected {expected}")


def _shown(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    """A JSON number that is a finite float (`1e400` parses as infinity; a 400-digit integer overflows one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
