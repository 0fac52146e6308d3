"""RecBole 1.2.1's SASRec on a delrec prepared dataset: the external anchor of the SR benchmarks.

Run it with the RecBole venv's python (benchmarks/setup_recbole.sh), never the project's:

    .venv-recbole/bin/python benchmarks/recbole_anchor.py --data PREPARED_DIR --epochs N --out DIR

It uses the standard library and RecBole (with its torch) only, never delrec: it reads the
prepared folder's JSON lines itself. Steps:

1. Conversion. Each user's sequence is rebuilt as train.history + [train.target, valid.target,
   test.target] (the longest of the three views), checked against valid.history and
   test.history, and written as a RecBole atomic dataset (user_id, item_id, timestamp = position
   in the sequence) plus a .item file listing the WHOLE catalogue, so RecBole ranks the same N
   items as delrec. Where a history was cut to max_history the items before it are unknown to
   both sides; those users are counted.
2. RecBole: SASRec, `eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}`,
   MAX_ITEM_LIST_LENGTH, seeds, valid metric NDCG@10, topk 1/5/10/20, Hit/NDCG/MRR.
3. Split check: RecBole's valid and test rows (user, input sequence, target) are compared with
   ours, instance by instance.
4. Training with wall time measured around each epoch's training and validation; test of the
   best-valid epoch with RecBole's evaluator, and a second evaluation of the same model under
   delrec's protocol (history items excluded, ties at their expected rank): RecBole's full
   ranking of a SEQUENTIAL model does NOT exclude history items (only the padding item 0).

Writes DIR/anchor.json (figures, config, versions, split check), DIR/recbole_data/ (the atomic
files) and RecBole's own log/ and checkpoints/ under DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

# torch >= 2.6 loads checkpoints with weights_only=True by default and refuses RecBole's pickles
# (its final test evaluation reloads the best checkpoint); must be set before torch is imported.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

DATASET_NAME = "delrec"
KS = (1, 5, 10, 20)
METRICS = ("hr", "ndcg", "mrr")
RECBOLE_METRIC = {"hr": "hit", "ndcg": "ndcg", "mrr": "mrr"}


class AnchorError(Exception):
    pass


# ----------------------------------------------------------------------------- prepared data


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise AnchorError(f"{path}: file not found (is --data a folder written by `delrec data prepare`?)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AnchorError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
    return rows


def load_prepared(folder: Path) -> dict:
    """Items count, meta and {split: {user: (history, target)}} of a prepared folder."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise AnchorError(f"{folder}: not a prepared dataset (no meta.json); run `delrec data prepare --out {folder}`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("kind") != "delrec-dataset":
        raise AnchorError(f"{meta_path}: not a delrec dataset")
    items = read_jsonl(folder / "items.jsonl")
    num_items = len(items)
    for index, row in enumerate(items):
        if row.get("id") != index:
            raise AnchorError(f"{folder / 'items.jsonl'}: line {index + 1}: expected id {index}")
    splits = {}
    for split in ("train", "valid", "test"):
        file = folder / f"{split}.jsonl"
        by_user: dict[str, tuple[list[int], int]] = {}
        for line_no, row in enumerate(read_jsonl(file), 1):
            user = row.get("user")
            if user is None:
                raise AnchorError(
                    f"{file}:{line_no}: no 'user'; the anchor needs per-user leave-one-out data "
                    f"(rows data such as LLaRA's has no users to rebuild sequences from)"
                )
            if user in by_user:
                raise AnchorError(
                    f"{file}:{line_no}: user {user!r} has a second {split} instance; expected leave-one-out"
                )
            history, target = list(row["history"]), row["target"]
            if any(not isinstance(i, int) or not 0 <= i < num_items for i in history + [target]):
                raise AnchorError(f"{file}:{line_no}: item id outside the catalogue 0..{num_items - 1}")
            by_user[str(user)] = (history, target)
        splits[split] = by_user
    users = set(splits["test"])
    for split in ("train", "valid"):
        if set(splits[split]) != users:
            diff = len(set(splits[split]) ^ users)
            raise AnchorError(
                f"{folder}: {split} and test hold different users ({diff} differ); expected leave-one-out"
            )
    return {"meta": meta, "num_items": num_items, "splits": splits}


