"""Serve an SR model or distilled student over HTTP: `POST /recommend` answers in milliseconds.

    GET  /health      {"status": "ok", "model", "model_type", "items", "torch_threads", "max_batch_size", ...}
    POST /recommend   {"history": [raw item ids, oldest first], "k": 20, "keep_history": false}
                      -> {"items": [{"id": raw id, "title": ..., "score": ...}, ...]}

The answer is `delrec sr predict`'s: the same `top_items` (history items excluded unless
`keep_history`), the same 9-digit scores, raw ids and titles from the prepared dataset. A bad
request gets HTTP 400 and `{"error": ...}` naming the field; anything else that fails inside gets
500 with the same shape and one log line, and the server goes on. A score that is not a finite
number (a model with NaN weights) is such a 500: NaN or inf never reaches a JSON answer.

Under abuse: every body is read by `BodyLimits` before the app sees it, at most `max_body_bytes`
(413, answered from Content-Length before a byte of the body is read, or as soon as a chunked body
grows past it) within `read_timeout` seconds (408; the connection is closed, so a half-sent body
holds a socket no longer than that). A client that leaves mid-body costs one log line. The JSON
decoder refuses what would otherwise fail as a 500 (nesting deeper than Python's stack, numbers
longer than any id) with a 400, and /health shows folder names, never absolute paths.

Batching: requests go to one scoring thread through a queue. The thread takes whatever is waiting
(up to `max_batch_size`) and scores it as one batch: one encoder pass and one matrix product over
the item table for all of them. There is no timer, so a lone client waits for nothing, and under
concurrent load batches form by themselves while the previous one is scored (torch releases the
GIL, the event loop keeps accepting). With a compiled graph (`delrec sr compile`, `--compiled`),
the queries it can answer (history excluded, k up to its top-K) skip eager torch. FastAPI and
uvicorn are the `[serve]` extra, imported by `create_app` and `serve` only.
"""

import asyncio
import json
import logging
import math
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.sr.base import SequentialRecommender
from delrec.sr.compiled import CompiledTopK
from delrec.sr.evaluate import check_compatible, top_items

SERVE_INSTALL = 'install the server with `pip install -e ".[serve]"` (FastAPI + uvicorn)'
MAX_BODY_BYTES = 1 << 20  # a 1000-item history of 40-character ids is about 45 KB
READ_TIMEOUT = 10.0  # seconds for a whole body: 1 MiB at 100 KB/s
MAX_NUMBER_DIGITS = 100  # k and numeric item ids are far shorter; Python's own int limit is 4300 digits
SHOWN_CHARS = 80  # a value quoted in an error message is cut to this
NOT_FINITE = "not a finite number; its weights are likely broken (NaN or inf): retrain or restore the model folder"
LOG = logging.getLogger("uvicorn.error")  # uvicorn's own logger: its handler, format and --log_level


class RequestError(ValueError):
    """A request the service cannot answer; its message names the field (HTTP 400)."""


class ScoreError(RuntimeError):
    """The model gave a query a score that is not a finite number (HTTP 500; JSON has no NaN)."""


