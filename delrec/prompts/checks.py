"""Checking one template's text against the contract in `contract.py`.

Prompt engineers fix templates from these messages alone, so each names the file (and the line
where one is known) and says what to change. Each check returns every problem it finds and the
checks after it still run where they can, so `delrec prompts lint` lists them all in one go.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from jinja2 import TemplateSyntaxError, meta, nodes

from delrec.config import excerpt, parse_yaml
from delrec.errors import DelrecError, where
from delrec.prompts.contract import BLOCKS, HEADER_KEYS, SOFT_SLOT, TARGET, TASKS, TEMPLATE_SUFFIX, VARIABLES, Task
from delrec.prompts.rendering import ENVIRONMENT, PromptTemplate

_HEADER = re.compile(r"\A(?P<lead>\s*)\{#-?\s*delrec:?[ \t]*\n(?P<body>.*?)-?#\}", re.DOTALL)

Domains = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class Header:
    """The header's declarations; a missing or wrong one is replaced by a default so later checks can run."""

    task: Task | None
    description: str
    requires_soft_prompt: bool
    variables: list[str]


def analyse(path: Path, source: str, domains: Domains) -> tuple[PromptTemplate | None, list[str]]:
    """Check the text of template file `path`; returns the template (None if unusable) and every problem found."""
    fields, problems = _read_header(path, source)
    if fields is None:
        return None, problems
    header, found = _check_header(path, fields)
    problems += found + _check_declared(path, header, domains)
    try:  # compiling also finds what parsing does not, such as an unknown filter
        ast = ENVIRONMENT.parse(source, name=path.name)
        compiled = ENVIRONMENT.from_string(source)
    except TemplateSyntaxError as exc:
        return None, problems + [f"{where(path, exc.lineno)}: syntax error: {exc.message}"]
    blocks, found = _check_blocks(path, ast)
    problems += found
    if blocks is None:
        return None, problems
    used, found = _check_variables(path, header.variables, blocks, ast)
    problems += found + _check_completion(path, used, blocks["completion"])
    problems += _check_soft_slot(path, header.requires_soft_prompt, used, blocks["prompt"])
    if problems:
        return None, problems
    digest = hashlib.sha256(source.encode())
    digest.update(repr(sorted((d, sorted(w.items())) for d, w in domains.items())).encode())
    template = PromptTemplate(
        name=path.name[: -len(TEMPLATE_SUFFIX)], path=path, task=header.task.name, description=header.description,
        requires_soft_prompt=header.requires_soft_prompt, variables=tuple(header.variables),
        prompt_variables=used["prompt"], completion_variables=used["completion"],
        domains=domains, fingerprint=digest.hexdigest()[:16], compiled=compiled,
    )
    return template, []


