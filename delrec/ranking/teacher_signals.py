"""The LLM's read-outs as a teacher's signals, for `delrec teacher export` (delrec.distill.teacher_export).

- `ground`: BIGRec grounding: greedy generation of a title, embedded, every item ranked by L2 distance
  to the same embedding of its title;
- `rerank`: the title log-likelihoods of given candidates (the backends' `score`), the best K kept;
- `embed_texts`: a hidden state of each text (the item embeddings of every LLM teacher).

`config` is any object with the teacher export's options (`delrec.distill.teacher_export.TeacherExportConfig`):
`topk`, `keep_history`, `progress`, `max_new_tokens`, `embedding_layer`, `embedding_pooling`.
They live in the ranking layer because they drive a ranking backend; distillation reaches the
LLM only through here.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from tqdm.auto import tqdm

from delrec.data.dataset import Instance
from delrec.llm.scoring import normalize_title, rank_candidates
from delrec.llm.tokenization import encode_completion, encode_prompt
from delrec.metrics import history_mask
from delrec.ranking.base import refuse_non_finite
from delrec.ranking.requests import requests_for
from delrec.ranking.runner import GENERATION_MARGIN


def _chunks(instances: Sequence[Instance], size: int, progress: bool, desc: str):
    """(start, chunk) pairs over the instances, with a progress bar in instances."""
    with tqdm(total=len(instances), desc=desc, unit="inst", disable=not progress) as bar:
        for start in range(0, len(instances), size):
            chunk = instances[start : start + size]
            yield start, chunk
            bar.update(len(chunk))


def _truncation_counts(requests) -> dict:
    return {"truncated_prompts": sum(r.dropped_history > 0 for r in requests),
            "dropped_history_items": sum(r.dropped_history for r in requests)}


def grounding_budget(config, titles, tokenizer) -> int:
    """New tokens a grounding prompt may generate: `max_new_tokens`, else the longest item title + a margin."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    return max(len(encode_completion(tokenizer, t)) for t in titles) + GENERATION_MARGIN


def ground(config, dataset, instances, spec, template, backend, title_embeddings, split: str = "train"):
    """BIGRec grounding: generate, embed the text, rank all items by L2 distance to the title embeddings."""

    titles = dataset.titles
    budget = grounding_budget(config, titles, backend.tokenizer)
    catalogue = {normalize_title(t) for t in titles}
    # float64: cdist's matrix-product form loses ~1e-2 of a float32 distance near 0 (an exact title match)
    title_embeddings = title_embeddings.double()
    k, exclude = config.topk, not config.keep_history
    items = torch.empty(len(instances), k, dtype=torch.long)
    distances = torch.empty(len(instances), k)
    counts = {"max_new_tokens": budget, "empty_generations": 0, "generated_catalogue_titles": 0,
              "truncated_prompts": 0, "dropped_history_items": 0}
    for start, chunk in _chunks(instances, backend.chunk_size, config.progress, "grounding"):
        requests = requests_for(chunk, [[] for _ in chunk], titles, split, spec, template, backend.tokenizer,
                                backend.max_length, lambda _: budget)
        texts = backend.generate([r.prompt for r in requests], budget)
        generated = embed_texts(backend.model, backend.tokenizer, texts, backend.batch_size,
                                layer=config.embedding_layer, pooling=config.embedding_pooling)
        distance = torch.cdist(generated.double(), title_embeddings).float()
        if exclude:
            distance = distance.masked_fill(history_mask([inst.history for inst in chunk], len(titles)), float("inf"))
        values, top = distance.topk(k, dim=1, largest=False)
        items[start : start + len(chunk)], distances[start : start + len(chunk)] = top, values
        for key, value in _truncation_counts(requests).items():
            counts[key] += value
        counts["empty_generations"] += sum(not t.strip() for t in texts)
        counts["generated_catalogue_titles"] += sum(normalize_title(t) in catalogue for t in texts)
    return items, distances, counts


