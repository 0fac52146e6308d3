"""Prompt templates: loading, checking and rendering the files in `prompts/`.

Prompt engineers edit `prompts/*.jinja` and `prompts/domains.yaml`, never code; see
`prompts/README.md` for the file format. In short, a template is Jinja2 (strict undefined) with

    {# delrec
    task: lsr                         # which contract it follows (default: the file name)
    description: one line
    requires_soft_prompt: true        # exactly one {{ soft_prompt }} slot (false: none)
    variables: [history, candidates, sr_model, soft_prompt, item_noun, target]
    #}
    {% block prompt %} ...the text the model reads... {% endblock %}
    {% block completion %}{{ target }}{% endblock %}

Rendering gives a `RenderedPrompt`: `prompt` is the prompt block with surrounding whitespace
removed plus exactly one final newline; `completion` is the completion block stripped (the LM
loss is on it; the caller appends the end-of-sequence token). So editors' trailing spaces or
blank lines never change what the model sees, and the text around the soft-prompt slot is the
same in training and serving.

Variables come from two places: the caller (the `VARIABLES` below; each task provides a fixed
subset, `TASKS`) and the domain wording in `domains.yaml` (`item_noun`, `item_noun_plural`,
`verb`, `verb_past`, filled in from the `domain` argument). A caller may pass a known variable
that a template does not use (so a prompt engineer can drop a variable without code changes);
a name that is not a known variable is an error (a typo), as is a variable the template needs
but did not get.

Use `get_template(name)` once and `template.render(...)` per instance when building datasets:
`render(name, ...)` re-checks the files' modification times on every call.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from delrec.errors import DelrecError, where

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
_HEADER = re.compile(r"\A(?P<lead>\s*)\{#-?\s*delrec:?[ \t]*\n(?P<body>.*?)-?#\}", re.DOTALL)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Variables the code provides (domain wording comes from domains.yaml on top of these).
VARIABLES: dict[str, str] = {
    "history": "list of titles the user interacted with, oldest first (TA: the part after the "
    "example, without the hidden most recent item)",
    "candidates": "list of candidate titles, in the order of the fixed candidate set",
    "target": "the answer's title; used only in the completion block (LSR/plain/teacher: the true "
    "next item; RPS: the SR model's top-1; TA: the hidden most recent history item)",
    "sr_model": "display name of the SR model whose pattern the soft prompt holds, e.g. SASRec",
    "sr_predictions": "list of the SR model's ranked predictions (titles), best first; in RPS the "
    "ones after its top-1 (ranks 2..h+1), possibly empty",
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
        Task("teacher", "free generation of the next item, grounded to the catalogue (BIGRec-style teacher)",
             False, frozenset({"history", TARGET})),
    )
}


# ----------------------------------------------------------------------------- results


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
class TokenCount:
    prompt: int
    completion: int
    method: str  # how tokens were counted, for reports

    @property
    def total(self) -> int:
        """Prompt + completion + 1 end-of-sequence token."""
        return self.prompt + self.completion + 1


@dataclass
class TemplateReport:
    name: str
    problems: list[str] = field(default_factory=list)
    tokens: TokenCount | None = None
    instance: str | None = None  # what was measured, for the report


# ----------------------------------------------------------------------------- environment


def numbered(items: Any) -> str:
    """`1. A` / `2. B` ... one per line; `(none)` for an empty list. The one list style."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"numbered expects a list of titles, got {type(items).__name__}")
    items = list(items)
    if not items:
        return "(none)"
    return "\n".join(f"{i}. {title}" for i, title in enumerate(items, start=1))


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False
    )
    env.filters["numbered"] = numbered
    return env


_ENV = _environment()


def soft_prompt_placeholder(count: int = DEFAULT_SOFT_TOKENS, token_format: str = SOFT_TOKEN_FORMAT) -> str:
    """P placeholder tokens joined with no spaces, e.g. `<|sp:0|><|sp:1|>...`: the value of `soft_prompt`."""
    if count < 1:
        raise DelrecError(f"soft prompt size must be at least 1, got {count}")
    return "".join(token_format.format(i) for i in range(count))


# ----------------------------------------------------------------------------- folders and domains


