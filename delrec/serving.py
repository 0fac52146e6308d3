"""Serve an SR model or distilled student over HTTP: `POST /recommend` answers in milliseconds.

    GET  /health      {"status": "ok", "model", "model_type", "items", "torch_threads", "max_batch_size", ...}
    POST /recommend   {"history": [raw item ids, oldest first], "k": 20, "keep_history": false}
                      -> {"items": [{"id": raw id, "title": ..., "score": ...}, ...]}

The answer is `delrec sr predict`'s: the same `top_items` (history items excluded unless
`keep_history`), the same 9-digit scores, raw ids and titles from the prepared dataset. A bad
request gets HTTP 400 and `{"error": ...}` naming the field; anything else that fails inside gets
500 with the same shape, and the server goes on.

Batching: requests go to one scoring thread through a queue. The thread takes whatever is waiting
(up to `max_batch_size`) and scores it as one batch: one encoder pass and one matrix product over
the item table for all of them. There is no timer, so a lone client waits for nothing, and under
concurrent load batches form by themselves while the previous one is scored (torch releases the
GIL, the event loop keeps accepting). With a compiled graph (`delrec sr compile`, `--compiled`),
the queries it can answer (history excluded, k up to its top-K) skip eager torch. FastAPI and
uvicorn are the `[serve]` extra, imported by `create_app` and `serve` only.
"""

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


class RequestError(ValueError):
    """A request the service cannot answer; its message names the field (HTTP 400)."""


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
                raise RequestError(f"field 'history[{position}]': unknown item id {raw!r}; expected a raw item id "
                                   "of the dataset's items.jsonl")
            ids.append(self.index[str(raw)])
        k = body.get("k", self.default_k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.model.num_items:
            raise RequestError(f"field 'k': expected an integer from 1 to the catalogue size "
                               f"({self.model.num_items}), got {k!r}")
        keep = body.get("keep_history", False)
        if not isinstance(keep, bool):
            raise RequestError(f"field 'keep_history': expected true or false, got {keep!r}")
        return Query(tuple(ids), k, keep)

    def answer(self, queries: list[Query]) -> list[dict]:
        """One answer per query, scored together: one batch per (keep_history, compiled or eager) group."""
        groups: dict[tuple[bool, bool], list[int]] = {}
        for index, query in enumerate(queries):
            groups.setdefault((query.keep_history, self._compiled_answers(query)), []).append(index)
        answers: list[dict | None] = [None] * len(queries)
        for (keep, compiled), rows in groups.items():
            histories = [queries[i].history for i in rows]
            if compiled:
                ranked = self.compiled.top_items(histories)
            else:
                deepest = max(queries[i].k for i in rows)
                ranked = top_items(self.model, histories, deepest, not keep, len(rows))
            for row, kept in zip(rows, ranked):
                answers[row] = {"items": [self._item(i, v) for i, v in kept[: queries[row].k]]}
        return answers

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
                future.set_result(answer)


def create_app(recommender: Recommender, max_batch_size: int = 64, info: dict | None = None, announce: str = ""):
    """The FastAPI application; its lifespan starts and stops the scoring thread (and prints `announce`)."""
    import asyncio
    import contextlib
    import json

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

    @app.get("/health")
    async def health():
        batcher = state.get("batcher")
        return {"status": "ok", **(info or {}), "model_type": recommender.model.model_type,
                "items": recommender.model.num_items, "torch_threads": torch.get_num_threads(),
                "max_batch_size": max_batch_size,
                "compiled": str(recommender.compiled.path) if recommender.compiled else None,
                "batches": batcher.batches if batcher else 0,
                "queries": batcher.queries if batcher else 0}

    @app.post("/recommend")
    async def recommend(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse({"error": f"the body is not valid JSON ({exc})"}, status_code=400)
        try:
            query = recommender.parse(body)
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            return await asyncio.wrap_future(state["batcher"].submit(query))
        except Exception as exc:  # noqa: BLE001 - one failed batch must not take the service down
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

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
