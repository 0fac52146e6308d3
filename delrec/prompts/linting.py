"""`delrec prompts lint`: every problem of a template folder at once, and how long its prompts get.

`get_template` stops at a template's first problem; a prompt engineer editing several files wants
the whole list, plus the token count of the longest instance a dataset can produce, before
training finds it out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from delrec.config import SOFT_PROMPT_TOKENS
from delrec.errors import DelrecError
from delrec.prompts.contract import (
    DEFAULT_DOMAIN,
    DEFAULT_SOFT_TOKENS,
    DEFAULT_SR_TOP,
    DOMAINS_FILE,
    TASKS,
    TEMPLATE_SUFFIX,
)
from delrec.prompts.rendering import TokenCount, count_tokens, soft_prompt_placeholder
from delrec.prompts.template import check_domains, check_template, prompts_dir, template_names
from delrec.prompts.variables import sample_variables, worst_case_variables


@dataclass
class TemplateReport:
    name: str
    problems: list[str] = field(default_factory=list)
    tokens: TokenCount | None = None
    instance: str | None = None  # what was measured, for the report


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
    `dataset`: a PreparedDataset or a folder; `tokenizer`: a loaded tokenizer object, or None to count words.
    `soft_tokens` is checked before anything is built: its placeholder text grows with it."""
    if soft_tokens not in SOFT_PROMPT_TOKENS:
        raise DelrecError(f"soft prompt size must be {SOFT_PROMPT_TOKENS} tokens, got {soft_tokens}")
    path = prompts_dir(folder)
    if dataset is not None and not hasattr(dataset, "instances"):
        from delrec.data.dataset import PreparedDataset

        dataset = PreparedDataset.load(dataset)
    domains, domain_problems = check_domains(path / DOMAINS_FILE)
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
        template, problems = check_template(path / f"{name}{TEMPLATE_SUFFIX}", path)
        if template is None:
            report.problems.extend(problems)
            continue
        try:
            for dom in template.domains:
                template.render(sample_variables(template, soft), dom)
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


def lint(*args: Any, **kwargs: Any) -> list[str]:
    """Every problem `lint_report` finds (it takes the same arguments), one line each; empty when all is well."""
    return [problem for report in lint_report(*args, **kwargs) for problem in report.problems]
