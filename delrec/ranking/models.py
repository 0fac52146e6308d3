"""Which kind of model folder is being ranked with, and how to prompt it.

Three kinds, told apart from the files alone (no weights are read, so a backend can refuse a
folder before it loads anything):
- `stage2`: a DELRec stage-2 folder (`delrec.llm.stage_folder`: LoRA adapter, tokenizer, delrec.json and,
  unless it is the plain-template ablation, the soft prompt), loaded with `load_delrec_model`;
- `export`: the plain folder `delrec export` writes from one (delrec.json of kind delrec-export);
- `plain`: any other Hugging Face causal LM (folder or hub id), prompted with a template that
  needs no soft prompt (default `plain`).
Template, domain and SR model name come from the folder's delrec.json, so ranking renders the
prompt the model was trained on; `--template` / `--domain` override them (ablations, plain models).
A stage-2 folder trained with item tokens (`item_tokens` in delrec.json) is prompted with them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from delrec.errors import DelrecError
from delrec.llm.merge import (is_export, prompt_settings, read_export, read_stage2, soft_prompt_text,
                               user_prompt_record)
from delrec.llm.stage_folder import INFO_FILE
from delrec.llm.loading import describe_non_model_folder
from delrec.prompts import DEFAULT_DOMAIN, PromptTemplate, get_template

RANKING_TASKS = ("lsr", "plain", "sr_hint", "teacher")  # templates whose prompt is a history (+ candidates) to answer
PLAIN_TEMPLATE = "plain"
DEFAULT_SR_MODEL = "SASRec"
SOFT_TOKEN = re.compile(r"<\|sp:[^|]*\|>")  # one placeholder token (delrec.llm.soft_prompt.soft_token)


@dataclass(frozen=True)
class ModelSpec:
    """A model to rank with: where it is, what kind it is, and the prompt settings it was trained with."""

    path: str
    kind: Literal["stage2", "export", "plain"]
    template: str
    domain: str
    sr_model: str
    soft_prompt: str | None  # the placeholder text of the template's soft-prompt slot; None: no soft prompt
    trained_template_fingerprint: str | None = None  # as recorded at training time, when known
    trained_dataset_fingerprint: str | None = None  # the dataset stage 2 was trained on, when known
    item_tokens: bool = False  # history and candidates shown as "title <|item_k|>" (delrec.llm.hybrid; hf only)
    sr_hint: dict | None = None  # sr_hint template: sr_top and the SR model's item_table_sha256, as trained
    user_prompt: dict | None = None  # a per-user soft prompt: the SR model's item_table_sha256 (hf backend only)


def describe_model(path: str, template: str | None = None, domain: str | None = None) -> ModelSpec:
    """Classify `path` and read its prompt settings; `template`/`domain` override the recorded ones."""
    folder = Path(path)
    if folder.is_dir() and is_export(folder):
        info = read_export(folder)
        settings = {key: info.get(key) for key in ("template", "template_fingerprint", "domain", "sr_model")}
        soft = (info["soft_prompt"] or {}).get("text")
        return _spec(path, "export", settings, soft, template, domain, _dataset_fingerprint(info.get("stage2")))
    if folder.is_dir() and (folder / INFO_FILE).is_file():
        info = read_stage2(folder)
        return _spec(path, "stage2", prompt_settings(info), soft_prompt_text(info), template, domain,
                     _dataset_fingerprint(info), item_tokens=bool(info.get("item_tokens")),
                     sr_hint=info.get("sr_hint"), user_prompt=user_prompt_record(info))
    if folder.is_dir():
        problem = describe_non_model_folder(folder)
        if problem:
            raise DelrecError(f"{folder} is {problem}")
    return ModelSpec(path, "plain", template or PLAIN_TEMPLATE, domain or DEFAULT_DOMAIN, DEFAULT_SR_MODEL, None)


def _dataset_fingerprint(info: dict | None) -> str | None:
    return ((info or {}).get("dataset") or {}).get("fingerprint")


def _spec(
    path: str, kind: str, settings: dict, soft: str | None, template: str | None, domain: str | None,
    dataset_fingerprint: str | None, item_tokens: bool = False, sr_hint: dict | None = None,
    user_prompt: dict | None = None,
) -> ModelSpec:
    trained_template = template in (None, settings["template"])
    return ModelSpec(
        path=path,
        kind=kind,
        template=template or settings["template"] or ("lsr" if soft else PLAIN_TEMPLATE),
        domain=domain or settings["domain"] or DEFAULT_DOMAIN,
        sr_model=settings["sr_model"] or DEFAULT_SR_MODEL,
        soft_prompt=soft,
        # the recorded fingerprint says nothing about a template chosen instead of the trained one
        trained_template_fingerprint=settings["template_fingerprint"] if trained_template else None,
        trained_dataset_fingerprint=dataset_fingerprint,
        item_tokens=item_tokens,
        sr_hint=sr_hint,
        user_prompt=user_prompt,
    )


def check_trained_dataset(spec: ModelSpec, dataset, allow_other_dataset: bool) -> None:
    """Refuse a dataset other than the one the stage-2 model was fine-tuned on (unknown for a plain model)."""
    trained_on = spec.trained_dataset_fingerprint
    if trained_on not in (None, dataset.fingerprint) and not allow_other_dataset:
        raise DelrecError(f"{spec.path} was fine-tuned on dataset {trained_on}, not on {dataset.path} (fingerprint "
                          f"{dataset.fingerprint}); use the dataset it was trained on, or pass --allow_other_dataset")


def ranking_template(spec: ModelSpec, prompts_dir: str | None = None) -> PromptTemplate:
    """The checked template to render; refuses templates that cannot rank or a soft slot without a soft prompt."""
    template = get_template(spec.template, prompts_dir)
    if template.task not in RANKING_TASKS:
        raise DelrecError(
            f"template '{template.name}' is for task '{template.task}'; ranking renders an "
            f"{', '.join(RANKING_TASKS)} template (e.g. --template lsr or plain)"
        )
    if template.requires_soft_prompt and spec.soft_prompt is None:
        raise DelrecError(
            f"template '{template.name}' needs a soft prompt, but {spec.path} has none; "
            "pass a DELRec stage-2 or exported folder trained with one, or --template plain"
        )
    if spec.trained_template_fingerprint and spec.trained_template_fingerprint != template.fingerprint:
        warnings.warn(
            f"template '{template.name}' (or domains.yaml) changed since the model was trained "
            f"(fingerprint {template.fingerprint}, trained with {spec.trained_template_fingerprint}); "
            "prompts may differ from the training prompts",
            stacklevel=2,
        )
    return template


def check_soft_tokens(spec: ModelSpec, tokenizer) -> None:
    """Refuse a tokenizer without the soft-prompt tokens: it would read the placeholders as ordinary text."""
    if spec.soft_prompt is None:
        return
    tokens = SOFT_TOKEN.findall(spec.soft_prompt)
    missing = [t for t in tokens if t not in tokenizer.added_tokens_encoder]
    if missing:
        raise DelrecError(
            f"{spec.path}: the tokenizer lacks {len(missing)} of the {len(tokens)} soft-prompt tokens (e.g. "
            f"{missing[0]}); its tokenizer files are not the ones the model was trained with"
        )
