"""`delrec rank`.

`delrec rank` options come from `RankArguments` + `ReadoutConfig` + the chosen backend's
`Options` (so `--backend` is read first, from the flags or the --config YAML, as `delrec sr
train` reads `--model`): every option is a flag and a YAML key. Under `accelerate launch -m delrec rank ...`
the main process, which merges the shards, prints the summary; the others one line each.
"""

from __future__ import annotations

import json

from delrec.config import parse_command, preparsed_option
from delrec.llm.loading import progress_bars

DEFAULT_BACKEND = "hf"


def rank(argv, prog: str, description: str) -> int:
    from delrec.ranking.base import ReadoutConfig, backend_module
    from delrec.ranking.runner import RankArguments, rank as run

    argv = list(argv)
    module = backend_module(preparsed_option(argv, "backend", DEFAULT_BACKEND))
    args, readout, options = parse_command([RankArguments, ReadoutConfig, module.Options], argv, prog, description)
    with progress_bars(args.progress):
        metrics = run(args, readout, options)
    if metrics is None:  # a process of a launch other than the main one, which merges the shards
        print(f"ranked this process's share into {args.out}/shards; the main process writes the rankings")
        return 0
    print(
        f"ranked {metrics['instances']} {args.split} instances in {metrics['seconds']:.1f} s "
        f"({metrics['instances_per_second']} instances/s, {args.backend}, {readout.readout})"
    )
    keys = ("instances", "title_collisions", "truncated_prompts", "empty_generations", "ambiguous_generations")
    summary = {"out": args.out, args.split: metrics[args.split], **{k: metrics[k] for k in keys if k in metrics}}
    print(json.dumps(summary, indent=2))
    return 0
