"""DELRec training and evaluation instances: TA, RPS and LSR prompt/completion pairs, tokenized.

Every instance becomes one row of a `datasets.Dataset` with the same columns whatever the task:

    task            "ta", "rps", "lsr" or "plain" (the template's task)
    id              the instance's id in its split
    prompt          the rendered prompt text (the model reads it; scoring conditions on it)
    completion      the answer's title
    candidates      candidate titles; the read-out ranks them by log-likelihood
    answer          index of the answer in `candidates`
    input_ids       `encode_pair(prompt, completion)`: THE training tokenization
    completion_mask 1 on the answer's ids (EOS included): the loss is on the answer only
    history_shown   how many history items the prompt shows (fewer than the instance has if truncated)
    user_state      (with `user_states` only) the SR model's state of the whole history, which a per-user soft
                    prompt reads (`delrec.llm.user_prompt`)

What each task asks (docs/methods.md#delrec-stage-1-pattern-distillation), built from a prepared dataset and an SR predictions file:

- TA (Temporal Analysis): the history is split at k = len // 2 (`task_variables`); the prompt shows
  the first k items as a one-shot example with the SR model's prediction after them (the
  predictions file's `prefix_items`, from `delrec sr predict --prefix_predictions`), then the later
  items without the most recent one, and the SR model's prediction after the whole history. The
  answer is the hidden most recent item; the candidates are the distinct history items, so chance
  is 1 / (number of distinct history items). Needs a history of at least 2 items.
- RPS (Recommendation Pattern Simulating): candidates = the SR model's top-h + items drawn at random
  (never from the history) up to C, shuffled; the answer is the SR model's top-1 (chance 1/C). The
  template may also show the SR model's next h predictions (ranks 2..h+1).
- LSR (stage 2; template `lsr`, or `plain` for the no-soft-prompt ablation): the history and the
  candidates; the answer is the true next item. Valid/test use the dataset's FIXED candidate sets;
  train instances have none, so C candidates are drawn (the target + C-1 random non-history items).
  With `item_tokens`, the prompt shows each history item and candidate as "title <|item_k|>"
  (`delrec.llm.hybrid`); the completion and the `candidates` column stay plain titles.

Randomness (candidate fill, order, subsampling) comes from generators seeded with (seed, task,
split, instance id), so a build is the same on every machine and every process.

Length: an instance needs len(prompt ids) + the longest candidate's ids (EOS included) tokens, for
training and for scoring. Instances longer than `max_length` (or than the model's positions, when
it has fewer) are refused, with their count, unless `allow_truncation`, which drops the oldest
history items shown (TA: from the example first) until the instance fits, and counts the
instances it shortened. SR predictions stay those
of the whole history: the prompt shows its most recent part.

Builds are cached as `datasets` folders under `cache_dir`, keyed by the dataset fingerprint, the
predictions file's checksum, the template's fingerprint, the tokenizer and every option, so a
re-run (or a resumed training) skips the rendering and a changed input is never served stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.io import read_json, replace_directory, staged_directory, write_json
from delrec.llm.hybrid import item_text
from delrec.llm.tokenization import encode_completion, encode_pair, encode_prompt
from delrec.predictions import sr_order
from delrec.prompts import DEFAULT_SR_TOP, PromptTemplate, task_variables

BUILDER_VERSION = 2  # 2: RPS names the SR model's ranks 2..h (all candidates), not 2..h+1
STATS_FILE = "delrec_instances.json"
# Which builder serves a template's task; `plain` is LSR without the soft prompt.
TASK_OF_TEMPLATE = {"ta": "ta", "rps": "rps", "lsr": "lsr", "plain": "lsr", "sr_hint": "lsr"}
_SALT = {"ta": 1, "rps": 2, "lsr": 3}
_SPLIT_INDEX = {"train": 0, "valid": 1, "test": 2}


@dataclass(frozen=True)
class InstanceOptions:
    """How to build one task's instances for one split; every field is part of the cache key."""

    split: str
    soft_prompt: str | None = None  # the placeholder text of the soft prompt (None: the template has no slot)
    sr_model: str = "SASRec"  # display name the templates print
    domain: str = "item"
    num_candidates: int | None = None  # RPS and LSR-train candidate count (default: the dataset's C)
    sr_top: int = DEFAULT_SR_TOP  # RPS: h, the SR model's top-h among the candidates
    max_instances: int | None = None  # a seeded subsample of this many instances (None: all)
    seed: int = 0
    max_length: int = 1024
    allow_truncation: bool = False
    item_tokens: bool = False  # LSR: each history and candidate title followed by its item token (delrec.llm.hybrid)
    user_states: bool = False  # each row carries its SR user state (`user_state`), for a per-user soft prompt
    model_positions: int | None = None  # the model's max_position_embeddings: the longest instance it can read


