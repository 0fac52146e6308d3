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
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Sequence

from delrec.errors import DelrecError
from delrec.llm.loading import TRUST_REMOTE_CODE_HELP, load_tokenizer
from delrec.llm.scoring import CandidateScores
from delrec.llm.tokenization import decode_completion, encode_completion, encode_prompt
from delrec.ranking.base import Backend
from delrec.ranking.models import ModelSpec
from delrec.ranking.trie import beam_search, build_trie


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
        default=64, metadata={"help": "Sequences per HTTP request (each candidate of an instance is one)."}
    )
    chunk_size: int = field(default=16, metadata={"help": "Instances per read-out call (progress step)."})
    timeout: float = field(default=600.0, metadata={"help": "Seconds to wait for one HTTP response."})
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
    models = client.get("/models").get("data") or []
    served = options.served_model or (models[0]["id"] if models else None)
    if served is None:
        raise DelrecError(f"{options.base_url}/models lists no model; pass --served_model")
    listed = {m.get("id"): m for m in models}
    if options.served_model and models and served not in listed:
        raise DelrecError(f"--served_model {served}: the server serves {', '.join(listed)}")
    tokenizer = load_tokenizer(spec.path, options.trust_remote_code)
    max_length = ((listed.get(served) or {}).get("max_model_len")
                  or _local_context(spec.path, tokenizer, options.trust_remote_code))
    return OpenAIBackend(client, served, tokenizer, int(max_length), options)


def _local_context(path: str, tokenizer, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length


class Client:
    """JSON over HTTP to one OpenAI-compatible server; failures are one-line `DelrecError`s."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float):
        self.base_url = base_url
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def get(self, path: str) -> dict:
        return self._send(urllib.request.Request(self.base_url + path, headers=self.headers))

    def post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        return self._send(urllib.request.Request(self.base_url + path, data=data, headers=self.headers))

    def _send(self, request: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:300].replace("\n", " ")
            raise DelrecError(f"{request.full_url}: HTTP {error.code} ({detail})") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DelrecError(f"{request.full_url}: no answer ({reason}); is the server running at "
                              f"{self.base_url}?") from None
        except json.JSONDecodeError:
            raise DelrecError(f"{request.full_url}: the answer is not JSON; is {self.base_url} an OpenAI API "
                              "root (usually ending in /v1)?") from None


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, client: Client, served_model: str, tokenizer, max_length: int, options: Options):
        self.client = client
        self.served_model = served_model
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
        eos = self.tokenizer.eos_token_id
        texts = []
        for start in range(0, len(prompts), self.request_batch):
            batch = [encode_prompt(self.tokenizer, p) for p in prompts[start : start + self.request_batch]]
            answer = self.client.post("/completions", {
                "model": self.served_model, "prompt": batch, "max_tokens": max_new_tokens, "temperature": 0.0,
                "ignore_eos": True, "stop_token_ids": [eos], "skip_special_tokens": True, "return_token_ids": True,
            })
            texts += [decode_completion(self.tokenizer, choice["token_ids"]) if choice.get("token_ids") is not None
                      else choice["text"] for choice in _in_order(answer, len(batch))]
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
        found = []
        for first in range(0, len(sequences), self.request_batch):
            batch = sequences[first : first + self.request_batch]
            answer = self.client.post("/completions", {
                "model": self.served_model, "prompt": batch, "echo": True, "logprobs": 1, "max_tokens": 0,
                "temperature": 0.0,
            })
            for choice, ids, start in zip(_in_order(answer, len(batch)), batch, starts[first : first + len(batch)]):
                values = (choice.get("logprobs") or {}).get("token_logprobs") or []
                if len(values) < len(ids) or any(v is None for v in values[start : len(ids)]):
                    raise DelrecError(f"{self.client.base_url}/completions: the server did not echo the prompt's "
                                      "log-probabilities (echo + logprobs); this backend needs a server that does "
                                      "(vLLM, SGLang, llama.cpp)")
                found.append([float(v) for v in values[start : len(ids)]])
        return found


def _in_order(answer: dict, count: int) -> list[dict]:
    choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != count:
        raise DelrecError(f"the server answered {len(choices)} choices for {count} prompts")
    return choices
