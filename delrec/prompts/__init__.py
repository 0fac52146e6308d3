"""Prompt templates: loading, checking and rendering the files in `delrec/prompts/templates/`.

Prompt engineers edit `delrec/prompts/templates/*.jinja` and its `domains.yaml`, never code; see
`delrec/prompts/templates/README.md` for the file format. In short, a template is Jinja2 (strict undefined) with

    {# delrec
    task: lsr                         # which contract it follows (default: the file name)
    description: one line
    requires_soft_prompt: true        # exactly one {{ soft_prompt }} slot (false: none)
    variables: [history, candidates, sr_model, soft_prompt, item_noun, target]
    #}
    {% block prompt %} ...the text the model reads... {% endblock %}
    {% block completion %}{{ target }}{% endblock %}

Variables come from two places: the caller (`VARIABLES`; each task provides a fixed subset,
`TASKS`) and the domain wording in `domains.yaml` (`item_noun`, `item_noun_plural`, `verb`,
`verb_past`, filled in from the `domain` argument). A caller may pass a known variable that a
template does not use (so a prompt engineer can drop a variable without code changes); a name
that is not a known variable is an error (a typo), as is a variable the template needs but did
not get.

Use `get_template(name)` once and `template.render(...)` per instance when building datasets:
`render(name, ...)` re-checks the files' modification times on every call.

The modules, bottom up: `contract` (names and variables shared with the files), `sandbox` (the
Jinja environment: bounded work, text-only output), `rendering` (a checked template, its output,
token counts), `checks` (checking one template's text),
`template` (the folder, domains.yaml, `get_template`), `variables` (variables from a dataset),
`linting` (`delrec prompts lint`). Token counts take a tokenizer the caller loaded: loading one
belongs to the LLM layer, which sits above this package.
"""

from delrec.prompts.contract import (  # noqa: I001 - grouped by module, as listed in __all__
    BLOCKS, DEFAULT_DOMAIN, DEFAULT_SOFT_TOKENS, DEFAULT_SR_TOP, DOMAINS_FILE, ENV_VAR, HEADER_KEYS, LIST_VARIABLES,
    SOFT_SLOT, SOFT_TOKEN_FORMAT, TARGET, TASKS, TEMPLATE_SUFFIX, VARIABLES, Task,
)
from delrec.prompts.linting import TemplateReport, lint, lint_report
from delrec.prompts.rendering import (
    PromptTemplate, RenderedPrompt, TokenCount, count_tokens, numbered, soft_prompt_placeholder,
)
from delrec.prompts.template import (get_template, list_templates, load_domains, prompts_dir, render,
                                     shipped_prompts_dir, template_names)
from delrec.prompts.variables import (
    popularity_order, preview_variables, task_variables, template_corpus, worst_case_variables,
)

__all__ = [
    "BLOCKS", "DEFAULT_DOMAIN", "DEFAULT_SOFT_TOKENS", "DEFAULT_SR_TOP", "DOMAINS_FILE", "ENV_VAR", "HEADER_KEYS",
    "LIST_VARIABLES", "SOFT_SLOT", "SOFT_TOKEN_FORMAT", "TARGET", "TASKS", "TEMPLATE_SUFFIX", "VARIABLES", "Task",
    "TemplateReport", "lint", "lint_report",
    "PromptTemplate", "RenderedPrompt", "TokenCount", "count_tokens", "numbered", "soft_prompt_placeholder",
    "get_template", "list_templates", "load_domains", "prompts_dir", "render", "shipped_prompts_dir", "template_names",
    "popularity_order", "preview_variables", "task_variables", "template_corpus", "worst_case_variables",
]