def rebuild_sequences(prepared: dict) -> tuple[dict[str, list[int]], dict]:
    """Each user's sequence from the three instances, checked against each other."""
    max_history = int(prepared["meta"].get("options", {}).get("max_history", 0)) or None
    train, valid, test = (prepared["splits"][s] for s in ("train", "valid", "test"))
    sequences = {}
    inconsistent = []
    for user in sorted(test):
        (h_tr, t_tr), (h_va, t_va), (h_te, t_te) = train[user], valid[user], test[user]
        seq = h_tr + [t_tr, t_va, t_te]
        keep = max_history or len(seq)
        if h_va != seq[:-2][-keep:] or h_te != seq[:-1][-keep:]:
            inconsistent.append(user)
        sequences[user] = seq
    if inconsistent:
        raise AnchorError(
            f"{len(inconsistent)} users' train/valid/test instances are not one leave-one-out sequence "
            f"(first: {inconsistent[0]!r}); the anchor needs per-user leave-one-out data"
        )
    lengths = sorted(len(s) for s in sequences.values())
    cut = max_history or 0
    report = {
        "users": len(sequences),
        "interactions": sum(lengths),
        "sequence_length": {"min": lengths[0], "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 3)},
        "rebuilt_from": "train.history + [train.target, valid.target, test.target], "
        "checked against valid/test histories",
        "max_history": max_history,
        # train.history at max_history: earlier items may have been cut by `delrec data prepare`
        # (they are unknown to delrec's models too).
        "users_possibly_truncated": sum(1 for u in sequences if cut and len(train[u][0]) >= cut),
        # what rebuilding from test.history + [test.target] alone would have cut
        "users_with_test_history_at_max": sum(1 for u in sequences if cut and len(test[u][0]) >= cut),
        # RecBole's leave-one-out keeps >= 1 training row per user: a user with 3 interactions has
        # 2 augmented rows, so no valid row, and RecBole trains on its valid target.
        "users_with_3_interactions": sum(1 for s in sequences.values() if len(s) == 3),
        "users_with_repeated_items": sum(1 for s in sequences.values() if len(set(s)) != len(s)),
    }
    return sequences, report


def write_atomic(sequences: dict[str, list[int]], num_items: int, data_path: Path) -> Path:
    folder = data_path / DATASET_NAME
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{DATASET_NAME}.inter").open("w", encoding="utf-8") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, seq in sequences.items():
            for position, item in enumerate(seq):
                handle.write(f"{user}\t{item}\t{position}\n")
    with (folder / f"{DATASET_NAME}.item").open("w", encoding="utf-8") as handle:
        handle.write("item_id:token\n")
        for item in range(num_items):
            handle.write(f"{item}\n")
    return folder


# ----------------------------------------------------------------------------- metrics


def expected_metrics(greater, ties, ks=KS) -> dict[str, list[float]]:
    """Per instance, HR/NDCG/MRR@K with the target's rank uniform on greater+1..greater+1+ties
    (delrec's tie rule)."""
    kmax = max(ks)
    gains = {
        "hr": [1.0] * kmax,
        "ndcg": [1.0 / math.log2(r + 1) for r in range(1, kmax + 1)],
        "mrr": [1.0 / r for r in range(1, kmax + 1)],
    }
    cumulative = {}
    for name, values in gains.items():
        acc = [0.0]
        for v in values:
            acc.append(acc[-1] + v)
        cumulative[name] = acc
    out = {f"{m}@{k}": [] for m in METRICS for k in ks}
    for g, t in zip(greater, ties):
        for m in METRICS:
            cum = cumulative[m]
            for k in ks:
                out[f"{m}@{k}"].append((cum[min(k, g + t + 1)] - cum[min(k, g)]) / (t + 1))
    return out


def mean_metrics(per_instance: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(sum(v) / len(v), 6) for name, v in per_instance.items()}


def from_recbole(result: dict) -> dict[str, float]:
    """RecBole's {'hit@10': ...} as delrec's {'hr@10': ...}."""
    out = {}
    for m in METRICS:
        for k in KS:
            key = f"{RECBOLE_METRIC[m]}@{k}"
            if key in result:
                out[f"{m}@{k}"] = round(float(result[key]), 6)
    return out


# ----------------------------------------------------------------------------- RecBole


def recbole_config(args, data_path: Path, checkpoint_dir: Path) -> dict:
    config = {
        "data_path": str(data_path),
        "checkpoint_dir": str(checkpoint_dir),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "normalize_all": False,
        "user_inter_num_interval": None,
        "item_inter_num_interval": None,
        "rm_dup_inter": None,
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": list(KS),
        "valid_metric": "NDCG@10",
        "valid_metric_bigger": True,
        "metric_decimal_place": 6,
        "epochs": args.epochs,
        "stopping_step": args.patience,
        "eval_step": 1,
        "train_batch_size": args.batch,
        "eval_batch_size": args.eval_batch,
        "learner": "adam",
        "learning_rate": args.lr,
        "weight_decay": args.weight_decay,
        "hidden_size": args.hidden,
        "inner_size": args.inner,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "hidden_dropout_prob": args.dropout,
        "attn_dropout_prob": args.attn_dropout,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "loss_type": args.loss,
        "train_neg_sample_args": None
        if args.loss == "CE"
        else {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False, "candidate_num": 0},
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": args.device != "cpu",
        "gpu_id": "0",
        "worker": 0,
        "show_progress": False,
        "save_dataset": False,
        "save_dataloaders": False,
        "log_wandb": False,
        "state": "INFO",
    }
    return config


def rows_of(loader, dataset) -> list[tuple[str, list[str], str]]:
    """(user token, input item tokens oldest first, target token) of an eval loader's rows."""
    inter = loader._dataset.inter_feat
    users = dataset.id2token("user_id", inter["user_id"].numpy())
    targets = dataset.id2token("item_id", inter["item_id"].numpy())
    lists = inter["item_id_list"].numpy()
    lengths = inter["item_length"].numpy()
    rows = []
    for user, seq, length, target in zip(users, lists, lengths, targets):
        rows.append((str(user), [str(t) for t in dataset.id2token("item_id", seq[: int(length)])], str(target)))
    return rows


def check_split(prepared: dict, loaders: dict, dataset) -> dict:
    """RecBole's valid/test rows against delrec's valid/test instances, per user."""
    report = {}
    for split in ("valid", "test"):
        ours = prepared["splits"][split]
        rows = rows_of(loaders[split], dataset)
        seen = set()
        target_diff, history_diff, unknown = [], [], []
        for user, history, target in rows:
            seen.add(user)
            if user not in ours:
                unknown.append(user)
                continue
            our_history, our_target = ours[user]
            if target != str(our_target):
                target_diff.append(user)
            if history != [str(i) for i in our_history]:
                history_diff.append(user)
        missing = sorted(set(ours) - seen)
        report[split] = {
            "recbole_rows": len(rows),
            "delrec_instances": len(ours),
            "users_missing_in_recbole": len(missing),
            "target_mismatches": len(target_diff),
            "history_mismatches": len(history_diff),
            "unexpected_users": len(unknown),
            "identical": not (missing or target_diff or history_diff or unknown),
            "examples": {"missing": missing[:5], "target": target_diff[:5], "history": history_diff[:5]},
        }
    train_rows = len(loaders["train"]._dataset.inter_feat)
    report["train"] = {
        "recbole_rows": train_rows,
        "note": "RecBole trains on every prefix (one row per target item) of each user's sequence minus its "
        "valid/test items: the targets a causal pass over train.history + [train.target] predicts",
    }
    return report


def delrec_protocol_eval(model, loader, dataset, prepared_split: dict, num_items: int, device) -> dict:
    """Rank all N catalogue items, excluding each instance's history items (never the target),
    ties at their expected rank: delrec's full-ranking protocol, on RecBole's model."""
    import torch

    # column j of our score matrix = RecBole's internal id of our item j
    token_to_id = dataset.field2token_id["item_id"]
    perm = torch.tensor([token_to_id[str(j)] for j in range(num_items)], dtype=torch.long, device=device)
    greater_ex, ties_ex, greater_all, ties_all = [], [], [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            interaction = batch[0].to(device)
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)[:, perm].float()
            users = dataset.id2token("user_id", interaction["user_id"].cpu().numpy())
            targets, exclude = [], torch.zeros_like(scores, dtype=torch.bool)
            for row, user in enumerate(users):
                history, target = prepared_split[str(user)]
                targets.append(target)
                if history:
                    exclude[row, torch.tensor(history, device=device)] = True
            targets = torch.tensor(targets, device=device)
            rows = torch.arange(len(targets), device=device)
            exclude[rows, targets] = False
            target_scores = scores[rows, targets][:, None]
            for mask, greater_out, ties_out in (
                (~exclude, greater_ex, ties_ex),
                (torch.ones_like(exclude), greater_all, ties_all),
            ):
                mask[rows, targets] = False
                greater_out.extend(((scores > target_scores) & mask).sum(1).tolist())
                ties_out.extend(((scores == target_scores) & mask).sum(1).tolist())
    return {
        "history_excluded": mean_metrics(expected_metrics(greater_ex, ties_ex)),
        "history_kept": mean_metrics(expected_metrics(greater_all, ties_all)),
        "instances": len(greater_ex),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="RecBole 1.2.1 SASRec on a delrec prepared dataset (run with the RecBole venv's python)"
    )
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (delrec data prepare)")
    parser.add_argument("--epochs", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path, help="output folder (anchor.json, atomic files, logs)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inner", type=int, default=256, help="feed-forward size (RecBole's inner_size)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.5, help="hidden dropout (RecBole's default 0.5)")
    parser.add_argument("--attn-dropout", type=float, default=0.5, help="attention dropout (RecBole's default 0.5)")
    parser.add_argument("--max-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--loss", choices=("CE", "BPR"), default="CE")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--patience", type=int, default=10, help="RecBole's stopping_step (epochs without gain)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: CUDA when torch has it")
    parser.add_argument(
        "--prepare-only", action="store_true", help="convert, load in RecBole and check the split; do not train"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    try:
        return run(args)
    except AnchorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    started = time.time()
    data_dir = args.data.resolve()
    out = args.out.resolve()

    t0 = time.time()
    prepared = load_prepared(data_dir)
    sequences, conversion = rebuild_sequences(prepared)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "recbole_data"
    write_atomic(sequences, prepared["num_items"], data_path)
    conversion["seconds"] = round(time.time() - t0, 2)
    if prepared["meta"].get("options", {}).get("max_history") not in (None, args.max_len):
        print(
            f"warning: the dataset's max_history is {prepared['meta']['options']['max_history']}, "
            f"--max-len is {args.max_len}: RecBole's inputs will differ from delrec's histories",
            file=sys.stderr,
        )

    # pandas 2.2 warns about RecBole 1.2.1's chained fillna(inplace=True); harmless here
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    import torch
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender.sasrec import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # RecBole parses `--key=value` from sys.argv into its config; ours are not for it.
    sys.argv = sys.argv[:1]
    # RecBole writes ./log/ and ./log_tensorboard/ relative to the working folder.
    os.chdir(out)

    config_dict = recbole_config(args, data_path, out / "checkpoints")
    config = Config(model="SASRec", dataset=DATASET_NAME, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)

    t0 = time.time()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    load_seconds = round(time.time() - t0, 2)
    recbole_items = dataset.item_num - 1  # RecBole's id 0 is padding
    if recbole_items != prepared["num_items"]:
        raise AnchorError(f"RecBole sees {recbole_items} items, the prepared catalogue has {prepared['num_items']}")
    split_check = check_split(prepared, {"train": train_data, "valid": valid_data, "test": test_data}, dataset)
    result = {
        "anchor": "RecBole SASRec",
        "recbole_version": recbole.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": str(config["device"]),
        "torch_threads": torch.get_num_threads(),
        "data": {
            "path": str(data_dir),
            "fingerprint": prepared["meta"].get("fingerprint"),
            "source": prepared["meta"].get("source"),
            "num_items": prepared["num_items"],
            "conversion": conversion,
            "recbole_load_seconds": load_seconds,
            "recbole_rows": {
                "train": len(train_data._dataset.inter_feat),
                "valid": len(valid_data._dataset.inter_feat),
                "test": len(test_data._dataset.inter_feat),
            },
        },
        "split_check": split_check,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "recbole_config": {k: config[k] for k in config_dict if k not in ("data_path", "checkpoint_dir")},
        "protocol_notes": [
            "epochs are numbered from 1",
            "valid per epoch and test.recbole: RecBole's evaluator; for a sequential model it does NOT exclude "
            "history items from the full ranking (only the padding item), and breaks score ties by torch.topk",
            "test.delrec_protocol / valid.delrec_protocol: the best-valid model re-scored here: all N items, "
            "each instance's prepared history excluded (never the target), ties at their expected rank",
        ],
    }
    out_file = out / "anchor.json"
    _print_split(split_check, conversion)
    if args.prepare_only:
        result["wall_seconds"] = round(time.time() - started, 2)
        _write_json(out_file, result)
        print(f"prepare-only: wrote {out_file}")
        return 0

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    epochs_log: list[dict] = []

    class TimedTrainer(Trainer):
        """RecBole's Trainer, timing each epoch's training and validation."""

        def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
            t = time.perf_counter()
            loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
            loss_value = float(sum(loss) if isinstance(loss, tuple) else loss)
            seconds = round(time.perf_counter() - t, 3)
            epochs_log.append({"epoch": epoch_idx + 1, "train_seconds": seconds, "train_loss": round(loss_value, 6)})
            return loss

        def _valid_epoch(self, valid_data, show_progress=False):
            t = time.perf_counter()
            score, valid_result = super()._valid_epoch(valid_data, show_progress=show_progress)
            epochs_log[-1]["valid_seconds"] = round(time.perf_counter() - t, 3)
            epochs_log[-1]["valid_ndcg@10"] = round(float(score), 6)
            epochs_log[-1]["valid"] = from_recbole(valid_result)
            return score, valid_result

    trainer = TimedTrainer(config, model)
    t0 = time.time()
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    fit_seconds = time.time() - t0
    best = max(epochs_log, key=lambda e: (e.get("valid_ndcg@10", -1.0), -e["epoch"]))

    t0 = time.time()
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    test_seconds = time.time() - t0
    device = config["device"]
    ours_test = delrec_protocol_eval(
        trainer.model, test_data, dataset, prepared["splits"]["test"], prepared["num_items"], device
    )
    ours_valid = delrec_protocol_eval(
        trainer.model, valid_data, dataset, prepared["splits"]["valid"], prepared["num_items"], device
    )
    train_times = [e["train_seconds"] for e in epochs_log]
    result.update(
        {
            "epochs": epochs_log,
            "epochs_run": len(epochs_log),
            "train_seconds_per_epoch": round(sum(train_times) / len(train_times), 3),
            "fit_seconds": round(fit_seconds, 2),
            "best_epoch": best["epoch"],
            "best_valid_ndcg@10": round(float(best_valid_score), 6),
            "valid": {
                "recbole": from_recbole(best_valid_result or {}),
                "delrec_protocol": ours_valid["history_excluded"],
            },
            "test": {
                "recbole": from_recbole(test_result),
                "delrec_protocol": ours_test["history_excluded"],
                "history_kept_expected_ties": ours_test["history_kept"],
                "seconds": round(test_seconds, 2),
            },
            "checkpoint": str(Path(trainer.saved_model_file).resolve()),
            "wall_seconds": round(time.time() - started, 2),
        }
    )
    _write_json(out_file, result)
    print(
        f"best epoch {best['epoch']}: valid NDCG@10 {best_valid_score:.4f}; test NDCG@10 "
        f"{result['test']['recbole'].get('ndcg@10', float('nan')):.4f} (RecBole), "
        f"{ours_test['history_excluded']['ndcg@10']:.4f} (history excluded); "
        f"{result['train_seconds_per_epoch']:.1f} s/epoch; wrote {out_file}"
    )
    return 0


def _print_split(split_check: dict, conversion: dict) -> None:
    for split in ("valid", "test"):
        s = split_check[split]
        state = "identical" if s["identical"] else "DIFFERENT"
        print(
            f"split check {split}: {state} (RecBole rows {s['recbole_rows']}, delrec {s['delrec_instances']}, "
            f"missing {s['users_missing_in_recbole']}, target mismatches {s['target_mismatches']}, "
            f"history mismatches {s['history_mismatches']})"
        )
    print(
        f"conversion: {conversion['users']} users, {conversion['interactions']} interactions, "
        f"{conversion['users_possibly_truncated']} possibly truncated, "
        f"{conversion['users_with_3_interactions']} with 3 interactions (no RecBole valid row)"
    )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
