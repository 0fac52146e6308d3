"""What the code and the template files agree on: file names, the variables the code provides,
and which of them each task provides.

Kept in one place so the checks can tell a typo (not a known variable) from a variable that the
task's code does not provide, and so the code and `delrec/prompts/templates/README.md` name the same things.
"""

from __future__ import annotations

from dataclasses import dataclass

ENV_VAR = "DELREC_PROMPTS_DIR"
TEMPLATE_SUFFIX = ".jinja"
DOMAINS_FILE = "domains.yaml"
DEFAULT_DOMAIN = "item"
SOFT_SLOT = "soft_prompt"
TARGET = "target"
BLOCKS = ("prompt", "completion")
DEFAULT_SOFT_TOKENS = 100
SOFT_TOKEN_FORMAT = "<|sp:{}|>"
DEFAULT_SR_TOP = 3
HEADER_KEYS = ("task", "description", "requires_soft_prompt", "variables")

# Variables the code provides (domain wording comes from domains.yaml on top of these).
VARIABLES: dict[str, str] = {
    "history": "list of titles the user interacted with, oldest first (TA: the part after the "
    "example, without the hidden most recent item)",
    "candidates": "list of candidate titles, in the order of the fixed candidate set",
    "target": "the answer's title; used only in the completion block (LSR/plain/teacher: the true "
    "next item; RPS: the SR model's top-1; TA: the hidden most recent history item)",
    "sr_model": "display name of the SR model whose pattern the soft prompt holds, e.g. SASRec",
    "sr_predictions": "list of the SR model's ranked predictions (titles), best first; in RPS the "
    "ones after its top-1 (ranks 2..h+1), possibly empty; in sr_hint its top-h among the candidates",
    "sr_prediction": "TA: the SR model's top-1 prediction after the full history (hidden item included)",
    "example_history": "TA: the first items of the same user's history, oldest first, without the "
    "example's hidden most recent item",
    "example_recent": "TA: the example's hidden most recent item (the example's answer)",
    "example_prediction": "TA: the SR model's top-1 prediction after the example's items (hidden one included)",
    SOFT_SLOT: "the soft prompt: a string of P placeholder tokens given by the LLM side, rendered "
    "exactly once at the slot",
}
LIST_VARIABLES = frozenset({"history", "candidates", "sr_predictions", "example_history"})


@dataclass(frozen=True)
class Task:
    """What the code promises to provide to a template of this task."""

    name: str
    description: str
    requires_soft_prompt: bool
    provides: frozenset[str]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("ta", "DELRec stage 1, Temporal Analysis", True, frozenset(
            {"history", "example_history", "example_recent", "example_prediction", "sr_prediction",
             "sr_model", SOFT_SLOT, TARGET})),
        Task("rps", "DELRec stage 1, Recommendation Pattern Simulating", True, frozenset(
            {"history", "candidates", "sr_predictions", "sr_model", SOFT_SLOT, TARGET})),
        Task("lsr", "DELRec stage 2, LLM sequential recommendation", True, frozenset(
            {"history", "candidates", "sr_model", SOFT_SLOT, TARGET})),
        Task("plain", "candidate recommendation without a soft prompt (ablation)", False, frozenset(
            {"history", "candidates", TARGET})),
        Task("sr_hint", "stage 2 with the SR model's top-h among the candidates named as text (hard-prompt baseline)",
             False, frozenset({"history", "candidates", "sr_predictions", "sr_model", TARGET})),
        Task("teacher", "free generation of the next item, grounded to the catalogue (BIGRec-style teacher)",
             False, frozenset({"history", TARGET})),
    )
}
