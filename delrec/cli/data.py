"""`delrec data prepare` and `delrec data stats`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from delrec.config import between, memory_for, parse_command
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import MAX_ITEMS, MAX_USERS

ID_RANGE = between(-(2**63), 2**63 - 1)  # ids of rows files are 64-bit integers


@dataclass
class PrepareArguments:
    format: Literal["recbole", "rows", "movielens", "csv", "synthetic"] = field(
        metadata={"help": "Input format: RecBole atomic files, LLaRA/DLLM2Rec rows, raw MovieLens (ml-100k/ml-1m), "
                  "generic CSV, or the built-in synthetic dataset (needs no --input)."}
    )
    out: str = field(metadata={"help": "Folder to write the prepared dataset into."})
    input: str | None = field(default=None, metadata={"help": "Folder (or one file inside it) holding the raw data."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an --out folder that holds a different dataset."})
    pad_id: int | None = field(
        default=None, metadata={"help": "rows: the padding id in `seq` (detected if omitted).", "range": ID_RANGE}
    )
    title_columns: str | None = field(
        default=None, metadata={"help": "rows: column order of a tab-separated title file, 'id,title' or 'title,id' "
                                "(detected if omitted)."}
    )
    move_article: bool = field(
        default=True, metadata={"help": "movielens: write 'Matrix, The (1999)' as 'The Matrix (1999)'."}
    )
    synthetic_users: int = field(
        default=600, metadata={"help": "synthetic: number of users.", "range": between(1, MAX_USERS)}
    )
    synthetic_items: int = field(
        default=200, metadata={"help": "synthetic: number of items.", "range": between(2, MAX_ITEMS)}
    )


def load_input(args: PrepareArguments, seed: int):
    from delrec.errors import DelrecError

    if args.format == "synthetic":
        from delrec.data.synthetic import make_synthetic

        if args.input is not None:
            raise DelrecError(f"--input {args.input} is given with --format synthetic, which reads no files; drop "
                              "--input, or give the format of the files (recbole, rows, movielens or csv)")

        sizes = f"--synthetic_users {args.synthetic_users} --synthetic_items {args.synthetic_items}"
        try:
            with memory_for(f"the synthetic dataset of {sizes}", "lower --synthetic_users"):
                return make_synthetic(num_users=args.synthetic_users, num_items=args.synthetic_items, seed=seed)
        except ValueError as exc:
            raise DelrecError(f"--format synthetic with {sizes}: {exc}") from None
    if args.input is None:
        raise DelrecError(f"--input is required for --format {args.format}")
    from delrec.data.loaders import load_raw

    return load_raw(
        args.format, args.input, pad_id=args.pad_id, title_columns=args.title_columns, move_article=args.move_article
    )


def prepare(argv, prog: str, description: str) -> int:
    args, config = parse_command([PrepareArguments, PreprocessConfig], argv, prog, description)
    from delrec.data.prepare import prepare_dataset
    from delrec.io import check_apart_from_inputs

    check_apart_from_inputs(args.out, {"raw data": args.input}, "the prepared dataset")
    raw = load_input(args, config.seed)
    dataset = prepare_dataset(raw, config, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(dataset.path), **dataset.stats()}, indent=2))
    return 0


@dataclass
class StatsArguments:
    data: str = field(metadata={"help": "A prepared dataset folder (from `delrec data prepare`)."})


def stats(argv, prog: str, description: str) -> int:
    (args,) = parse_command([StatsArguments], _positional_to_flag(argv, "--data"), prog, description)
    from delrec.data.dataset import PreparedDataset

    print(json.dumps(PreparedDataset.load(args.data).stats(), indent=2))
    return 0


def _positional_to_flag(argv, flag: str) -> list[str]:
    """Accept `delrec data stats DIR` as well as `--data DIR`."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return [flag, argv[0], *argv[1:]]
    return argv