def prompts_dir(folder: str | os.PathLike | None = None) -> Path:
    """The template folder: `folder`, else $DELREC_PROMPTS_DIR, else the repository's prompts/."""
    if folder is None:
        folder = os.environ.get(ENV_VAR) or Path(__file__).resolve().parents[1] / "prompts"
    path = Path(folder)
    if not path.is_dir():
        raise DelrecError(
            f"{path}: prompt template folder not found; pass --prompts DIR or set {ENV_VAR}"
        )
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DelrecError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise DelrecError(f"{path}: cannot read ({exc.strerror})") from None


def _check_domains(path: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    problems: list[str] = []
    if not path.is_file():
        return {}, [f"{path}: domain wording file not found; it defines item_noun, item_noun_plural, ... per domain"]
    try:
        data = yaml.safe_load(_read(path))
    except DelrecError as exc:
        return {}, [str(exc)]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return {}, [f"{where(path, mark.line + 1 if mark else None)}: invalid YAML ({getattr(exc, 'problem', exc)})"]
    if not isinstance(data, dict) or DEFAULT_DOMAIN not in data:
        return {}, [f"{path}: expected a mapping of domain: {{key: wording}} with a '{DEFAULT_DOMAIN}' domain"]
    domains: dict[str, dict[str, str]] = {}
    reference = data[DEFAULT_DOMAIN]
    keys = sorted(reference) if isinstance(reference, dict) else []
    for domain, wording in data.items():
        if not isinstance(wording, dict):
            problems.append(f"{path}: domain '{domain}' must map keys to wording, got {wording!r}")
            continue
        for key, value in wording.items():
            if not isinstance(key, str) or not _IDENTIFIER.match(key):
                problems.append(f"{path}: domain '{domain}' key {key!r} is not a valid variable name")
            elif key in VARIABLES:
                problems.append(f"{path}: domain '{domain}' key '{key}' clashes with the variable of that name")
            elif not isinstance(value, str) or not value.strip() or value != value.strip():
                problems.append(f"{path}: domain '{domain}' key '{key}' must be non-empty text without "
                                f"surrounding spaces, got {value!r}")
        missing = sorted(set(keys) - set(wording))
        extra = sorted(set(wording) - set(keys))
        if missing or extra:
            problems.append(f"{path}: domain '{domain}' must define the same keys as '{DEFAULT_DOMAIN}' "
                            f"({', '.join(keys)}); missing {missing or 'none'}, extra {extra or 'none'}")
        domains[str(domain)] = {str(k): v for k, v in wording.items()}
    return domains, problems


def load_domains(folder: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """domain -> {item_noun, item_noun_plural, verb, verb_past, ...} from `domains.yaml`."""
    domains, problems = _check_domains(prompts_dir(folder) / DOMAINS_FILE)
    if problems:
        raise DelrecError(problems[0])
    return domains


# ----------------------------------------------------------------------------- templates


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
        try:
            return "".join(self.compiled.blocks[block](self.compiled.new_context(values)))
        except UndefinedError as exc:
            raise DelrecError(f"template {self.file}: {exc.message}") from None
        except (TemplateError, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            raise DelrecError(f"template {self.file} failed to render its {block} block: {exc}") from None


def _check_type(file: str, key: str, value: Any) -> None:
    if key in LIST_VARIABLES:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) for v in value
        ):
            raise DelrecError(f"template {file}: variable '{key}' must be a list of titles, got {_short(value)}")
    elif not isinstance(value, str):
        raise DelrecError(f"template {file}: variable '{key}' must be text, got {_short(value)}")
    elif key == SOFT_SLOT and (not value or value != value.strip()):
        raise DelrecError(f"template {file}: variable '{SOFT_SLOT}' must be non-empty with no surrounding "
                          f"whitespace (spaces beside soft tokens change the tokens), got {value[:40]!r}")


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _walk(node: nodes.Node, parents: tuple = ()):
    yield node, parents
    for child in node.iter_child_nodes():
        yield from _walk(child, parents + (node,))


def _analyse(path: Path, domains: Mapping[str, Mapping[str, str]]) -> tuple[PromptTemplate | None, list[str]]:
    """Check one template file; returns the template (None if unusable) and every problem found."""
    problems: list[str] = []
    try:
        source = _read(path)
    except DelrecError as exc:
        return None, [str(exc)]
    name = path.name[: -len(TEMPLATE_SUFFIX)]

    # header
    match = _HEADER.match(source)
    header: dict[str, Any] = {}
    if not match:
        problems.append(f"{where(path, 1)}: missing header; start the file with a '{{# delrec' comment "
                        "declaring task, description, requires_soft_prompt and variables (see prompts/README.md)")
        return None, problems
    else:
        header_line = match.group("lead").count("\n") + 2
        try:
            loaded = yaml.safe_load(match.group("body"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = header_line + mark.line if mark else 1
            problems.append(f"{where(path, line)}: invalid header YAML ({getattr(exc, 'problem', exc)})")
            return None, problems
        if not isinstance(loaded, dict):
            problems.append(f"{where(path, header_line)}: the header must be a YAML mapping of {', '.join(HEADER_KEYS)}")
            loaded = {}
        header = loaded
        for key in header:
            if key not in HEADER_KEYS:
                problems.append(f"{path}: unknown header key '{key}'; expected {', '.join(HEADER_KEYS)}")
    task_name = str(header.get("task", name))
    task = TASKS.get(task_name)
    if task is None:
        problems.append(f"{path}: unknown task '{task_name}'; set 'task:' in the header to one of "
                        f"{', '.join(TASKS)} (the file name is the default)")
    description = header.get("description")
    if not isinstance(description, str) or not description.strip():
        problems.append(f"{path}: header needs a one-line 'description'")
        description = ""
    requires = header.get("requires_soft_prompt")
    if not isinstance(requires, bool):
        problems.append(f"{path}: header needs 'requires_soft_prompt: true' or 'false'")
        requires = task.requires_soft_prompt if task else False
    elif task is not None and requires != task.requires_soft_prompt:
        problems.append(f"{path}: task '{task.name}' needs requires_soft_prompt: {str(task.requires_soft_prompt).lower()}")
    declared = header.get("variables")
    if not isinstance(declared, list) or not all(isinstance(v, str) for v in declared):
        problems.append(f"{path}: header needs 'variables: [name, ...]' listing every variable the template uses")
        declared = []
    for key, count in Counter(declared).items():
        if count > 1:
            problems.append(f"{path}: variable '{key}' is declared {count} times")
    wording_keys = set(next(iter(domains.values()), {})) if domains else set()
    known = set(VARIABLES) | wording_keys
    for key in declared:
        if key not in known:
            problems.append(f"{path}: declares unknown variable '{key}'; known variables: {', '.join(sorted(known))}")
        elif task is not None and key in VARIABLES and key not in task.provides:
            problems.append(f"{path}: variable '{key}' is not provided for task '{task.name}' (provided: "
                            f"{', '.join(sorted(task.provides | wording_keys))})")

    # body
    try:
        ast = _ENV.parse(source, name=path.name)
    except TemplateSyntaxError as exc:
        problems.append(f"{where(path, exc.lineno)}: syntax error: {exc.message}")
        return None, problems
    for node, parents in _walk(ast):
        if isinstance(node, (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
            problems.append(f"{where(path, node.lineno)}: {{% {type(node).__name__.lower()} %}} is not supported; "
                            "keep each template self-contained")
        if isinstance(node, nodes.Block) and any(isinstance(p, nodes.Block) for p in parents):
            problems.append(f"{where(path, node.lineno)}: block '{node.name}' is inside another block")
    blocks = {node.name: node for node in ast.body if isinstance(node, nodes.Block)}
    for node in ast.body:
        if isinstance(node, nodes.Block):
            if node.name not in BLOCKS:
                problems.append(f"{where(path, node.lineno)}: unknown block '{node.name}'; use {' and '.join(BLOCKS)}")
        elif not (isinstance(node, nodes.Output) and all(
            isinstance(n, nodes.TemplateData) and not n.data.strip() for n in node.nodes
        )):
            problems.append(f"{where(path, node.lineno)}: text or tags outside the prompt/completion blocks would be "
                            "ignored; move them inside a block")
    for block in BLOCKS:
        if block not in blocks:
            problems.append(f"{path}: missing {{% block {block} %}} ... {{% endblock %}}")
    if any(block not in blocks for block in BLOCKS):
        return None, problems

    used: dict[str, frozenset[str]] = {}
    for block in BLOCKS:
        sub = nodes.Template(blocks[block].body, lineno=blocks[block].lineno)
        sub.set_environment(_ENV)
        used[block] = frozenset(meta.find_undeclared_variables(sub))
    first_line: dict[str, int] = {}
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load":
            first_line.setdefault(node.name, node.lineno)
    all_used = used["prompt"] | used["completion"]
    for key in sorted(all_used - set(declared), key=lambda k: first_line.get(k, 0)):
        problems.append(f"{where(path, first_line.get(key))}: template {path.name} uses variable '{key}' "
                        "but does not declare it; add it to the header's variables")
    for key in declared:
        if key not in all_used:
            problems.append(f"{path}: template {path.name} declares variable '{key}' but never uses it; "
                            "remove it from the header's variables")
    if TARGET in used["prompt"]:
        problems.append(f"{path}: template {path.name} uses '{TARGET}' in the prompt block; the answer would leak "
                        "into the prompt")
    if TARGET not in used["completion"]:
        problems.append(f"{path}: the completion block must render the answer '{{{{ {TARGET} }}}}'")
    elif not _is_target_alone(blocks["completion"]):
        problems.append(f"{where(path, blocks['completion'].lineno)}: the completion block must be "
                        f"'{{{{ {TARGET} }}}}' alone (the loss and the read-outs score the answer's title only); "
                        "move any other text into the prompt block")

    # soft-prompt slot
    slots = [(node, parents) for node, parents in _walk(blocks["prompt"])
             if isinstance(node, nodes.Name) and node.name == SOFT_SLOT]
    if SOFT_SLOT in used["completion"]:
        problems.append(f"{path}: template {path.name} uses '{SOFT_SLOT}' in the completion block; the slot "
                        "belongs in the prompt")
    if requires:
        if not slots:
            problems.append(f"{path}: template {path.name} has no soft-prompt slot; add {{{{ {SOFT_SLOT} }}}} "
                            "(requires_soft_prompt: true)")
        elif len(slots) > 1:
            lines = ", ".join(str(node.lineno) for node, _ in slots)
            problems.append(f"{path}: template {path.name} has {len(slots)} soft-prompt slots (lines {lines}); "
                            "it needs exactly one")
        else:
            node, parents = slots[0]
            if not (len(parents) == 2 and isinstance(parents[1], nodes.Output)):
                problems.append(f"{where(path, node.lineno)}: write the slot as a plain {{{{ {SOFT_SLOT} }}}} outside "
                                "any if/for/filter so it appears exactly once, unchanged")
    elif slots:
        problems.append(f"{where(path, slots[0][0].lineno)}: template {path.name} has a soft-prompt slot but "
                        "requires_soft_prompt is false")

    if problems:
        return None, problems
    digest = hashlib.sha256(source.encode())
    digest.update(repr(sorted((d, sorted(w.items())) for d, w in domains.items())).encode())
    template = PromptTemplate(
        name=name, path=path, task=task.name, description=" ".join(description.split()),
        requires_soft_prompt=requires, variables=tuple(declared),
        prompt_variables=used["prompt"], completion_variables=used["completion"],
        domains=domains, fingerprint=digest.hexdigest()[:16], compiled=_ENV.from_string(source),
    )
    return template, []


def _is_target_alone(block: nodes.Block) -> bool:
    """The block's body is whitespace and one plain `{{ target }}` (no filter, no other text or tags)."""
    if not all(isinstance(output, nodes.Output) for output in block.body):
        return False
    parts = [node for output in block.body for node in output.nodes]
    names = [n for n in parts if isinstance(n, nodes.Name)]
    rest = [n for n in parts if not isinstance(n, nodes.Name)]
    return (len(names) == 1 and names[0].name == TARGET
            and all(isinstance(n, nodes.TemplateData) and not n.data.strip() for n in rest))


_CACHE: dict[tuple, tuple[PromptTemplate | None, list[str]]] = {}


def _signature(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _analyse_cached(path: Path, folder: Path) -> tuple[PromptTemplate | None, list[str]]:
    domains_path = folder / DOMAINS_FILE
    key = (_signature(path), _signature(domains_path))
    if key not in _CACHE:
        domains, problems = _check_domains(domains_path)
        if problems:
            result: tuple[PromptTemplate | None, list[str]] = (None, problems)
        else:
            result = _analyse(path, domains)
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = result
    return _CACHE[key]


def template_names(folder: str | os.PathLike | None = None) -> list[str]:
    """Names (file stems) of the `*.jinja` files in the folder, sorted."""
    return sorted(p.name[: -len(TEMPLATE_SUFFIX)] for p in prompts_dir(folder).glob(f"*{TEMPLATE_SUFFIX}"))


def get_template(name: str, folder: str | os.PathLike | None = None) -> PromptTemplate:
    """The checked template `name` (`lsr` or `lsr.jinja`); problems raise a one-line DelrecError."""
    path_folder = prompts_dir(folder)
    stem = name[: -len(TEMPLATE_SUFFIX)] if name.endswith(TEMPLATE_SUFFIX) else name
    path = path_folder / f"{stem}{TEMPLATE_SUFFIX}"
    if not path.is_file():
        available = ", ".join(template_names(path_folder)) or "none"
        raise DelrecError(f"no template '{stem}' in {path_folder} (available: {available})")
    template, problems = _analyse_cached(path, path_folder)
    if template is None:
        more = f" (and {len(problems) - 1} more; run `delrec prompts lint`)" if len(problems) > 1 else ""
        raise DelrecError(problems[0] + more)
    return template


def list_templates(folder: str | os.PathLike | None = None) -> list[PromptTemplate]:
    """Every template in the folder, checked (the first problem raises)."""
    return [get_template(name, folder) for name in template_names(folder)]


def render(
    name: str,
    variables: Mapping[str, Any],
    domain: str = DEFAULT_DOMAIN,
    *,
    folder: str | os.PathLike | None = None,
    with_completion: bool = True,
    strict: bool = False,
) -> RenderedPrompt:
    """Render template `name` (e.g. "lsr") with `variables`; see `PromptTemplate.render`."""
    return get_template(name, folder).render(variables, domain, with_completion=with_completion, strict=strict)


# ----------------------------------------------------------------------------- token counting


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face tokenizer from a local folder (no downloads)."""
    path = Path(path)
    if not path.is_dir():
        raise DelrecError(f"{path}: tokenizer folder not found; pass a local folder holding tokenizer files")
    from transformers import AutoTokenizer

    from delrec.llm.loading import TOKENIZER_FILES

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DelrecError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass an LLM folder, e.g. "
                          "one from `delrec llm build-tiny`")

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DelrecError(f"{path}: could not load a tokenizer ({first})") from None


def count_tokens(rendered: RenderedPrompt, tokenizer: Any = None, soft_tokens: int | None = None) -> TokenCount:
    """Tokens of the prompt and completion. The soft prompt counts as `soft_tokens` tokens (default:
    its number of `<|...|>` placeholder tokens, each one id once added to the tokenizer);
    the text on either side is tokenized separately, as it is when soft tokens are added tokens.
    Without a tokenizer, whitespace-separated words are counted."""
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


# ----------------------------------------------------------------------------- variables from a dataset


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
    rps: target = sr_ranked[0], sr_predictions = sr_ranked[1 : 1 + sr_top]; candidates as given
        (they should hold the SR top-h, filled at random up to C).
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
        values.update(target=sr_ranked[0], sr_predictions=list(sr_ranked[1 : 1 + sr_top]))
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

    SR predictions: `predictions` (ranked item ids for this instance, e.g. from `delrec sr predict`)
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
        ranked = _first_not_in(pop, seen, sr_top + 1)
        notes.append("SR predictions: popularity order of the training split (pass --predictions FILE for an SR model's)")
    else:
        ranked = [p for p in predictions if p not in seen][: sr_top + 1] or list(predictions[: sr_top + 1])
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
    return {k: v for k, v in values.items() if k in template.variables}, notes


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
    count = max(dataset.num_candidates, sr_top + 1)
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
    return {k: v for k, v in values.items() if k in template.variables}, description


def _sample_variables(template: PromptTemplate, soft_prompt: str) -> dict[str, Any]:
    history = [f"Sample Title {i}" for i in range(1, 7)]
    values = task_variables(
        template.task, history, "Sample Title 9", candidates=["Sample Title 9", "Sample Title 8", "Sample Title 7"],
        sr_model="SASRec", sr_ranked=["Sample Title 9", "Sample Title 7", "Sample Title 8"],
        example_prediction="Sample Title 5", soft_prompt=soft_prompt,
    )
    return {k: v for k, v in values.items() if k in template.variables}


def template_corpus(folder: str | os.PathLike | None = None, soft_prompt: str | None = None) -> list[str]:
    """Every template rendered with sample titles in every domain (prompt + completion): text for
    training a tiny tokenizer that knows the templates' wording."""
    soft = soft_prompt or soft_prompt_placeholder(1)
    texts = []
    for template in list_templates(folder):
        for domain in template.domains:
            texts.append(template.render(_sample_variables(template, soft), domain).text)
    return texts


# ----------------------------------------------------------------------------- lint


def lint_report(
    folder: str | os.PathLike | None = None,
    dataset=None,
    tokenizer: Any = None,
    max_length: int | None = None,
    *,
    soft_tokens: int = DEFAULT_SOFT_TOKENS,
    domain: str = DEFAULT_DOMAIN,
    sr_top: int = DEFAULT_SR_TOP,
) -> list[TemplateReport]:
    """Check every template (and domains.yaml); with a dataset also measure the longest instance.
    `dataset`: a PreparedDataset or a folder; `tokenizer`: a tokenizer object or a local folder."""
    path = prompts_dir(folder)
    if dataset is not None and not hasattr(dataset, "instances"):
        from delrec.data.dataset import PreparedDataset

        dataset = PreparedDataset.load(dataset)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    domains, domain_problems = _check_domains(path / DOMAINS_FILE)
    if not domain_problems and domain not in domains:
        domain_problems.append(f"unknown domain '{domain}'; {DOMAINS_FILE} defines: {', '.join(domains)}")
    reports = [TemplateReport(DOMAINS_FILE, list(domain_problems))]
    names = template_names(path)
    for task in TASKS:
        if task not in names:
            reports[0].problems.append(f"{path}: no template '{task}{TEMPLATE_SUFFIX}' ({TASKS[task].description}); "
                                       "the code renders it by that name")
    if domain_problems:
        return reports
    soft = soft_prompt_placeholder(soft_tokens)
    for name in names:
        report = TemplateReport(f"{name}{TEMPLATE_SUFFIX}")
        reports.append(report)
        template, problems = _analyse_cached(path / f"{name}{TEMPLATE_SUFFIX}", path)
        if template is None:
            report.problems.extend(problems)
            continue
        try:
            for dom in template.domains:
                template.render(_sample_variables(template, soft), dom)
            if dataset is not None:
                values, description = worst_case_variables(template, dataset, soft_prompt=soft, sr_top=sr_top)
                rendered = template.render(values, domain)
                report.tokens = count_tokens(rendered, tokenizer, soft_tokens if template.requires_soft_prompt else None)
                report.instance = description
                if max_length is not None and report.tokens.total > max_length:
                    report.problems.append(
                        f"{template.path}: {report.tokens.total} tokens ({report.tokens.method}) on the {description}"
                        f" exceed max length {max_length}; shorten the template, lower max_history or raise the limit")
        except DelrecError as exc:
            report.problems.append(str(exc))
    return reports


def lint(
    folder: str | os.PathLike | None = None,
    dataset=None,
    tokenizer: Any = None,
    max_length: int | None = None,
    *,
    soft_tokens: int = DEFAULT_SOFT_TOKENS,
    domain: str = DEFAULT_DOMAIN,
    sr_top: int = DEFAULT_SR_TOP,
) -> list[str]:
    """Every problem found by `lint_report`, one line each; empty when all is well."""
    reports = lint_report(folder, dataset, tokenizer, max_length, soft_tokens=soft_tokens, domain=domain, sr_top=sr_top)
    return [problem for report in reports for problem in report.problems]
