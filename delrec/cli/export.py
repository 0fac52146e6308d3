"""`delrec export`: merge a DELRec stage-2 folder into a plain Hugging Face model folder (for vLLM and any
OpenAI-compatible server)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from delrec.config import Device, device_option, parse_command
from delrec.llm.loading import TRUST_REMOTE_CODE_HELP


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
    device: Device = device_option("cpu", what="Where to merge")
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --out folder."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "The base model's new path, when it moved from the path recorded in the stage-2 folder's "
                  "delrec.json; accepted only if its files are the same (content fingerprint)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})


def export(argv, prog: str, description: str) -> int:
    (args,) = parse_command([ExportArguments], argv, prog, description)
    from delrec.llm.merge import export_model

    info = export_model(args.model, args.out, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                        base_model=args.base_model, trust_remote_code=args.trust_remote_code)
    keys = ("template", "domain", "sr_model", "dtype", "max_abs_logit_diff")
    soft = info["soft_prompt"]
    print(json.dumps({"out": args.out, **{k: info[k] for k in keys},
                      "soft_prompt": f"{soft['name']} ({soft['num_tokens']} tokens)" if soft else None}, indent=2))
    return 0
