"""`delrec llm build-tiny`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from delrec.config import parse_command
from delrec.llm.tiny import TinyLLMConfig


@dataclass
class BuildTinyArguments:
    data: str = field(metadata={"help": "A prepared dataset folder (from `delrec data prepare`)."})
    out: str = field(metadata={"help": "Folder to write the model and tokenizer into (a plain Hugging Face folder)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --out folder."})


def build_tiny(argv, prog: str, description: str) -> int:
    args, config = parse_command([BuildTinyArguments, TinyLLMConfig], argv, prog, description)
    from delrec.llm.tiny import build_tiny_llm

    info = build_tiny_llm(args.data, args.out, config, overwrite=args.overwrite)
    summary = {key: info[key] for key in ("arch", "size", "parameters", "vocab_size", "seconds") if key in info}
    summary.update({key: info[key] for key in ("first_loss", "final_loss") if key in info})
    print(json.dumps({"out": args.out, **summary}, indent=2))
    return 0
