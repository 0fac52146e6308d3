"""A checked template, what rendering it gives, and how many tokens that is.

`prompt` is the prompt block with surrounding whitespace removed plus exactly one final newline;
`completion` is the completion block stripped (the LM loss is on it; the caller appends the
end-of-sequence token). So editors' trailing spaces or blank lines never change what the model
sees, and the text around the soft-prompt slot is the same in training and serving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from jinja2 import TemplateError, UndefinedError

from delrec.config import SOFT_PROMPT_TOKENS, shorten
from delrec.errors import DelrecError, where
from delrec.prompts.contract import (
    DEFAULT_DOMAIN,
    DEFAULT_SOFT_TOKENS,
    DOMAINS_FILE,
    LIST_VARIABLES,
    SOFT_SLOT,
    SOFT_TOKEN_FORMAT,
    VARIABLES,
)
from delrec.prompts.sandbox import PromptSandbox, describe, render_block, template_line


def numbered(items: Any) -> str:
    """`1. A` / `2. B` ... one per line; `(none)` for an empty list. The one list style."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"numbered expects a list of titles, got {type(items).__name__}")
    items = list(items)
    if not items:
        return "(none)"
    return "\n".join(f"{i}. {title}" for i, title in enumerate(items, start=1))


ENVIRONMENT = PromptSandbox(filters={"numbered": numbered})


def soft_prompt_placeholder(count: int = DEFAULT_SOFT_TOKENS, token_format: str = SOFT_TOKEN_FORMAT) -> str:
    """P placeholder tokens joined with no spaces, e.g. `<|sp:0|><|sp:1|>...`: the value of `soft_prompt`."""
    if count not in SOFT_PROMPT_TOKENS:  # checked before the text is built: 10**9 placeholders fill the memory
        raise DelrecError(f"soft prompt size must be {SOFT_PROMPT_TOKENS} tokens, got {count}")
    return "".join(token_format.format(i) for i in range(count))


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered template. The LM reads `prompt`; the loss is on `completion` (+ end marker)."""

    template: str
    prompt: str
    completion: str | None
    soft_span: tuple[int, int] | None = None  # character span of the soft prompt inside `prompt`

    @property
    def text(self) -> str:
        return self.prompt + (self.completion or "")


@dataclass(frozen=True)
class PromptTemplate:
    """A checked template; `render` fills it for one instance."""

    name: str  # file name without .jinja
    path: Path
    task: str
    description: str
    requires_soft_prompt: bool
    variables: tuple[str, ...]  # as declared, in header order
    prompt_variables: frozenset[str]
    completion_variables: frozenset[str]
    domains: Mapping[str, Mapping[str, str]]
    fingerprint: str  # hash of the template and domain wording: record it with trained soft prompts
    compiled: Any = field(repr=False, compare=False)

    @property
    def file(self) -> str:
        return self.path.name

    def render(
        self,
        variables: Mapping[str, Any],
        domain: str = DEFAULT_DOMAIN,
        *,
        with_completion: bool = True,
        strict: bool = False,
    ) -> RenderedPrompt:
        """Fill the template. `with_completion=False` (serving) allows omitting `target`.
        `strict=True` also rejects known variables the template does not declare."""
        if domain not in self.domains:
            raise DelrecError(f"unknown domain '{domain}'; {DOMAINS_FILE} defines: {', '.join(self.domains)}")
        wording = self.domains[domain]
        for key in variables:
            if key not in VARIABLES and key not in wording:
                raise DelrecError(f"template {self.file} got unknown variable '{key}'; "
                                  f"known: {', '.join(sorted(set(VARIABLES) | set(wording)))}")
            if strict and key not in self.variables:
                raise DelrecError(f"template {self.file} does not declare variable '{key}' (declares: "
                                  f"{', '.join(self.variables)})")
        values = {**wording, **variables}
        for key in sorted(self.prompt_variables | (self.completion_variables if with_completion else frozenset())):
            if key not in values:
                raise DelrecError(f"template {self.file} needs variable '{key}' ({VARIABLES.get(key, 'domain wording')})")
        for key in self.variables:
            if key in values:
                _check_type(self.file, key, values[key])
        soft = values.get(SOFT_SLOT) if self.requires_soft_prompt else None
        prompt = self._block("prompt", values).strip() + "\n"
        completion = None
        if with_completion or all(k in values for k in self.completion_variables):
            completion = self._block("completion", values).strip()
        span = None
        if soft is not None:
            count = prompt.count(soft)
            if count != 1:
                raise DelrecError(f"template {self.file}: the soft prompt appears {count} times in the rendered "
                                  "prompt, expected once (does a title contain the placeholder text?)")
            start = prompt.index(soft)
            span = (start, start + len(soft))
        return RenderedPrompt(self.name, prompt, completion, span)

    def _block(self, block: str, values: dict[str, Any]) -> str:
        """The block's text; any failure is one line naming the file and the template line."""
        try:
            return render_block(self.compiled, block, values)
        except (TemplateError, RecursionError, MemoryError, TypeError, ValueError, ArithmeticError, AttributeError,
                LookupError) as exc:
            raise DelrecError(f"{where(self.path, template_line(exc))}: {_failure(block, exc)}") from None


