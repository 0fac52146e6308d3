"""`delrec prompts list | render | lint | copy`: the prompt engineer's view of the template folder (the shipped
delrec/prompts/templates/, or --prompts_dir / $DELREC_PROMPTS_DIR)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from delrec.config import SOFT_PROMPT_TOKENS, at_least, parse_command
from delrec.errors import DelrecError, where
from delrec.prompts.options import PromptsFolder

PREDICTION_KEYS = ("items", "ranked", "ranking", "topk", "predictions")


@dataclass
class CopyArguments:
    out: str = field(metadata={"help": "A new folder to copy the shipped templates into (also accepted as the "
                               "first positional argument); edit them there and pass --prompts_dir OUT or set "
                               "DELREC_PROMPTS_DIR=OUT."})


@dataclass
class RenderArguments:
    template: str = field(metadata={"help": "Template name, e.g. lsr (also accepted as the first positional argument)."})
    data: str = field(metadata={"help": "A prepared dataset folder (from `delrec data prepare`)."})
    split: str = field(default="test", metadata={"help": "Split to take the instance from: train, valid or test."})
    index: int = field(default=0, metadata={"help": "Instance index within the split.", "range": at_least(0)})
    longest: bool = field(
        default=False, metadata={"help": "Render the length check's worst case (longest history, longest titles) "
                                 "instead of --index."}
    )
    domain: str = field(default="item", metadata={"help": "Domain wording from domains.yaml (item, movie, game, ...)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Local tokenizer folder to count tokens with."})
    soft_tokens: int = field(
        default=100, metadata={"help": "Number of soft-prompt tokens P at the slot.", "range": SOFT_PROMPT_TOKENS}
    )
    sr_model: str = field(default="SASRec", metadata={"help": "SR model name shown in the prompt."})
    sr_top: int = field(
        default=3, metadata={"help": "RPS: h, the SR model's top-h shown (the top-1 is the answer, ranks 2..h the "
                             "predictions).", "range": at_least(1)}
    )
    predictions: str | None = field(
        default=None, metadata={"help": "JSONL of ranked SR predictions per instance ({\"id\": n, \"items\": [ids]}); "
                                "without it the training split's popularity order stands in."}
    )
    show_soft_tokens: bool = field(
        default=False, metadata={"help": "Print every soft placeholder token instead of an abbreviation."}
    )


@dataclass
class LintArguments:
    data: str | None = field(default=None, metadata={"help": "Prepared dataset: also measure its longest instance."})
    tokenizer: str | None = field(default=None, metadata={"help": "Local tokenizer folder to count tokens with."})
    max_length: int | None = field(
        default=None, metadata={"help": "Fail templates longer than this many tokens.", "range": at_least(1)}
    )
    soft_tokens: int = field(
        default=100, metadata={"help": "Number of soft-prompt tokens P at the slot.", "range": SOFT_PROMPT_TOKENS}
    )
    domain: str = field(default="item", metadata={"help": "Domain wording used for the length check."})
    sr_top: int = field(
        default=3, metadata={"help": "RPS: h, the SR model's top-h shown (the top-1 is the answer, ranks 2..h the "
                             "predictions).", "range": at_least(1)}
    )


def copy(argv, prog: str, description: str) -> int:
    """Copy the shipped templates to a folder of the user's: the place to edit them in an installed package."""
    import shutil

    from delrec.io import is_occupied, replace_directory, staged_directory
    from delrec.prompts import shipped_prompts_dir

    if argv and not argv[0].startswith("-"):
        argv = ["--out", argv[0], *argv[1:]]
    (args,) = parse_command([CopyArguments], argv, prog, description)
    out = Path(args.out)
    if is_occupied(out):
        raise DelrecError(f"{out} already exists and is not empty; copy the templates into a new folder")
    with staged_directory(out) as staged:  # all files or none: a full disk leaves no half copy behind
        shutil.copytree(shipped_prompts_dir(), staged, dirs_exist_ok=True)
        replace_directory(staged, out)
    print(f"copied the templates to {out}; use them with --prompts_dir {out} or DELREC_PROMPTS_DIR={out}")
    return 0


def list_templates(argv, prog: str, description: str) -> int:
    (folder,) = parse_command([PromptsFolder], argv, prog, description)
    from delrec import prompts

    templates = prompts.list_templates(folder.prompts_dir)
    domains = prompts.load_domains(folder.prompts_dir)
    print(f"templates in {prompts.prompts_dir(folder.prompts_dir)}:")
    for template in templates:
        slot = "one soft-prompt slot" if template.requires_soft_prompt else "no soft prompt"
        print(f"{template.file}  (task {template.task}; {slot})")
        print(f"    {template.description}")
        print(f"    variables: {', '.join(template.variables)}")
    print(f"domains: {', '.join(domains)}")
    return 0


def _positional_template(argv) -> list[str]:
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return ["--template", argv[0], *argv[1:]]
    return argv