def _read_header(path: Path, source: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The header comment's YAML mapping; None when there is no header or its YAML does not parse."""
    match = _HEADER.match(source)
    if not match:
        return None, [f"{where(path, 1)}: missing header; start the file with a '{{# delrec' comment "
                      "declaring task, description, requires_soft_prompt and variables (see delrec/prompts/templates/README.md)"]
    header_line = match.group("lead").count("\n") + 2
    try:
        loaded = parse_yaml(match.group("body"), path, first_line=header_line, what="header YAML")
    except DelrecError as exc:
        return None, [str(exc)]
    if not isinstance(loaded, dict):
        return {}, [f"{where(path, header_line)}: the header must be a YAML mapping of {', '.join(HEADER_KEYS)}"]
    return loaded, [f"{path}: unknown header key {excerpt(key)}; expected {', '.join(HEADER_KEYS)}"
                    for key in loaded if key not in HEADER_KEYS]


def _check_header(path: Path, fields: dict[str, Any]) -> tuple[Header, list[str]]:
    """Each header key's type, and that `requires_soft_prompt` matches the task."""
    problems: list[str] = []
    task_name = str(fields.get("task", path.name[: -len(TEMPLATE_SUFFIX)]))
    task = TASKS.get(task_name)
    if task is None:
        problems.append(f"{path}: unknown task {excerpt(task_name)}; set 'task:' in the header to one of "
                        f"{', '.join(TASKS)} (the file name is the default)")
    description = fields.get("description")
    if not isinstance(description, str) or not description.strip():
        problems.append(f"{path}: header needs a one-line 'description'")
        description = ""
    requires = fields.get("requires_soft_prompt")
    if not isinstance(requires, bool):
        problems.append(f"{path}: header needs 'requires_soft_prompt: true' or 'false'")
        requires = task.requires_soft_prompt if task else False
    elif task is not None and requires != task.requires_soft_prompt:
        problems.append(f"{path}: task '{task.name}' needs requires_soft_prompt: {str(task.requires_soft_prompt).lower()}")
    declared = fields.get("variables")
    if not isinstance(declared, list) or not all(isinstance(v, str) for v in declared):
        problems.append(f"{path}: header needs 'variables: [name, ...]' listing every variable the template uses")
        declared = []
    return Header(task, " ".join(description.split()), requires, declared), problems


def _check_declared(path: Path, header: Header, domains: Domains) -> list[str]:
    """Declared variables exist (code or domain wording) and the task's code provides them."""
    problems = [f"{path}: variable {excerpt(key)} is declared {count} times"
                for key, count in Counter(header.variables).items() if count > 1]
    wording_keys = set(next(iter(domains.values()), {})) if domains else set()
    known = set(VARIABLES) | wording_keys
    task = header.task
    for key in header.variables:
        if key not in known:
            problems.append(f"{path}: declares unknown variable {excerpt(key)}; known variables: "
                            f"{', '.join(sorted(known))}")
        elif task is not None and key in VARIABLES and key not in task.provides:
            problems.append(f"{path}: variable '{key}' is not provided for task '{task.name}' (provided: "
                            f"{', '.join(sorted(task.provides | wording_keys))})")
    return problems


def _walk(node: nodes.Node, parents: tuple = ()):
    yield node, parents
    for child in node.iter_child_nodes():
        yield from _walk(child, parents + (node,))


def _check_blocks(path: Path, ast: nodes.Template) -> tuple[dict[str, nodes.Block] | None, list[str]]:
    """Exactly the prompt and completion blocks, side by side, with nothing outside them (it would be
    ignored) and no include/import (each template must read on its own). None if a block is missing."""
    problems: list[str] = []
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
    missing = [block for block in BLOCKS if block not in blocks]
    problems += [f"{path}: missing {{% block {block} %}} ... {{% endblock %}}" for block in missing]
    return (None if missing else blocks), problems


def _check_variables(
    path: Path, declared: list[str], blocks: dict[str, nodes.Block], ast: nodes.Template
) -> tuple[dict[str, frozenset[str]], list[str]]:
    """The variables each block uses; every used one declared and every declared one used."""
    used: dict[str, frozenset[str]] = {}
    for block in BLOCKS:
        sub = nodes.Template(blocks[block].body, lineno=blocks[block].lineno)
        sub.set_environment(ENVIRONMENT)
        used[block] = frozenset(meta.find_undeclared_variables(sub))
    first_line: dict[str, int] = {}
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load":
            first_line.setdefault(node.name, node.lineno)
    all_used = used["prompt"] | used["completion"]
    problems = [f"{where(path, first_line.get(key))}: template {path.name} uses variable '{key}' "
                "but does not declare it; add it to the header's variables"
                for key in sorted(all_used - set(declared), key=lambda k: first_line.get(k, 0))]
    problems += [f"{path}: template {path.name} declares variable '{key}' but never uses it; "
                 "remove it from the header's variables" for key in declared if key not in all_used]
    return used, problems


def _check_completion(path: Path, used: dict[str, frozenset[str]], completion: nodes.Block) -> list[str]:
    """The answer is in the completion alone: the loss and the read-outs score the title only."""
    problems = []
    if TARGET in used["prompt"]:
        problems.append(f"{path}: template {path.name} uses '{TARGET}' in the prompt block; the answer would leak "
                        "into the prompt")
    if TARGET not in used["completion"]:
        problems.append(f"{path}: the completion block must render the answer '{{{{ {TARGET} }}}}'")
    elif not _is_target_alone(completion):
        problems.append(f"{where(path, completion.lineno)}: the completion block must be "
                        f"'{{{{ {TARGET} }}}}' alone (the loss and the read-outs score the answer's title only); "
                        "move any other text into the prompt block")
    return problems


def _is_target_alone(block: nodes.Block) -> bool:
    """The block's body is whitespace and one plain `{{ target }}` (no filter, no other text or tags)."""
    if not all(isinstance(output, nodes.Output) for output in block.body):
        return False
    parts = [node for output in block.body for node in output.nodes]
    names = [n for n in parts if isinstance(n, nodes.Name)]
    rest = [n for n in parts if not isinstance(n, nodes.Name)]
    return (len(names) == 1 and names[0].name == TARGET
            and all(isinstance(n, nodes.TemplateData) and not n.data.strip() for n in rest))


def _check_soft_slot(path: Path, requires: bool, used: dict[str, frozenset[str]], prompt: nodes.Block) -> list[str]:
    """One plain `{{ soft_prompt }}` in the prompt block when the header requires it, none otherwise:
    the LLM side replaces exactly one placeholder string with the soft-prompt embeddings."""
    problems = []
    slots = [(node, parents) for node, parents in _walk(prompt)
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
    return problems
