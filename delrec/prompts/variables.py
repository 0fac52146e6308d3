"""Template variables built from a prepared dataset, the way DELRec builds them for training.

Previews, length checks and the tiny tokenizer's corpus use these builders, so what a prompt
engineer sees with `delrec prompts render` is what the model is trained on.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any, Sequence

from delrec.errors import DelrecError
from delrec.prompts.contract import DEFAULT_SR_TOP, SOFT_SLOT, TASKS, VARIABLES
from delrec.prompts.rendering import PromptTemplate, soft_prompt_placeholder
from delrec.prompts.template import list_templates


def popularity_order(dataset) -> list[int]:
    """Item ids by how often they occur in the training split (histories and targets), most first."""
    counts = Counter()
    for inst in dataset.instances("train"):
        counts.update(inst.history)
        counts[inst.target] += 1
    return sorted(range(dataset.num_items), key=lambda i: (-counts[i], i))


def _first_not_in(order: Sequence[int], seen: set[int], k: int) -> list[int]:
    out = []
    for item in order:
        if item not in seen:
            out.append(item)
            if len(out) == k:
                break
    return out


def _declared(template: PromptTemplate, values: dict[str, Any]) -> dict[str, Any]:
    """Only the variables the template declares, so `render(..., strict=True)` accepts them."""
    return {k: v for k, v in values.items() if k in template.variables}


def task_variables(
    task: str,
    history: Sequence[str],
    target: str,
    *,
    candidates: Sequence[str] = (),
    sr_model: str = "SASRec",
    sr_ranked: Sequence[str] = (),
    example_prediction: str | None = None,
    soft_prompt: str | None = None,
    sr_top: int = DEFAULT_SR_TOP,
) -> dict[str, Any]:
    """Variables of `task` for one sequence, the way DELRec builds them (used by previews and checks).

    ta: the history is split in half: example_history = first k-1 items, example_recent = item k,
        history = items k+1 .. n-1, target = item n (the hidden most recent), sr_prediction =
        sr_ranked[0] (the SR model's top-1 after all n items), example_prediction as given.
    rps: target = sr_ranked[0], sr_predictions = sr_ranked[1 : sr_top] (ranks 2..h); candidates as given
        (they hold the SR top-h, filled at random up to C, so every item the prompt names is a candidate).
    sr_hint: sr_predictions = sr_ranked[:sr_top], the SR model's top-h among the candidates (sr_ranked: the
        candidates in the SR model's order).
    lsr / plain / teacher: history, candidates, target as given.
    """
    history = list(history)
    values: dict[str, Any] = {"history": history, "target": target, "candidates": list(candidates),
                              "sr_model": sr_model}
    if soft_prompt is not None:
        values[SOFT_SLOT] = soft_prompt
    if task == "ta":
        if len(history) < 2:
            raise DelrecError(f"Temporal Analysis needs a history of at least 2 items, got {len(history)}")
        if not sr_ranked:
            raise DelrecError("Temporal Analysis needs the SR model's prediction after the full history")
        k = max(1, len(history) // 2)
        values.update(
            example_history=history[: k - 1], example_recent=history[k - 1],
            example_prediction=example_prediction if example_prediction is not None else sr_ranked[0],
            history=history[k:-1], target=history[-1], sr_prediction=sr_ranked[0],
        )
    elif task == "rps":
        if not sr_ranked:
            raise DelrecError("Recommendation Pattern Simulating needs the SR model's ranked predictions")
        values.update(target=sr_ranked[0], sr_predictions=list(sr_ranked[1:sr_top]))
    elif task == "sr_hint":
        if not sr_ranked:
            raise DelrecError("an sr_hint prompt needs the SR model's ranking of the candidates")
        values["sr_predictions"] = list(sr_ranked[:sr_top])
    provided = TASKS[task].provides if task in TASKS else frozenset(VARIABLES)
    return {k: v for k, v in values.items() if k in provided}


def preview_variables(
    template: PromptTemplate,
    dataset,
    split: str = "test",
    index: int = 0,
    *,
    soft_prompt: str | None = None,
    sr_model: str = "SASRec",
    predictions: Sequence[int] | None = None,
    sr_top: int = DEFAULT_SR_TOP,
) -> tuple[dict[str, Any], list[str]]:
    """Variables of `template` for instance `index` of `split`, plus notes on what was filled in how.

    SR predictions: `predictions` (ranked item ids for this instance, e.g. from the `sr predict` command)
    if given, else the training split's popularity order without the history's items (noted).
    """
    instances = dataset.instances(split)
    if not 0 <= index < len(instances):
        raise DelrecError(f"--index {index} is out of range: split '{split}' has {len(instances)} instances")
    inst = instances[index]
    titles = dataset.titles
    seen = set(inst.history)
    notes = []
    pop = None
    if predictions is None:
        pop = popularity_order(dataset)
        ranked = _first_not_in(pop, seen, sr_top)
        notes.append("SR predictions: popularity order of the training split (pass --predictions FILE for an SR model's)")
    else:
        ranked = [p for p in predictions if p not in seen][:sr_top] or list(predictions[:sr_top])
        notes.append("SR predictions: from the predictions file")
    if split in ("valid", "test"):
        cands = list(dataset.candidates(split)[index])
    else:
        rng = random.Random(inst.id)
        pool = [i for i in range(dataset.num_items) if i not in seen and i != inst.target]
        cands = [inst.target] + rng.sample(pool, min(len(pool), dataset.num_candidates - 1))
        rng.shuffle(cands)
        notes.append("candidates: sampled (the training split has no fixed candidate sets)")
    if template.task == "rps":
        fill = [c for c in cands if c not in ranked]
        cands = list(ranked) + fill[: max(0, dataset.num_candidates - len(ranked))]
        random.Random(inst.id).shuffle(cands)
        notes.append("RPS: answer = SR top-1; candidates = SR top-h + the instance's candidates as fill")
    if template.task == "sr_hint":  # the candidates in the SR model's order (its predictions, then popularity)
        order = list(predictions or []) + (pop if pop is not None else popularity_order(dataset))
        position = {item: rank for rank, item in reversed(list(enumerate(order)))}
        ranked = sorted(cands, key=lambda item: position.get(item, len(order)))
        notes.append("sr_hint: the candidates in the SR predictions' order, then the training popularity order "
                     "(training and ranking use the SR model's scores of every candidate: --user_states)")
    example_prediction = None
    if template.task == "ta":
        k = max(1, len(inst.history) // 2)
        order = pop if pop is not None else popularity_order(dataset)
        example = _first_not_in(order, set(inst.history[:k]), 1)
        example_prediction = titles[example[0]] if example else titles[order[0]]
        notes.append("TA: example prediction = popularity order (an SR model's prefix predictions are not in a predictions file)")
    values = task_variables(
        template.task, [titles[i] for i in inst.history], titles[inst.target],
        candidates=[titles[i] for i in cands], sr_model=sr_model, sr_ranked=[titles[i] for i in ranked],
        example_prediction=example_prediction, soft_prompt=soft_prompt, sr_top=sr_top,
    )
    uses_sr = {"sr_predictions", "sr_prediction"} & set(template.variables) or template.task == "rps"
    notes = [n for n in notes if uses_sr or not n.startswith("SR predictions")]
    if "candidates" not in template.variables:
        notes = [n for n in notes if not n.startswith("candidates")]
    return _declared(template, values), notes


def worst_case_variables(
    template: PromptTemplate,
    dataset,
    *,
    soft_prompt: str | None = None,
    sr_model: str = "SASRec",
    sr_top: int = DEFAULT_SR_TOP,
) -> tuple[dict[str, Any], str]:
    """An upper bound for length checks: the dataset's longest history (by title characters, over all
    splits) with the C longest titles of the catalogue as candidates, answer and SR predictions."""
    titles = dataset.titles
    best, best_len, best_where = None, -1, ""
    for split in ("train", "valid", "test"):
        for inst in dataset.instances(split):
            size = sum(len(titles[i]) + 4 for i in inst.history)
            if size > best_len:
                best, best_len, best_where = inst, size, f"{split} #{inst.id}"
    longest = sorted(range(len(titles)), key=lambda i: (-len(titles[i]), i))
    count = max(dataset.num_candidates, sr_top)
    long_titles = [titles[i] for i in longest[:count]]
    history = [titles[i] for i in best.history]
    if template.task == "ta":
        history = history + [long_titles[0]]  # every history item shown, the longest title hidden
    values = task_variables(
        template.task, history, long_titles[0], candidates=long_titles[: dataset.num_candidates],
        sr_model=sr_model, sr_ranked=long_titles, example_prediction=long_titles[0],
        soft_prompt=soft_prompt, sr_top=sr_top,
    )
    description = (f"longest instance ({best_where}, {len(best.history)} history items) with the "
                   f"{dataset.num_candidates} longest titles as candidates")
    return _declared(template, values), description


def sample_variables(template: PromptTemplate, soft_prompt: str) -> dict[str, Any]:
    """Made-up titles for every variable: enough to render a template without a dataset."""
    history = [f"Sample Title {i}" for i in range(1, 7)]
    values = task_variables(
        template.task, history, "Sample Title 9", candidates=["Sample Title 9", "Sample Title 8", "Sample Title 7"],
        sr_model="SASRec", sr_ranked=["Sample Title 9", "Sample Title 7", "Sample Title 8"],
        example_prediction="Sample Title 5", soft_prompt=soft_prompt,
    )
    return _declared(template, values)


def template_corpus(folder: str | os.PathLike | None = None, soft_prompt: str | None = None) -> list[str]:
    """Every template rendered with sample titles in every domain (prompt + completion): text for
    training a tiny tokenizer that knows the templates' wording."""
    soft = soft_prompt or soft_prompt_placeholder(1)
    texts = []
    for template in list_templates(folder):
        for domain in template.domains:
            texts.append(template.render(sample_variables(template, soft), domain).text)
    return texts
