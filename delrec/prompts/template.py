"""The template folder and its files: where it is, `domains.yaml`, and `get_template`, the one way in.

Checking a template parses it and walks its syntax tree, so the result is cached under the files'
modification times and sizes: an edited file is checked again on its next use, an unchanged one
is not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from delrec.config import excerpt, parse_yaml, shorten
from delrec.errors import DelrecError
from delrec.prompts.checks import analyse
from delrec.prompts.contract import DEFAULT_DOMAIN, DOMAINS_FILE, ENV_VAR, TEMPLATE_SUFFIX, VARIABLES
from delrec.prompts.rendering import PromptTemplate, RenderedPrompt

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def shipped_prompts_dir() -> Path:
    """The templates shipped inside the package (delrec/prompts/templates: package data, in a checkout and in an
    installed wheel alike)."""
    from importlib.resources import files

    return Path(str(files("delrec.prompts").joinpath("templates")))


def prompts_dir(folder: str | os.PathLike | None = None) -> Path:
    """The template folder: `folder`, else $DELREC_PROMPTS_DIR, else the shipped templates (`shipped_prompts_dir`)."""
    if folder is None:
        folder = os.environ.get(ENV_VAR) or shipped_prompts_dir()
    path = Path(folder)
    if not path.is_dir():
        raise DelrecError(
            f"{path}: prompt template folder not found; pass --prompts_dir DIR or set {ENV_VAR}"
        )
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DelrecError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise DelrecError(f"{path}: cannot read ({exc.strerror})") from None


def check_domains(path: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The domain wording of `domains.yaml` and every problem in it: each domain must define the
    same keys as the default one, so any template renders in any domain."""
    problems: list[str] = []
    if not path.is_file():
        return {}, [f"{path}: domain wording file not found; it defines item_noun, item_noun_plural, ... per domain"]
    try:
        data = parse_yaml(_read(path), path)
    except DelrecError as exc:
        return {}, [str(exc)]
    if not isinstance(data, dict) or DEFAULT_DOMAIN not in data:
        return {}, [f"{path}: expected a mapping of domain: {{key: wording}} with a '{DEFAULT_DOMAIN}' domain"]
    domains: dict[str, dict[str, str]] = {}
    reference = data[DEFAULT_DOMAIN]
    keys = sorted(map(str, reference)) if isinstance(reference, dict) else []
    for domain, wording in data.items():
        name = excerpt(str(domain))
        if not isinstance(wording, dict):
            problems.append(f"{path}: domain {name} must map keys to wording, got {excerpt(wording)}")
            continue
        for key, value in wording.items():
            if not isinstance(key, str) or not _IDENTIFIER.match(key):
                problems.append(f"{path}: domain {name} key {excerpt(key)} is not a valid variable name")
            elif key in VARIABLES:
                problems.append(f"{path}: domain {name} key '{key}' clashes with the variable of that name")
            elif not isinstance(value, str) or not value.strip() or value != value.strip():
                problems.append(f"{path}: domain {name} key {excerpt(key)} must be non-empty text without "
                                f"surrounding spaces, got {excerpt(value)}")
        given = set(map(str, wording))
        missing, extra = sorted(set(keys) - given), sorted(given - set(keys))
        if missing or extra:
            problems.append(f"{path}: domain {name} must define the same keys as '{DEFAULT_DOMAIN}' "
                            f"({shorten(', '.join(keys))}); missing {excerpt(missing) if missing else 'none'}, "
                            f"extra {excerpt(extra) if extra else 'none'}")
        domains[str(domain)] = {str(k): v for k, v in wording.items()}
    return domains, problems


def load_domains(folder: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """domain -> {item_noun, item_noun_plural, verb, verb_past, ...} from `domains.yaml`."""
    domains, problems = check_domains(prompts_dir(folder) / DOMAINS_FILE)
    if problems:
        raise DelrecError(problems[0])
    return domains


_CACHE: dict[tuple, tuple[PromptTemplate | None, list[str]]] = {}


def _signature(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def check_template(path: Path, folder: Path) -> tuple[PromptTemplate | None, list[str]]:
    """Template file `path` of `folder` checked with the folder's domain wording (cached): the
    template, or None and every problem found."""
    domains_path = folder / DOMAINS_FILE
    key = (_signature(path), _signature(domains_path))
    if key not in _CACHE:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = _check_file(path, domains_path)
    return _CACHE[key]


def _check_file(path: Path, domains_path: Path) -> tuple[PromptTemplate | None, list[str]]:
    domains, problems = check_domains(domains_path)
    if problems:
        return None, problems
    try:
        source = _read(path)
    except DelrecError as exc:
        return None, [str(exc)]
    return analyse(path, source, domains)


def template_names(folder: str | os.PathLike | None = None) -> list[str]:
    """Names (file stems) of the `*.jinja` files in the folder, sorted."""
    return sorted(p.name[: -len(TEMPLATE_SUFFIX)] for p in prompts_dir(folder).glob(f"*{TEMPLATE_SUFFIX}"))


def is_template_name(name: object) -> bool:
    """Whether `name` names a file of the template folder: no folder part, no `..`, not absolute. A template is
    chosen by name within its folder (another folder: `prompts_dir`), so no name reaches a file elsewhere on disk,
    least of all one recorded in a model folder that anyone may have written."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(sep in name for sep in "/\\\0")


def get_template(name: str, folder: str | os.PathLike | None = None) -> PromptTemplate:
    """The checked template `name` (`lsr` or `lsr.jinja`); problems raise a one-line DelrecError."""
    if not is_template_name(name):
        raise DelrecError(f"template {name!r} is not a template name but a path; name a template of the prompts "
                          "folder (lsr, plain, ...), and pass another folder with --prompts_dir")
    path_folder = prompts_dir(folder)
    stem = name[: -len(TEMPLATE_SUFFIX)] if name.endswith(TEMPLATE_SUFFIX) else name
    path = path_folder / f"{stem}{TEMPLATE_SUFFIX}"
    if not path.is_file():
        available = ", ".join(template_names(path_folder)) or "none"
        raise DelrecError(f"no template '{stem}' in {path_folder} (available: {available})")
    template, problems = check_template(path, path_folder)
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
    """Render template `name` (e.g. "lsr") with `variables`; see `PromptTemplate.render`.
    Each call checks the files' modification times: when building datasets, call `get_template` once."""
    return get_template(name, folder).render(variables, domain, with_completion=with_completion, strict=strict)