def _load_predictions(path: str, dataset, split: str) -> dict[int, list[int]]:
    """Ranked items per instance id: a `delrec sr predict` file (with its .meta.json) is checked against the
    dataset and split it was written for; a hand-written JSONL is taken as it is."""
    from delrec.io import read_jsonl
    from delrec.predictions import meta_path, read_predictions

    if meta_path(path).is_file():
        return dict(enumerate(read_predictions(path, dataset, split).items))
    result: dict[int, list[int]] = {}
    for line_no, row in read_jsonl(Path(path)):
        if row.get("split", split) != split:
            continue
        key = next((k for k in PREDICTION_KEYS if k in row), None)
        if not isinstance(row.get("id"), int) or key is None:
            raise DelrecError(f"{where(path, line_no)}: expected {{\"id\": instance id, \"items\": [ranked item ids]}} "
                              f"(the list may also be named {', '.join(PREDICTION_KEYS[1:])})")
        items = row[key]
        if not isinstance(items, list) or not all(isinstance(i, int) for i in items):
            raise DelrecError(f"{where(path, line_no, key)}: expected a list of item ids")
        result[row["id"]] = items
    return result


def _load_tokenizer(folder: str | None):
    """The tokenizer to count tokens with, or None. Token counts are a local check: a folder that is not
    there is refused here rather than looked up on the Hugging Face Hub as a model id."""
    if folder is None:
        return None
    if not Path(folder).is_dir():
        raise DelrecError(f"{folder}: tokenizer folder not found; pass a local folder holding tokenizer files")
    from delrec.llm.loading import load_tokenizer

    return load_tokenizer(folder)


def render(argv, prog: str, description: str) -> int:
    args, folder = parse_command([RenderArguments, PromptsFolder], _positional_template(argv), prog, description)
    from delrec import prompts
    from delrec.data.dataset import PreparedDataset

    template = prompts.get_template(args.template, folder.prompts_dir)
    dataset = PreparedDataset.load(args.data)
    soft = prompts.soft_prompt_placeholder(args.soft_tokens) if template.requires_soft_prompt else None
    if args.longest:
        values, what = prompts.worst_case_variables(
            template, dataset, soft_prompt=soft, sr_model=args.sr_model, sr_top=args.sr_top
        )
        notes = []
    else:
        ranked = None
        if args.predictions:
            table = _load_predictions(args.predictions, dataset, args.split)
            instance_id = args.index  # instance ids are their positions in the split
            if instance_id not in table:
                raise DelrecError(f"{args.predictions}: no predictions for {args.split} instance {instance_id}")
            ranked = table[instance_id]
            if any(not 0 <= i < dataset.num_items for i in ranked):
                raise DelrecError(f"{args.predictions}: instance {instance_id} has item ids outside 0..{dataset.num_items - 1}")
        values, notes = prompts.preview_variables(
            template, dataset, args.split, args.index, soft_prompt=soft, sr_model=args.sr_model,
            predictions=ranked, sr_top=args.sr_top,
        )
        what = f"{args.split} instance {args.index}"
    rendered = template.render(values, args.domain)
    count = prompts.count_tokens(rendered, _load_tokenizer(args.tokenizer), args.soft_tokens if soft else None)

    shown = rendered.prompt
    if rendered.soft_span and not args.show_soft_tokens and args.soft_tokens > 2:
        start, end = rendered.soft_span
        first, last = prompts.SOFT_TOKEN_FORMAT.format(0), prompts.SOFT_TOKEN_FORMAT.format(args.soft_tokens - 1)
        shown = f"{shown[:start]}{first}...{last}{shown[end:]}"
    print(f"# template {template.file} (task {template.task}, fingerprint {template.fingerprint}), "
          f"domain {args.domain}, {dataset.path} {what}")
    if soft:
        abbreviated = "" if args.show_soft_tokens else "; abbreviated below, --show-soft-tokens prints all"
        print(f"# soft prompt: {args.soft_tokens} placeholder tokens {prompts.SOFT_TOKEN_FORMAT.format('i')}{abbreviated}")
    for note in notes:
        print(f"# {note}")
    print("----- prompt -----")
    sys.stdout.write(shown)
    print("----- completion -----")
    print(rendered.completion)
    print("----- tokens -----")
    print(f"prompt {count.prompt} + completion {count.completion} + end marker 1 = {count.total} ({count.method})")
    return 0


def lint(argv, prog: str, description: str) -> int:
    args, folder = parse_command([LintArguments, PromptsFolder], argv, prog, description)
    from delrec import prompts

    reports = prompts.lint_report(
        folder.prompts_dir, args.data, _load_tokenizer(args.tokenizer), args.max_length,
        soft_tokens=args.soft_tokens, domain=args.domain, sr_top=args.sr_top,
    )
    problems = []
    for report in reports:
        found = [problem if report.name in problem else f"{report.name}: {problem}" for problem in report.problems]
        if found:
            print("\n".join(found))
            problems.extend(found)
            continue
        line = f"{report.name}: ok"
        if report.tokens is not None:
            limit = f" <= {args.max_length}" if args.max_length else ""
            line += (f" ({report.tokens.total} tokens{limit} on the {report.instance}; {report.tokens.method})")
        print(line)
    if problems:
        print(f"{prog}: problems found ({len(problems)}, listed above); the first: {problems[0]}", file=sys.stderr)
        return 2
    return 0