def _failure(block: str, exc: BaseException) -> str:
    """What went wrong rendering `block`, for `_block`'s one-line error."""
    if isinstance(exc, UndefinedError):
        return shorten(str(exc.message), 400)
    if isinstance(exc, TemplateError):  # the sandbox's limits and its text-only rule, Jinja's runtime errors
        return f"{block} block: {shorten(str(exc), 400)}"
    if isinstance(exc, RecursionError):
        return f"{block} block: calls nest too deeply (does a macro call itself?)"
    if isinstance(exc, MemoryError):
        return f"{block} block: out of memory"
    return f"{block} block failed to render: {shorten(str(exc), 400)}"


def _check_type(file: str, key: str, value: Any) -> None:
    if key in LIST_VARIABLES:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) for v in value
        ):
            raise DelrecError(f"template {file}: variable '{key}' must be a list of titles, got {describe(value)}")
    elif not isinstance(value, str):
        raise DelrecError(f"template {file}: variable '{key}' must be text, got {describe(value)}")
    elif key == SOFT_SLOT and (not value or value != value.strip()):
        raise DelrecError(f"template {file}: variable '{SOFT_SLOT}' must be non-empty with no surrounding "
                          f"whitespace (spaces beside soft tokens change the tokens), got {value[:40]!r}")


@dataclass(frozen=True)
class TokenCount:
    prompt: int
    completion: int
    method: str  # how tokens were counted, for reports

    @property
    def total(self) -> int:
        """Prompt + completion + 1 end-of-sequence token."""
        return self.prompt + self.completion + 1


def count_tokens(rendered: RenderedPrompt, tokenizer: Any = None, soft_tokens: int | None = None) -> TokenCount:
    """Tokens of the prompt and completion. The soft prompt counts as `soft_tokens` tokens (default:
    its number of `<|...|>` placeholder tokens, each one id once added to the tokenizer);
    the text on either side is tokenized separately, as it is when soft tokens are added tokens.
    `tokenizer` is a loaded tokenizer object (the caller loads it: loading belongs to the LLM
    layer); without one, whitespace-separated words are counted."""
    prompt, completion = rendered.prompt, rendered.completion or ""
    parts = [prompt]
    soft_text = ""
    if rendered.soft_span is not None:
        start, end = rendered.soft_span
        soft_text = prompt[start:end]
        parts = [prompt[:start], prompt[end:]]
    if tokenizer is None:
        n_soft = 0
        if soft_text:
            n_soft = soft_tokens if soft_tokens is not None else max(1, soft_text.count("<|"))
        return TokenCount(sum(len(p.split()) for p in parts) + n_soft, len(completion.split()),
                          "whitespace-separated words (no tokenizer given)")

    def encode(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    if soft_text:
        if soft_tokens is None:
            # placeholder tokens become one id each once added to the tokenizer (DESIGN.md)
            pieces = re.findall(r"<\|[^|]*\|>", soft_text)
            soft_tokens = len(pieces) if pieces else encode(soft_text)
        n_soft = soft_tokens
    else:
        n_soft = 0
    specials = len(tokenizer("", add_special_tokens=True)["input_ids"])
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return TokenCount(sum(encode(p) for p in parts) + n_soft + specials, encode(completion), f"tokenizer {name}")
