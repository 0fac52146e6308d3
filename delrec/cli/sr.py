"""`delrec sr train`, `delrec sr evaluate`, `delrec sr predict` and `delrec sr compile`.

Options come from config dataclasses: `TrainArguments` + `delrec.sr.TrainConfig` + the chosen
model's config (`SASRecConfig`, ...), so every model hyper-parameter is a flag and a YAML key
(`--config configs/sr/sasrec.yaml`). `--model` (or `model:` in the YAML) picks the model class
before the rest is parsed, so a key that the chosen model does not have is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from delrec.config import Device, at_least, device_option, load_yaml, parse_command, preparsed_option

DEFAULT_MODEL_FOR_HELP = "sasrec"


@dataclass
class TrainArguments:
    data: str = field(metadata={"help": "A prepared dataset folder (from `delrec data prepare`)."})
    model: str = field(metadata={"help": "Model to train: sasrec, gru4rec, caser or pop."})
    out: str = field(
        metadata={"help": "Output folder: the best model, metrics.json, log.jsonl and checkpoint/ (re-run to resume)."}
    )


def check_config_keys_fit_model(argv: list[str], cls) -> None:
    """A YAML key of another model's config gets a precise error (not a 'did you mean')."""
    from delrec.errors import DelrecError
    from delrec.sr import MODELS
    from delrec.sr.trainer import TrainConfig

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    own = {f.name for c in (TrainArguments, TrainConfig, cls.config_class) for f in dataclasses.fields(c)}
    for key in load_yaml(known.config):
        owners = [m for m, other in MODELS.items() if key in {f.name for f in dataclasses.fields(other.config_class)}]
        if key not in own and owners:
            raise DelrecError(
                f"{known.config}: key '{key}' is not an option of model '{cls.model_type}' (it belongs to "
                f"{', '.join(owners)}); remove it or change 'model'"
            )


def train_classes(argv) -> list[type]:
    """The config dataclasses of `delrec sr train ARGV`: the model's own depends on `--model`."""
    from delrec.sr import model_class
    from delrec.sr.trainer import TrainConfig

    name = preparsed_option(argv, "model")
    cls = model_class(name if name is not None else DEFAULT_MODEL_FOR_HELP)
    check_config_keys_fit_model(argv, cls)
    return [TrainArguments, TrainConfig, cls.config_class]


def train(argv, prog: str, description: str) -> int:
    from delrec.device import launch_position
    from delrec.sr import model_class
    from delrec.sr.trainer import train_sr

    argv = list(argv)
    args, config, model_config = parse_command(train_classes(argv), argv, prog, description)
    model_class(args.model)
    result = train_sr(args.data, model_config, config, args.out)
    if launch_position().main:  # under `accelerate launch`, one summary
        print(train_summary(result, args.model))
    return 0


def train_summary(result, model: str, **extra) -> str:
    """What `sr train` and `student train` print: where, which epoch, and the headline metrics."""
    metrics = result.metrics
    return json.dumps({
        "out": str(result.out),
        "model": model,
        **extra,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds_per_epoch": result.seconds_per_epoch,
        "valid": _headline(metrics["valid"]),
        "test": _headline(metrics["test"]),
        "candidates_test": metrics["candidates"]["test"],
    }, indent=2)


def _headline(values: dict) -> dict:
    return {k: round(v, 5) for k, v in values.items() if k in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20")}


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "A trained SR model folder (config.json + model.safetensors)."})
    data: str = field(metadata={"help": "A prepared dataset folder with the same item ids."})
    out: str | None = field(
        default=None,
        metadata={"help": "Folder to write evaluation.json into (default: the model folder, beside the training "
                  "run's own metrics.json, which is never replaced); another model's folder is refused."},
    )
    keep_history: bool = field(
        default=False, metadata={"help": "Full ranking: keep history items rankable instead of excluding them."}
    )
    device: Device = device_option(what="Where to score")
    batch_size: int = field(default=1024, metadata={"help": "Histories scored per batch.", "range": at_least(1)})


def evaluate(argv, prog: str, description: str) -> int:
    from delrec.data.dataset import PreparedDataset
    from delrec.io import check_own_folder, write_json
    from delrec.sr import load_model
    from delrec.device import resolve_device
    from delrec.sr.evaluate import EVALUATION_FILE, evaluate_model

    (args,) = parse_command([EvaluateArguments], argv, prog, description)
    if args.out is not None and Path(args.out).resolve() != Path(args.model).resolve():
        check_own_folder(args.out, (EVALUATION_FILE,))
    device = resolve_device(args.device)
    model = load_model(args.model, device)
    dataset = PreparedDataset.load(args.data)
    metrics = evaluate_model(model, dataset, args.batch_size, exclude_history=not args.keep_history,
                             source=args.model)
    out = Path(args.out or args.model) / EVALUATION_FILE
    write_json(out, {"model": str(args.model), "data": str(args.data), **metrics})
    print(json.dumps({"evaluation": str(out), **metrics}, indent=2))
    return 0


