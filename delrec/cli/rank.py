"""`delrec rank` and `delrec export`.

`delrec rank` options come from `RankArguments` + `ReadoutConfig` + the chosen backend's
`Options` (so `--backend` is read first, from the flags or the --config YAML, as `delrec sr
train` reads `--model`): every option is a flag and a YAML key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from delrec.config import parse_command, preparsed_option
from delrec.llm.loading import TRUST_REMOTE_CODE_HELP, progress_bars

DEFAULT_BACKEND = "hf"


def rank(argv, prog: str, description: str) -> int:
    from delrec.ranking.base import ReadoutConfig, backend_module
    from delrec.ranking.runner import RankArguments, rank as run

    argv = list(argv)
    module = backend_module(preparsed_option(argv, "backend", DEFAULT_BACKEND))
    args, readout, options = parse_command([RankArguments, ReadoutConfig, module.Options], argv, prog, description)
    with progress_bars(args.progress):
        metrics = run(args, readout, options)
    print(
        f"ranked {metrics['instances']} {args.split} instances in {metrics['seconds']:.1f} s "
        f"({metrics['instances_per_second']} instances/s, {args.backend}, {readout.readout})"
    )
    keys = ("instances", "title_collisions", "truncated_prompts", "empty_generations", "ambiguous_generations")
    summary = {"out": args.out, args.split: metrics[args.split], **{k: metrics[k] for k in keys if k in metrics}}
    print(json.dumps(summary, indent=2))
    return 0


@dataclass
class ExportArguments:
    model: str = field(
        metadata={"help": "A DELRec stage-2 folder (LoRA adapter, tokenizer, delrec.json and the soft prompt)."}
    )
    out: str = field(metadata={"help": "Folder to write the merged, plain Hugging Face model into."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Dtype of the saved weights; auto: the base checkpoint's. Merging runs in float32."},
    )
    device: Literal["cpu", "cuda", "auto"] = field(default="cpu", metadata={"help": "Where to merge."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --out folder."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "The base model's new path, when it moved from the path recorded in the stage-2 folder's "
                  "delrec.json; accepted only if its files are the same (content fingerprint)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})


def export(argv, prog: str, description: str) -> int:
    (args,) = parse_command([ExportArguments], argv, prog, description)
    from delrec.llm.export import export_model

    info = export_model(args.model, args.out, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                        base_model=args.base_model, trust_remote_code=args.trust_remote_code)
    keys = ("template", "domain", "sr_model", "dtype", "max_abs_logit_diff")
    soft = info["soft_prompt"]
    print(json.dumps({"out": args.out, **{k: info[k] for k in keys},
                      "soft_prompt": f"{soft['name']} ({soft['num_tokens']} tokens)" if soft else None}, indent=2))
    return 0