def shown(value: Any) -> str:
    """`repr(value)` cut to `SHOWN_CHARS`: an error message quotes what was sent, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _short_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise RequestError(f"the body holds a number of {digits} digits; a k or an item id has at most "
                           f"{MAX_NUMBER_DIGITS}")
    return int(text)


def _no_constant(name: str) -> float:
    raise RequestError(f"the body is not valid JSON ({name} is not a JSON value)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object whose keys appear once: `{"history": [...], "history": [...]}` has no one meaning (json would
    silently keep the last)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        twice = next(key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i]))
        raise RequestError(f"field {shown(twice)} appears twice in one object; give each field once")
    return found


def decode_body(body: bytes) -> Any:
    """The JSON value of a request body. Everything `json.loads` would fail on with something other than a
    decoding error is a `RequestError` too: nesting deeper than the interpreter's stack, and numbers too long
    to be a k or an id (Python refuses ints over 4300 digits with a bare ValueError; NaN is not JSON)."""
    try:
        return json.loads(body, parse_int=_short_int, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise RequestError("the body nests arrays or objects too deeply; a request is one flat JSON object") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the body is not valid JSON ({exc})") from None


@dataclass(frozen=True)
class Query:
    history: tuple[int, ...]  # item indices, oldest first
    k: int
    keep_history: bool


class Recommender:
    """A loaded model and its catalogue: turns request bodies into queries and queries into answers."""

    def __init__(self, model: SequentialRecommender, dataset: PreparedDataset, max_history: int = 1000,
                 default_k: int = 20, source: str | None = None, compiled: CompiledTopK | None = None):
        check_compatible(model, dataset, source)
        self.model = model.eval()
        self.compiled = compiled
        self.items = dataset.items
        self.index = {str(row["raw_id"]): row["id"] for row in self.items}
        self.max_history = max_history
        self.default_k = min(default_k, model.num_items)

    def parse(self, body: Any) -> Query:
        """A validated query from a decoded JSON body; `RequestError` names the field otherwise."""
        if not isinstance(body, dict):
            raise RequestError(f"the body must be a JSON object with a 'history' list, got {type(body).__name__}")
        unknown = sorted(set(body) - {"history", "k", "keep_history"})
        if unknown:
            raise RequestError(f"unknown field '{unknown[0]}'; expected history, k, keep_history")
        history = body.get("history")
        if not isinstance(history, list):
            raise RequestError("field 'history': expected a list of item ids, oldest first")
        if not history:
            raise RequestError("field 'history': empty; give at least one item id")
        if len(history) > self.max_history:
            raise RequestError(f"field 'history': {len(history)} items, more than the {self.max_history} this "
                               "server accepts (the model reads the last "
                               f"{self.model.context_length})")
        ids = []
        for position, raw in enumerate(history):
            if isinstance(raw, bool) or not isinstance(raw, (str, int)) or str(raw) not in self.index:
                raise RequestError(f"field 'history[{position}]': unknown item id {shown(raw)}; expected a raw item id "
                                   "of the dataset's items.jsonl")
            ids.append(self.index[str(raw)])
        k = body.get("k", self.default_k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.model.num_items:
            raise RequestError(f"field 'k': expected an integer from 1 to the catalogue size "
                               f"({self.model.num_items}), got {shown(k)}")
        keep = body.get("keep_history", False)
        if not isinstance(keep, bool):
            raise RequestError(f"field 'keep_history': expected true or false, got {shown(keep)}")
        return Query(tuple(ids), k, keep)

    def answer(self, queries: list[Query]) -> list[dict | ScoreError]:
        """One answer per query, scored together: one batch per (keep_history, compiled or eager) group. A query
        whose answer holds a score that is not finite gets a `ScoreError` instead, and only that query."""
        groups: dict[tuple[bool, bool], list[int]] = {}
        for index, query in enumerate(queries):
            groups.setdefault((query.keep_history, self._compiled_answers(query)), []).append(index)
        answers: list[dict | ScoreError | None] = [None] * len(queries)
        for (keep, compiled), rows in groups.items():
            histories = [queries[i].history for i in rows]
            if compiled:
                ranked = self.compiled.top_items(histories)
            else:
                ranked = self._eager_top_items(histories, max(queries[i].k for i in rows), not keep)
            for row, kept in zip(rows, ranked):
                answers[row] = kept if isinstance(kept, ScoreError) else self._ranking(kept[: queries[row].k])
        return answers

    def _eager_top_items(self, histories: list, k: int, exclude: bool) -> list:
        """`top_items` of the batch. It refuses a batch holding a NaN or inf score (`check_finite_scores`, whose
        message names the model's folder, which an HTTP answer must not): then each history is scored alone, so
        that only the query it belongs to fails, with a message that names no path."""
        try:
            return top_items(self.model, histories, k, exclude, len(histories))
        except DelrecError:
            if len(histories) == 1:
                return [ScoreError(f"the model gave this history a score that is {NOT_FINITE}")]
            return [self._eager_top_items([history], k, exclude)[0] for history in histories]

    def _ranking(self, kept: list[tuple[int, float]]) -> dict | ScoreError:
        # top-k ranks NaN and inf first, so a non-finite score anywhere among the candidates shows up here
        bad = next(((i, v) for i, v in kept if not math.isfinite(v)), None)
        if bad is not None:
            return ScoreError(f"the model scored item {shown(self.items[bad[0]]['raw_id'])} {bad[1]} for this "
                              f"history, {NOT_FINITE}")
        return {"items": [self._item(i, v) for i, v in kept]}

    def _compiled_answers(self, query: Query) -> bool:
        fast = self.compiled
        return fast is not None and fast.exclude_history != query.keep_history and query.k <= fast.topk

    def _item(self, index: int, score: float) -> dict:
        row = self.items[index]
        return {"id": row["raw_id"], "title": row["title"], "score": float(f"{score:.9g}")}


class Batcher:
    """One scoring thread fed by a queue; each pass takes every waiting query (up to `max_batch_size`)."""

    def __init__(self, recommender: Recommender, max_batch_size: int = 64):
        self.recommender = recommender
        self.max_batch_size = max_batch_size
        self.batches = 0
        self.queries = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="delrec-scoring", daemon=True)
        self._thread.start()

    def submit(self, query: Query) -> Future:
        future: Future = Future()
        self._queue.put((query, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch_size:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
            try:
                with torch.inference_mode():
                    answers = self.recommender.answer([query for query, _ in jobs])
            except Exception as exc:  # noqa: BLE001 - reported to each waiting request (HTTP 500), never fatal
                for _, future in jobs:
                    future.set_exception(exc)
                continue
            self.batches += 1
            self.queries += len(jobs)
            for (_, future), answer in zip(jobs, answers):
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class BodyLimits:
    """ASGI middleware: reads each request body in full before the app runs, so the app never waits on a client.

    Over `max_body_bytes` is a 413 (from Content-Length before a byte is read, or once a chunked body passes it),
    slower than `read_timeout` seconds a 408; both close the connection, the rest of the body unread. A client
    that leaves mid-body is one log line (starlette would log a traceback). The app gets the body as one message.
    """

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _refuse(send, 413, f"the body has {int(declared)} bytes, more than the "
                                            f"{self.max_body_bytes} this server accepts")
        body = bytearray()
        try:
            await asyncio.wait_for(self._read(receive, body), self.read_timeout)
        except _BodyTooLarge:
            return await _refuse(send, 413, f"the body is longer than the {self.max_body_bytes} bytes this server "
                                            "accepts")
        except asyncio.TimeoutError:
            LOG.warning("%s: %d body byte(s) in %g s, the read timeout; answered 408 and closed", _request(scope),
                        len(body), self.read_timeout)
            return await _refuse(send, 408, f"the body did not arrive within {self.read_timeout:g} s ({len(body)} "
                                            "bytes came); the connection is closed")
        except _ClientGone:
            LOG.warning("%s: the client disconnected after %d body byte(s); nothing answered", _request(scope),
                        len(body))
            return
        first = {"type": "http.request", "body": bytes(body), "more_body": False}

        async def replay():
            nonlocal first
            message, first = first, None
            return message or await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive, body: bytearray) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                raise _BodyTooLarge
            if not message.get("more_body", False):
                return


def _request(scope) -> str:
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "a client"
    return f"{peer} {scope['method']} {scope['path']}"


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(recommender: Recommender, max_batch_size: int = 64, info: dict | None = None, announce: str = "",
               max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT):
    """The FastAPI application; its lifespan starts and stops the scoring thread (and prints `announce`). /health
    shows `info` as given: pass folder names, not paths."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(recommender, max_batch_size)
        if announce:
            print(announce, flush=True)
        yield
        batcher = state.pop("batcher")
        batcher.close()
        if announce:
            print(f"stopped: {batcher.queries} request(s) scored in {batcher.batches} batch(es)", flush=True)

    app = FastAPI(title="delrec", lifespan=lifespan)
    app.add_middleware(BodyLimits, max_body_bytes=max_body_bytes, read_timeout=read_timeout)

    @app.get("/health")
    async def health():
        batcher = state.get("batcher")
        return {"status": "ok", **(info or {}), "model_type": recommender.model.model_type,
                "items": recommender.model.num_items, "torch_threads": torch.get_num_threads(),
                "max_batch_size": max_batch_size,
                "compiled": recommender.compiled.path.name if recommender.compiled else None,
                "batches": batcher.batches if batcher else 0,
                "queries": batcher.queries if batcher else 0}

    @app.post("/recommend")
    async def recommend(request: Request):
        try:
            query = recommender.parse(decode_body(await request.body()))
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            return await asyncio.wrap_future(state["batcher"].submit(query))
        except Exception as exc:  # noqa: BLE001 - one failed batch must not take the service down
            error = " ".join(f"internal error: {type(exc).__name__}: {exc}".split())
            LOG.error("%s: %s", _request(request.scope), error)
            return JSONResponse({"error": error}, status_code=500)

    return app


def serve(app, host: str, port: int) -> None:
    """Run `app` with uvicorn until SIGINT or SIGTERM: in-flight requests finish, then the scoring thread stops
    and uvicorn re-raises the signal, so the process ends as signalled (exit status 128 + signal number)."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a clear error before uvicorn's own log lines
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DelrecError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port, or a --host "
                              "of this machine") from None
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()