@dataclass
class PredictArguments:
    model: str = field(metadata={"help": "A trained SR model folder (config.json + model.safetensors)."})
    data: str = field(metadata={"help": "A prepared dataset folder with the same item ids."})
    split: Literal["train", "valid", "test"] = field(metadata={"help": "Which split's instances to predict for."})
    out: str = field(metadata={"help": "JSONL file to write (plus FILE.meta.json beside it). An existing file is "
                               "replaced only if it is an earlier delrec predictions file, or with --overwrite."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --out file that delrec did not write."})
    topk: int = field(
        default=20, metadata={"help": "How many ranked items to write per instance: 1 to the catalogue size (checked "
                              "against the model before anything is written)."}
    )
    keep_history: bool = field(
        default=False, metadata={"help": "Allow items of the instance's history in its predictions."}
    )
    prefix_predictions: bool = field(
        default=False,
        metadata={"help": "Also write each row's top-K after the first half of its history (prefix_length, "
                  "prefix_items): DELRec stage 1's Temporal Analysis needs them."},
    )
    user_states: bool = field(
        default=False,
        metadata={"help": "Also write FILE.states.safetensors: the model's representation of each history and its "
                  "item table (their product is its score of any item), for the LLM variants that read the SR "
                  "model's view of a user. Not for pop, which has none."},
    )
    device: Device = device_option(what="Where to score")
    batch_size: int = field(default=1024, metadata={"help": "Histories scored per batch.", "range": at_least(1)})


def predict(argv, prog: str, description: str) -> int:
    from delrec.data.dataset import PreparedDataset
    from delrec.errors import DelrecError
    from delrec.sr import load_model
    from delrec.io import check_output_file
    from delrec.device import resolve_device
    from delrec.predictions import is_predictions_file, meta_path, user_states_path
    from delrec.sr.evaluate import write_predictions

    (args,) = parse_command([PredictArguments], argv, prog, description)
    outputs = [args.out, meta_path(args.out)] + ([user_states_path(args.out)] if args.user_states else [])
    for path in outputs:  # the file and its sidecar (and states): all are replaced
        check_output_file(path, args.overwrite, lambda _: is_predictions_file(args.out),
                          {"dataset": args.data}, "a predictions file", read={"model": args.model})
    device = resolve_device(args.device)
    model = load_model(args.model, device)
    dataset = PreparedDataset.load(args.data)
    if not 1 <= args.topk <= dataset.num_items:
        raise DelrecError(f"--topk {args.topk} must be between 1 and the catalogue size ({dataset.num_items} items)")
    if args.user_states and model.model_type == "pop":
        raise DelrecError(f"--user_states: {args.model} is a popularity model, which keeps no state per user; use an "
                          "SR model such as sasrec, gru4rec or caser")
    meta = write_predictions(
        args.out, model, dataset, args.split, args.topk, not args.keep_history, args.batch_size, model_path=args.model,
        prefix_predictions=args.prefix_predictions, user_states=args.user_states,
    )
    keys = ("split", "topk", "rows", "exclude_history", "prefix_predictions")
    print(json.dumps({"out": args.out, **{k: meta[k] for k in keys}}, indent=2))
    return 0


@dataclass
class CompileArguments:
    model: str = field(metadata={"help": "A trained SR model or student folder; the package goes into its compiled/ "
                                 "subfolder (topK.pt2 + topK.json)."})
    topk: int = field(
        default=20, metadata={"help": "How many items each answer holds: 1 to the catalogue size (checked against the "
                              "model before compiling)."}
    )
    keep_history: bool = field(
        default=False, metadata={"help": "Allow items of the history in the answer (default: excluded, as in "
                                 "`sr predict`)."}
    )


def compile_model(argv, prog: str, description: str) -> int:
    from delrec.sr.compiled import compile_top_k

    (args,) = parse_command([CompileArguments], argv, prog, description)
    out = compile_top_k(args.model, args.topk, not args.keep_history, announce=True)
    print(json.dumps({"package": str(out), "description": str(out.with_suffix(".json")), "topk": args.topk,
                      "exclude_history": not args.keep_history}, indent=2))
    return 0