def prompt_states(config, dataset, instances, spec, template, backend, split: str = "train") -> torch.Tensor:
    """[R, d] the LLM's hidden state of each instance's grounding prompt (rendered and truncated as `ground` renders
    it for generation), at the title embeddings' layer and pooling: a user representation in the items' space."""
    budget = grounding_budget(config, dataset.titles, backend.tokenizer)
    requests = requests_for(instances, [[] for _ in instances], dataset.titles, split, spec, template,
                            backend.tokenizer, backend.max_length, lambda _: budget)
    return embed_texts(backend.model, backend.tokenizer, [r.prompt for r in requests], backend.batch_size,
                       config.progress, "embed prompts", config.embedding_layer, config.embedding_pooling)


def rerank(config, dataset, instances, candidate_sets, spec, template, backend, split: str = "train",
           user_states: torch.Tensor | None = None):
    """The LLM's title log-likelihoods over each instance's candidates; the best K kept. `user_states` [R, d]: each
    instance's SR state, for a model with a per-user soft prompt (hf backend)."""

    titles = dataset.titles
    lengths: dict[str, int] = {}

    def answer_tokens(candidate_titles) -> int:
        for title in candidate_titles:
            if title not in lengths:
                lengths[title] = len(encode_completion(backend.tokenizer, title))
        return max(lengths[t] for t in candidate_titles)

    k = config.topk
    items = torch.empty(len(instances), k, dtype=torch.long)
    scores = torch.empty(len(instances), k)
    counts = {"truncated_prompts": 0, "dropped_history_items": 0}
    for start, chunk in _chunks(instances, backend.chunk_size, config.progress, "rerank"):
        states = None if user_states is None else user_states[start : start + len(chunk)]
        requests = requests_for(chunk, candidate_sets[start : start + len(chunk)], titles, split, spec, template,
                                backend.tokenizer, backend.max_length, answer_tokens,
                                user_states=None if states is None else [tuple(v) for v in states.tolist()])
        results = backend.score([r.prompt for r in requests], [list(r.titles) for r in requests],
                                **({} if states is None else {"states": states}))
        for request, result in zip(requests, results):
            refuse_non_finite(backend, request, enumerate(result.logprob))
        for row, (request, result, order) in enumerate(zip(requests, results, rank_candidates(results, False))):
            best = order[:k]
            items[start + row] = torch.tensor([request.candidates[j] for j in best])
            scores[start + row] = torch.tensor([result.logprob[j] for j in best])
        for key, value in _truncation_counts(requests).items():
            counts[key] += value
    return items, scores, counts


def _decoder(model):
    """The model without its LM head where it has one to give (states need no logits), else the model.

    Not just saving the head's FLOPs: with transformers' `logits_to_keep=1` the head reads a strided slice
    of the states, and for one bfloat16 model (a Gemma 3 stage-2 folder, torch 2.13 CPU) that linear took
    16 s per batch of 16 titles instead of 0.04 s."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else functools.partial(model, logits_to_keep=1)


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int, progress: bool = False,
                desc: str = "embed", layer: int = -1, pooling: str = "last") -> torch.Tensor:
    """[len(texts), d] float32 on CPU: hidden layer `layer`'s state at each text's last token (`last`), or
    its mean over the text's tokens, BOS excluded (`mean`).

    Each text is encoded alone as a prompt is (BOS when the tokenizer adds one, no EOS); an
    empty text is the EOS token. Texts of similar length share a right-padded batch."""

    device = model.get_input_embeddings().weight.device
    body = _decoder(model)
    ids = [encode_prompt(tokenizer, text) or [tokenizer.eos_token_id] for text in texts]
    bos = tokenizer.bos_token_id
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    result = None
    with tqdm(total=len(ids), desc=desc, unit="text", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            width = max(len(ids[i]) for i in group)
            batch = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for row, i in enumerate(group):
                batch[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            batch, mask = batch.to(device), mask.to(device)
            out = body(input_ids=batch, attention_mask=mask, output_hidden_states=True, use_cache=False)
            states = out.hidden_states[layer].float()
            if pooling == "mean":
                keep = mask.bool() & (batch != bos) if bos is not None else mask.bool()
                keep[:, 0] |= keep.sum(1) == 0  # a text that is BOS alone keeps it
                pooled = (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
            else:
                pooled = states[torch.arange(len(group), device=device), mask.sum(1) - 1]
            pooled = pooled.cpu()
            if result is None:
                result = torch.empty(len(ids), pooled.shape[1])
            result[group] = pooled
            bar.update(len(group))
    return result
