"""The prompt options commands share, declared once and inherited by each command's arguments.

The groups are keyword-only dataclasses, so a command's own required fields can follow them, and `--help` lists
them after the command's own options (`delrec.config.add_dataclass_arguments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from delrec.prompts.contract import ENV_VAR


@dataclass(kw_only=True)
class PromptsFolder:
    """Where the templates are: what every command that renders a prompt reads."""

    prompts_dir: str | None = field(
        default=None,
        metadata={"help": f"Template folder (default: ${ENV_VAR}, else the shipped delrec/prompts/templates/)."},
    )


@dataclass(kw_only=True)
class TemplateChoice(PromptsFolder):
    """For commands that prompt a trained LLM folder: by default they use what its delrec.json records it was trained
    with, so ranking and teacher exports read the model as training did."""

    template: str | None = field(
        default=None,
        metadata={"help": "Prompt template, NAME.jinja of the template folder (default: the model's delrec.json, else "
                  "plain; a teacher export in grounding mode: teacher)."},
    )
    domain: str | None = field(
        default=None,
        metadata={"help": "Wording of domains.yaml in the template folder: item, movie, game, artist, ... (default: the "
                  "model's delrec.json, else item)."},
    )
