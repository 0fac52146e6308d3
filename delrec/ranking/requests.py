"""One ranking request per dataset instance: the rendered prompt and its fixed candidates.

The prompt is the model's template rendered as stage 2 renders it (`delrec.llm.instances`: the
same `task_variables`, the split's fixed candidate set in its stored order). When prompt + answer
would exceed the model's context, history items are dropped from the OLDEST side until it fits
(the most recent items carry the most signal for the next one), the rule of stage 2's
`allow_truncation`, so a prompt stage 2 evaluated on is the prompt ranked here (a test checks
it); the fewest items to drop are found by bisection, as serving renders many prompts. A model
trained with item tokens sees "title <|item_k|>" for history items and candidates, as in training. Each
request records how many items it lost, and the run reports the count. Token counts use
`delrec.llm.tokenization`, the one tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from delrec.data.dataset import Instance, PreparedDataset, sampled_indices
from delrec.errors import DelrecError
from delrec.llm.hybrid import item_text
from delrec.llm.tokenization import encode_prompt
from delrec.predictions import sr_order
from delrec.prompts import DEFAULT_SR_TOP, PromptTemplate, task_variables
from delrec.ranking.models import ModelSpec


@dataclass(frozen=True)
class RankingRequest:
    """One instance to rank: prompt text, candidate item ids and titles (stored order), the target."""

    id: int
    prompt: str
    candidates: tuple[int, ...]
    titles: tuple[str, ...]
    target: int
    dropped_history: int  # oldest history items left out so the prompt fits the context
    user_state: tuple[float, ...] | None = None  # the SR model's state of the history, for a per-user soft prompt


def build_requests(
    dataset: PreparedDataset,
    split: str,
    spec: ModelSpec,
    template: PromptTemplate,
    tokenizer,
    max_length: int,
    answer_tokens: Callable[[Sequence[str]], int],
    max_instances: int | None = None,
    sample_seed: int | None = None,
    states=None,
) -> list[RankingRequest]:
    """Requests for `max_instances` instances of `split` (all when None; the first ones, or a seeded sample with
    `sample_seed`: `delrec.data.dataset.sampled_indices`), with their fixed candidate sets; see `requests_for`.
    `states` (`delrec.predictions.UserStates` of the split) order each set for an sr_hint template, or give each
    request its user state for a model with a per-user soft prompt."""
    instances, candidates = dataset.instances(split), dataset.candidates(split)
    chosen = sampled_indices(len(instances), max_instances, sample_seed)
    hinted, per_user = states is not None and template.task == "sr_hint", states is not None and spec.user_prompt
    orders = [sr_order(states, i, candidates[i]) for i in chosen] if hinted else None
    user_states = [tuple(states.states[i].tolist()) for i in chosen] if per_user else None
    return requests_for([instances[i] for i in chosen], [candidates[i] for i in chosen], dataset.titles, split, spec,
                        template, tokenizer, max_length, answer_tokens, sr_orders=orders, user_states=user_states)


def requests_for(
    instances: Sequence[Instance],
    candidate_sets: Sequence[Sequence[int]],
    titles: Sequence[str],
    split: str,
    spec: ModelSpec,
    template: PromptTemplate,
    tokenizer,
    max_length: int,
    answer_tokens: Callable[[Sequence[str]], int],
    sr_orders: Sequence[Sequence[int]] | None = None,
    user_states: Sequence[tuple[float, ...]] | None = None,
) -> list[RankingRequest]:
    """One request per instance with the candidates given (e.g. a teacher's re-rank lists), rendered
    and truncated from the oldest history item until prompt + answer fit `max_length` tokens.

    `answer_tokens(titles)` is how many tokens must fit after the prompt (the longest candidate for
    scoring, the generation budget for free generation); `split` only names the split in errors. An sr_hint
    template names the SR model's top candidates: `sr_orders` gives each instance's candidates in its order. A model
    with a per-user soft prompt reads each instance's SR state: `user_states`.
    """
    if template.task == "sr_hint" and sr_orders is None:
        raise DelrecError(f"template '{template.name}' names the SR model's top candidates, which this command "
                          "cannot supply; rank such a model with `delrec rank --predictions FILE` (the split's "
                          "predictions written with `delrec sr predict --user_states`)")
    if spec.user_prompt and user_states is None:
        raise DelrecError(f"{spec.path} reads a per-user soft prompt, made from the SR model's state of each history, "
                          "which this command cannot supply; rank it with `delrec rank --predictions FILE` (the "
                          "split's predictions written with `delrec sr predict --user_states`)")
    hint_top = (spec.sr_hint or {}).get("sr_top", DEFAULT_SR_TOP)
    def shown(item: int) -> str:
        """How the prompt names an item (as stage 2 did); the scored `titles` stay plain."""
        return item_text(titles[item], item) if spec.item_tokens else titles[item]

    requests = []
    for number, (inst, candidates) in enumerate(zip(instances, candidate_sets)):
        cand_titles = tuple(titles[i] for i in candidates)
        hint = {} if sr_orders is None else {"sr_ranked": [shown(i) for i in sr_orders[number]], "sr_top": hint_top}

        def render(dropped: int) -> str:
            values = task_variables(
                template.task, [shown(i) for i in inst.history[dropped:]], titles[inst.target],
                candidates=[shown(i) for i in candidates], sr_model=spec.sr_model, soft_prompt=spec.soft_prompt,
                **hint,
            )
            return template.render(values, spec.domain, with_completion=False).prompt

        budget = max_length - answer_tokens(cand_titles)
        dropped = _oldest_to_drop(render, len(inst.history), lambda text: len(encode_prompt(tokenizer, text)) <= budget)
        if dropped is None:
            raise DelrecError(
                f"{split} instance {inst.id}: even with no history the prompt and answer exceed the model's "
                f"{max_length} tokens; use a model with a longer context or a shorter template"
            )
        requests.append(RankingRequest(inst.id, render(dropped), tuple(candidates), cand_titles, inst.target, dropped,
                                       None if user_states is None else user_states[number]))
    return requests


def _oldest_to_drop(render: Callable[[int], str], history: int, fits: Callable[[str], bool]) -> int | None:
    """Fewest oldest items to drop so the prompt fits (binary search: fewer items never make it longer)."""
    if fits(render(0)):
        return 0
    if not fits(render(history)):
        return None
    low, high = 1, history  # render(high) fits, render(low - 1) does not
    while low < high:
        middle = (low + high) // 2
        if fits(render(middle)):
            high = middle
        else:
            low = middle + 1
    return high