@dataclass
class InstanceSet:
    """Built instances and what the build did (counts of skipped and truncated instances)."""

    rows: Any  # datasets.Dataset
    stats: dict


def build_instances(
    dataset: PreparedDataset,
    template: PromptTemplate,
    options: InstanceOptions,
    tokenizer,
    predictions_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> InstanceSet:
    """The instances of `template`'s task on `options.split` (from the cache when an identical build exists)."""
    task = TASK_OF_TEMPLATE.get(template.task)
    if task is None:
        raise DelrecError(f"template {template.file} is for task '{template.task}'; DELRec training builds ta, rps, "
                          "lsr or plain instances")
    if template.requires_soft_prompt and options.soft_prompt is None:
        raise DelrecError(f"template {template.file} has a soft-prompt slot but no soft prompt was given")
    predictions = read_task_predictions(task, dataset, options.split, predictions_path)
    states = read_template_states(template, dataset, options.split, predictions_path, options.user_states)
    key = _cache_key(dataset, template, options, tokenizer, predictions, states)
    folder = Path(cache_dir) / f"{template.name}-{options.split}-{key}" if cache_dir is not None else None
    if folder is not None and (folder / STATS_FILE).is_file():
        from datasets import load_from_disk

        return InstanceSet(load_from_disk(str(folder)), read_json(folder / STATS_FILE))

    builder = _Builder(dataset, template, options, tokenizer, predictions, states)
    result = builder.build()
    if folder is not None:
        with staged_directory(folder) as tmp:
            result.rows.save_to_disk(str(tmp))
            write_json(tmp / STATS_FILE, result.stats)
            replace_directory(tmp, folder)
        from datasets import load_from_disk

        result = InstanceSet(load_from_disk(str(folder)), result.stats)  # memory-mapped, like a cache hit
    return result


def read_task_predictions(task: str, dataset: PreparedDataset, split: str, path):
    """The validated SR predictions a task needs (TA: with prefix predictions); None for LSR."""
    if task == "lsr":
        return None  # stage 2 reads only the soft prompt, not the SR model's predictions
    from delrec.predictions import read_predictions

    if path is None:
        raise DelrecError(f"{task.upper()} instances need the SR model's predictions for the {split} split; "
                          f"write them with `delrec sr predict --split {split} --prefix_predictions`")
    predictions = read_predictions(path, dataset, split)
    if task == "ta" and predictions.prefix_items is None:
        raise DelrecError(
            f"{path}: has no prefix predictions, which Temporal Analysis needs (the SR model's prediction for the "
            f"first half of each history); re-run `delrec sr predict --split {split} --prefix_predictions`, or "
            "leave ta out of tasks"
        )
    return predictions


def read_template_states(template: PromptTemplate, dataset: PreparedDataset, split: str, path,
                         per_user: bool = False):
    """The SR model's user states an `sr_hint` template (it names the SR model's top-h among each instance's
    candidates, from their scores) or a per-user soft prompt (`per_user`) needs; None otherwise."""
    if template.task != "sr_hint" and not per_user:
        return None
    from delrec.predictions import read_user_states

    if path is None:
        needs = ("names the SR model's top candidates" if template.task == "sr_hint"
                 else "fills its soft-prompt slot per user")
        raise DelrecError(f"template {template.file} {needs}, which needs the SR model's user states "
                          f"for the {split} split; write them with `delrec sr predict --split {split} "
                          "--user_states` and pass that predictions file")
    return read_user_states(path, dataset, split)


def _cache_key(dataset, template, options, tokenizer, predictions, states=None) -> str:
    payload = {
        "version": BUILDER_VERSION,
        "dataset": dataset.fingerprint,
        "template": [template.name, template.fingerprint],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "predictions": None if predictions is None else predictions.meta.get("sha256"),
        "user_states": None if states is None else states.sha256,
        "options": asdict(options),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, merges, added tokens and special-token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        from datasets.fingerprint import Hasher

        text = Hasher.hash(tokenizer)
    extra = [tokenizer.bos_token_id, tokenizer.eos_token_id, encode_prompt(tokenizer, "a")]
    return hashlib.sha256((text + json.dumps(extra)).encode()).hexdigest()[:16]


class _Builder:
    """Renders, tokenizes and length-checks one task's instances for one split."""

    def __init__(self, dataset: PreparedDataset, template: PromptTemplate, options: InstanceOptions, tokenizer,
                 predictions, states=None):
        self.dataset = dataset
        self.template = template
        self.options = options
        self.tokenizer = tokenizer
        self.predictions = predictions
        self.states = states  # sr_hint: they order each instance's candidates; user_states: each row carries its own
        self.task = TASK_OF_TEMPLATE[template.task]
        self.titles = dataset.titles
        self.num_candidates = options.num_candidates or dataset.num_candidates
        if self.num_candidates < 2:
            raise DelrecError(f"num_candidates must be at least 2, got {self.num_candidates}")
        if self.num_candidates > dataset.num_items:
            raise DelrecError(f"num_candidates {self.num_candidates} exceeds the {dataset.num_items} items of "
                              f"{dataset.path}: an instance cannot show more distinct candidates than there are items; "
                              f"choose at most {dataset.num_items}")
        # the longest instance: max_length, or the model's positions when fewer (transformers would only warn)
        positions = options.model_positions
        self.limit = min(options.max_length, positions or options.max_length)
        by_option = self.limit == options.max_length
        self.limit_name = (f"max_length {options.max_length} tokens" if by_option else
                           f"the model's length limit of {positions} tokens (max_position_embeddings)")
        self.limit_remedy = "raise max_length" if by_option else "use a model with more positions"
        if options.sr_top < 1:
            raise DelrecError(f"sr_top must be at least 1, got {options.sr_top}")
        self._title_lengths: dict[int, int] = {}
        self.fixed = dataset.candidates(options.split) if self.task == "lsr" and options.split != "train" else None

    def build(self) -> InstanceSet:
        from datasets import Dataset

        instances = self.dataset.instances(self.options.split)
        make: Callable = {"ta": self._ta, "rps": self._rps, "lsr": self._lsr}[self.task]
        eligible = [i for i, inst in enumerate(instances) if self._eligible(i, inst)]
        chosen = self._subsample(eligible)
        rows, too_long, truncated, longest = [], 0, 0, 0
        for index in chosen:
            inst = instances[index]
            variables, items, answer = make(index, inst, self._rng(inst.id))
            row, length, shortened = self._render(variables, items, answer)
            longest = max(longest, length)
            if row is None:
                too_long += 1
                continue
            truncated += shortened
            if self.options.user_states:
                row["user_state"] = self.states.states[index].tolist()
            rows.append({"task": self.template.task, "id": inst.id, **row})
        if too_long:
            raise DelrecError(
                f"{too_long} of {len(chosen)} {self.template.name} instances ({self.options.split}) are longer than "
                f"{self.limit_name} (the longest needs {longest}); {self.limit_remedy}, or set "
                "allow_truncation: true to drop their oldest history items until they fit"
            )
        if not rows:
            raise DelrecError(f"no {self.template.name} instances in split '{self.options.split}' "
                              f"({len(instances)} instances, none usable: {self._requirement()})")
        stats = {
            "task": self.template.task, "template": self.template.name, "split": self.options.split,
            "instances": len(rows), "eligible": len(eligible), "skipped": len(instances) - len(eligible),
            "truncated": truncated, "longest_tokens": longest, "num_candidates": self.num_candidates,
        }
        return InstanceSet(Dataset.from_list(rows), stats)

    # --- which instances, in which order -------------------------------------------------------

    def _requirement(self) -> str:
        return {"ta": "a history of at least 2 items and SR predictions", "rps": "SR predictions",
                "lsr": "a target"}[self.task]

    def _eligible(self, index: int, inst) -> bool:
        if self.task == "ta":
            return len(inst.history) >= 2 and bool(self.predictions.items[index]) and bool(
                self.predictions.prefix_items[index])
        if self.task == "rps":
            return bool(self.predictions.items[index])
        return True

    def _subsample(self, eligible: list[int]) -> list[int]:
        limit = self.options.max_instances
        if limit is None or limit >= len(eligible):
            return eligible
        rng = np.random.default_rng([self.options.seed, _SALT[self.task], _SPLIT_INDEX[self.options.split]])
        return sorted(np.asarray(eligible)[rng.permutation(len(eligible))[:limit]].tolist())

    def _rng(self, instance_id: int) -> np.random.Generator:
        return np.random.default_rng(
            [self.options.seed, _SALT[self.task], _SPLIT_INDEX[self.options.split], instance_id]
        )

    # --- the three tasks: (template variables, candidate items, answer item) -----------------

    def _common(self) -> dict:
        return {"sr_model": self.options.sr_model, "soft_prompt": self.options.soft_prompt}

    def _ta(self, index: int, inst, rng):
        history = [self.titles[i] for i in inst.history]
        variables = task_variables(
            "ta", history, history[-1], sr_ranked=[self.titles[i] for i in self.predictions.items[index]],
            example_prediction=self.titles[self.predictions.prefix_items[index][0]], **self._common(),
        )
        candidates = list(dict.fromkeys(inst.history))  # distinct history items, oldest first
        return variables, candidates, inst.history[-1]

    def _rps(self, index: int, inst, rng):
        ranked = self.predictions.items[index]
        top = ranked[: self.options.sr_top]
        candidates = top + self._sample(rng, set(inst.history) | set(top), self.num_candidates - len(top))
        rng.shuffle(candidates)
        variables = task_variables(
            "rps", [self.titles[i] for i in inst.history], self.titles[ranked[0]],
            candidates=[self.titles[i] for i in candidates], sr_ranked=[self.titles[i] for i in ranked],
            sr_top=self.options.sr_top, **self._common(),
        )
        return variables, candidates, ranked[0]

    def _lsr(self, index: int, inst, rng):
        if self.fixed is not None:
            candidates = list(self.fixed[index])
        else:
            candidates = [inst.target] + self._sample(
                rng, set(inst.history) | {inst.target}, self.num_candidates - 1)
            rng.shuffle(candidates)
        hint = {}
        if self.template.task == "sr_hint":
            hint = {"sr_ranked": [self._shown(i) for i in sr_order(self.states, index, candidates)],
                    "sr_top": self.options.sr_top}
        variables = task_variables(
            self.template.task, [self._shown(i) for i in inst.history], self.titles[inst.target],
            candidates=[self._shown(i) for i in candidates], **self._common(), **hint,
        )
        return variables, candidates, inst.target

    def _shown(self, item: int) -> str:
        """How the prompt names an item: its title, with its item token when the option is on (the answer and
        the scored candidates stay plain titles)."""
        return item_text(self.titles[item], item) if self.options.item_tokens else self.titles[item]

    def _sample(self, rng, exclude: set[int], count: int) -> list[int]:
        """`count` distinct items outside `exclude`, drawn uniformly (fewer when the catalogue runs out)."""
        count = min(count, self.dataset.num_items - len(exclude))
        taken: list[int] = []
        seen = set(exclude)
        while len(taken) < count:
            for item in rng.integers(0, self.dataset.num_items, size=2 * (count - len(taken)) + 4).tolist():
                if item not in seen:
                    seen.add(item)
                    taken.append(item)
                    if len(taken) == count:
                        break
        return taken

    # --- rendering, tokenization and the length rule -------------------------------------------

    def _title_length(self, item: int) -> int:
        if item not in self._title_lengths:
            self._title_lengths[item] = len(encode_completion(self.tokenizer, self.titles[item]))
        return self._title_lengths[item]

    def _render(self, variables: dict, items: list[int], answer: int):
        """(row, tokens needed, 1 if shortened) when it fits (after truncation if allowed), else (None, tokens, 0)."""
        variables = {k: v for k, v in variables.items() if k in self.template.variables}
        answer_room = max(self._title_length(i) for i in items)
        trimmable = [k for k in ("example_history", "history") if k in variables]
        shortened = 0
        while True:
            rendered = self.template.render(variables, self.options.domain)
            prompt_ids = encode_prompt(self.tokenizer, rendered.prompt)
            needed = len(prompt_ids) + answer_room
            if needed <= self.limit:
                break
            if not self.options.allow_truncation:
                return None, needed, 0
            key = next((k for k in trimmable if variables[k]), None)
            if key is None:
                raise DelrecError(
                    f"{self.limit_name} is too short for {self.template.name} prompts even with no history shown "
                    f"({needed} tokens); {self.limit_remedy}"
                )
            variables[key] = variables[key][1:]
            shortened = 1
        pair = encode_pair(self.tokenizer, rendered.prompt, rendered.completion)
        row = {
            "prompt": rendered.prompt,
            "completion": rendered.completion,
            "candidates": [self.titles[i] for i in items],
            "answer": items.index(answer),
            "input_ids": pair["input_ids"],
            "completion_mask": pair["completion_mask"],
            "history_shown": len(variables.get("history", [])) + len(variables.get("example_history", [])),
        }
        return row, needed, shortened
