"""`delrec teacher export`: a model folder + a prepared dataset -> a teacher folder.

Options come from `delrec.distill.teacher_export.TeacherExportConfig` + the chosen LLM backend's
`Options` (device, dtype, batch size; `--backend` is read first, as `delrec rank` does), so
every option is a flag and a YAML key. An SR model runs on the same `--device`. Under `accelerate launch -m delrec
teacher export ...` the main process, which merges the shards, prints the summary; the others one line each.
"""

from __future__ import annotations

import json

from delrec.config import parse_command, preparsed_option
from delrec.llm.loading import progress_bars


def export_classes(argv) -> list[type]:
    """The config dataclasses of `delrec teacher export ARGV`: the backend's options depend on `--backend`."""
    from delrec.cli.rank import DEFAULT_BACKEND
    from delrec.distill.teacher_export import TeacherExportConfig
    from delrec.ranking.base import backend_module

    return [TeacherExportConfig, backend_module(preparsed_option(argv, "backend", DEFAULT_BACKEND)).Options]


def export(argv, prog: str, description: str) -> int:
    from delrec.distill.teacher_export import export_teacher
    from delrec.distill.teacher_folder import INFO_FILE
    from delrec.io import read_json

    argv = list(argv)
    config, options = parse_command(export_classes(argv), argv, prog, description)
    with progress_bars(config.progress):
        out = export_teacher(config, options)
    if out is None:  # a process of a launch other than the main one, which merges the shards
        print(f"wrote this process's share into {config.out}/shards; the main process writes the teacher folder")
        return 0
    info = read_json(out / INFO_FILE)
    source = info["source"]
    keys = ("num_instances", "num_train_instances", "num_items", "topk", "score_kind", "embedding_dim", "seconds", "instances_per_second")
    print(json.dumps({"out": str(out), "kind": source["kind"], **{k: info[k] for k in keys},
                      "user_state_dim": info.get("user_state_dim"), "trajectory": info.get("trajectory"),
                      "target_in_topk": source.get("target_in_topk"), "embedding_knn": source.get("embedding_knn")},
                     indent=2))
    return 0
