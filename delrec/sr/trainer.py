"""One trainer for every SR model: `train_sr(dataset, model_config, train_config, out)`.

What one epoch does
-------------------
Each training instance (history, target) becomes the sequence `history + [target]`, cut to its
last `max_length + 1` items. Batches of such sequences (shuffled with a generator seeded by
(seed, epoch)) are left-padded to the longest one in the batch, `model.sequence_states` runs once
over `seq[:-1]`, and the state at position t predicts `seq[t+1]` (causal training):

- `train_positions: all`: every real position predicts its next item. Right for per-user data
  (leave-one-out: one training sequence per user), where it makes the same predictions as
  prefix augmentation (RecBole) for a fraction of the compute.
- `train_positions: last`: only the last position (the instance's target) is a training example.
  Right for "rows" data (LLaRA / DLLM2Rec files), which are already prefix-expanded: there
  `all` would train the early items of a user once per row that contains them.
- `auto` (default): `all` for leave-one-out datasets, `last` for given rows.
Sequences with nothing to predict (an empty history) are skipped. Logits are only computed at
the real positions (see `delrec.sr.losses`). The popularity baseline is fitted by counting in one
pass, reported as epoch 1.

Selection, checkpoints, outputs
-------------------------------
After each epoch the model is evaluated on the VALIDATION split (full ranking, history items
excluded unless `keep_history`); the best epoch is the one with the highest valid NDCG@10, and
training stops early after `patience` epochs without improvement. The test split is only
evaluated once, at the end, on the best model. Every epoch `OUT/checkpoint/state.pt` (model,
optimizer, RNG states, epoch, best epoch and weights, log, configuration) is written atomically
and `OUT/log.jsonl` is rewritten from it. Running again with the same configuration resumes from
the checkpoint (so an interrupted run, or one asked for more `epochs`, continues and gives the
same result as an uninterrupted one); a different configuration is refused, naming what changed.
At the end OUT holds the best model (`config.json` + `model.safetensors`) and `metrics.json`:
full-ranking and candidate metrics of the best model on valid and test, `train_seconds` and
`seconds_per_epoch` (training passes only; each epoch's validation time is `eval_seconds` in the
log), `best_epoch`, `epochs_run` and `peak_memory_mb` (CPU: peak resident memory of the process,
reset when training starts, so run one training per process for clean numbers; CUDA: peak
allocated memory).

`snapshot_epochs` (off by default) also writes the model's weights after each listed epoch to
`OUT/snapshots/epoch-N.safetensors` (the tensors `model.safetensors` holds), before that epoch's
checkpoint, so a resumed run never misses one; nothing loads them but `delrec teacher export
--trajectory`, which ranks with each one before the best epoch (HetComp's teacher trajectory). It
changes nothing that is learned, so a run may resume with other snapshot epochs; an epoch already
run when the option is given gets no snapshot.

Extra loss terms (for forward distillation)
-------------------------------------------
`train_sr(..., extra_loss=fn)` adds `fn(model, batch, last_states)` to each batch's loss, where
`batch` is a `TrainBatch` (train-instance ids, inputs, labels, mask of trained positions, states
[B, T, d]) and `last_states = batch.states[:, -1]` [B, d] is each instance's state after its
whole history, i.e. the model's prediction for its `target`, so `last_states @
model.item_embeddings().T` are the student's scores for that instance. `fn` returns a scalar
tensor; its mean per epoch is logged as `extra_loss`. `model_hook(model)` is called on the
freshly built model before the optimizer and any checkpoint are set up: the place to wrap
`model.item_embedding` (see `delrec.sr.base`, "The item-embedding seam"); the trained model is
baked back to a plain `ItemEmbedding` before it is saved. Neither function is part of the
checkpoint's configuration check; describe them in `extra_settings` (a JSON-able dict, e.g. the
teacher file's fingerprint and the loss weights) so that a resume with other ones is refused.
An `extra_loss` that is an `nn.Module` (a distillation term with parameters of its own: DE's experts)
is moved to the training device, its parameters train with the model's (one Adam), and its
`state_dict` is checkpointed (entry "extra_loss") and restored on resume; it is never saved in OUT,
which holds the SR model alone. `TrainBatch.progress` (the share of the configured training done)
drives schedules such as DE's temperature.

Several processes (DDP)
-----------------------
Under `accelerate launch` (or torchrun: WORLD_SIZE > 1) the processes train one model together, torch's
DistributedDataParallel over the process group accelerate's `PartialState` sets up (gloo on CPU, NCCL on GPUs; a
bare `cuda` device is each process's LOCAL_RANK GPU). Alone, a training never imports accelerate and runs exactly
as described above. `batch_size` stays the GLOBAL batch: every process builds the same epoch batches (the same
seeded generator) and takes its contiguous share of each batch's rows, `batch_size / N` of them (a batch size
that N does not divide is refused; the last, smaller batch of an epoch splits as evenly as it can, a process
without a row weighs 0). Each process scales its loss so that DDP's mean of the processes' gradients is the
gradient of the one-process loss of the whole batch: the main loss, a mean over the batch's trained positions,
by N x (its positions / the batch's positions); an extra loss either

- marked `per_instance = True` (a mean over the batch's instances of a term of each instance alone: DLLM2Rec,
  RD, RRD): computed on the process's own rows, scaled by N x (its rows / the batch's rows); or
- otherwise (terms over the whole batch: DE's and the topologies' item sets and pairs, HetComp's curriculum
  state): computed by every process on the whole batch, from the states of all processes' rows gathered; the
  gathered rows of the process's own keep their gradient, scaled by N, so DDP's mean is again the one-process
  gradient, and a module's state changes alike in every process.

Random draws: the negatives of bce/gbce are drawn for the whole batch from the random stream all processes
share, exactly as one process draws them, and each takes its positions' rows; dropout and a per-instance extra
loss's samples come from a stream of the process's own, seeded by (seed, epoch, step, rank), so they differ from
one process's (same distribution). Without dropout and per-instance sampling the processes compute one process's
training up to the order of float sums. Only the main process (rank 0) evaluates, prints and writes (checkpoint,
log, snapshots, model, metrics.json); the others get the valid metrics from it each epoch, so all stop early
together. A checkpoint holds the shared stream, so a run resumes under any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import math
import pickle
import random
import resource
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from tqdm import tqdm

from delrec.config import Device, SEED, SHARE, THREADS, above, at_least, check_fields, device_option, memory_for
from delrec.data.dataset import CANDIDATE_SPLITS, PreparedDataset
from delrec.errors import DelrecError
from delrec.io import atomic_write, check_parents_are_folders, safetensors_bytes, write_json, write_jsonl
from delrec.sr.base import ItemEmbedding, SequentialRecommender, build_model, model_class_for_config
from delrec.device import launch_position, resolve_device, torch_threads
from delrec.sr.evaluate import EVAL_BATCH_SIZE, evaluate_full, evaluate_model
from delrec.tensors import first_nonfinite
from delrec.sr.losses import LOSSES, next_item_loss, sample_negatives

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
CHECKPOINT_VERSION = 1
SNAPSHOT_DIR = "snapshots"  # OUT/snapshots/epoch-N.safetensors (`snapshot_epochs`)
CHECKPOINT_ENTRIES = {"version": int, "settings": dict, "epoch": int, "best_epoch": int, "best_metric": float,
                      "log": list, "model": dict, "best_model": dict, "optimizer": dict, "rng": dict}
SELECTION_METRIC = "ndcg@10"
BUCKET_POOL_BATCHES = 64
# Options that may change between a run and its resumption (they do not change what is learned).
RUNTIME_OPTIONS = ("epochs", "patience", "device", "eval_batch_size", "progress", "num_threads", "snapshot_epochs")


@dataclass
class TrainConfig:
    epochs: int = field(
        default=50,
        metadata={"help": "Maximum number of epochs (a finished run given more continues).", "range": at_least(1)},
    )
    batch_size: int = field(
        default=64,
        metadata={"help": "Training SEQUENCES per batch; each holds one next-item prediction per position, so 64 "
                  "sequences make ~300 predictions on games (a RecBole batch of 256 is 256 predictions).",
                  "range": at_least(1)},
    )
    bucket_by_length: bool = field(
        default=True, metadata={"help": "Batch sequences of similar length together (less padding, faster epochs)."}
    )
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate.", "range": above(0)})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay (L2).", "range": at_least(0)})
    loss: Literal["ce", "bce", "gbce"] = field(
        default="ce", metadata={"help": "ce: full-softmax cross-entropy; bce: BCE with sampled negatives; gbce: gSASRec's gBCE."}
    )
    num_negatives: int = field(
        default=1, metadata={"help": "bce/gbce: negatives sampled per position.", "range": at_least(1)}
    )
    gbce_t: float = field(default=0.75, metadata={"help": "gbce: calibration parameter t.", "range": SHARE})
    patience: int = field(
        default=5, metadata={"help": "Stop after this many epochs without a better valid NDCG@10 (0: never stop "
                             "early).", "range": at_least(0)}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of initialisation, shuffling, dropout and negative sampling.", "range": SEED}
    )
    train_positions: Literal["auto", "all", "last"] = field(
        default="auto",
        metadata={"help": "all: every position predicts its next item; last: only the target; auto: all for "
                  "leave-one-out data, last for prefix-expanded rows data."},
    )
    keep_history: bool = field(
        default=False, metadata={"help": "Full ranking: keep history items rankable instead of excluding them."}
    )
    device: Device = device_option(what="Where to train")
    eval_batch_size: int = field(
        default=EVAL_BATCH_SIZE, metadata={"help": "Histories scored per evaluation batch.", "range": at_least(1)}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar and one line per epoch on stderr."})
    num_threads: int = field(
        default=0, metadata={"help": "CPU threads for torch; 0: the process's (OMP_NUM_THREADS, else the `delrec` "
                             "command's one per free core, which does not collapse on a busy machine).",
                             "range": THREADS}
    )
    snapshot_epochs: list[int] | None = field(
        default=None,
        metadata={"help": "Also save the model's weights after these epochs in OUT/snapshots/epoch-N.safetensors (a "
                  "teacher's training trajectory for `delrec teacher export --trajectory`, HetComp). Default: none.",
                  "range": at_least(1)},
    )

    def __post_init__(self):
        check_fields(self)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


@dataclass
class TrainBatch:
    """What an `extra_loss` sees of one batch (all on the training device)."""

    ids: torch.Tensor  # [B] ids of the train instances (rows of dataset.instances("train"))
    inputs: torch.Tensor  # [B, T] left-padded input items (the history, truncated)
    labels: torch.Tensor  # [B, T] next item at each position (last column: the instance's target)
    mask: torch.Tensor  # [B, T] bool: positions that got a main-loss term
    states: torch.Tensor  # [B, T, d] model.sequence_states(inputs), with gradient
    progress: float = 0.0  # batches done before this one / (epochs x batches per epoch - 1): 0 first, 1 last


ExtraLoss = Callable[[SequentialRecommender, TrainBatch, torch.Tensor], torch.Tensor]
PER_INSTANCE = "per_instance"  # an extra loss's attribute: True when several processes may split it by rows (see above)


@dataclass
class TrainResult:
    out: Path
    model: SequentialRecommender  # the best epoch's model, in eval mode, on the training device
    metrics: dict  # what OUT/metrics.json holds
    log: list[dict]  # one entry per epoch, as in OUT/log.jsonl
    best_epoch: int
    epochs_run: int
    seconds_per_epoch: float
    train_seconds: float
    peak_memory_mb: float


# --- data ---------------------------------------------------------------------------------------


def resolve_train_positions(option: str, dataset: PreparedDataset) -> str:
    if option != "auto":
        return option
    return "all" if dataset.meta.get("protocol") == "leave-one-out" else "last"


def training_sequences(dataset: PreparedDataset, max_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [S], lengths [S], sequences [S, W] left-padded) of the train instances whose history is not
    empty; each sequence is history + [target], cut to its last max_length + 1 items. W is the longest
    such sequence, so a generous max_length costs no memory beyond what the data holds."""
    kept = [inst for inst in dataset.instances("train") if inst.history]
    width = min(max_length, max((len(inst.history) for inst in kept), default=0)) + 1
    seqs = np.full((len(kept), width), pad_id, dtype=np.int64)
    lengths = np.empty(len(kept), dtype=np.int64)
    for row, inst in enumerate(kept):
        seq = (inst.history + (inst.target,))[-width:]
        seqs[row, width - len(seq):] = seq
        lengths[row] = len(seq)
    ids = np.array([inst.id for inst in kept], dtype=np.int64)
    return ids, lengths, seqs


def epoch_batches(lengths: np.ndarray, batch_size: int, bucket: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches (row indices). Shuffled; with `bucket`, each pool of 64 batches is
    sorted by length before it is cut into batches, and the batches are shuffled again, so a
    batch holds sequences of similar length (little padding) while the epoch stays random."""
    order = rng.permutation(len(lengths))
    if not bucket:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    pool = batch_size * BUCKET_POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _popularity_sequences(dataset: PreparedDataset, positions: str):
    for inst in dataset.instances("train"):
        yield (inst.target,) if positions == "last" else inst.history + (inst.target,)


# --- checkpoint -----------------------------------------------------------------------------------


def run_settings(model: SequentialRecommender, config: TrainConfig, positions: str) -> dict:
    """Everything that determines what is learned; a checkpoint resumes only under equal settings."""
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_OPTIONS}
    train["train_positions"] = positions
    return {
        "model_type": model.model_type,
        "model": dataclasses.asdict(model.config),
        "num_items": model.num_items,
        "dataset_fingerprint": model.dataset_fingerprint,
        "train": train,
    }


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _describe_difference(old: dict, new: dict) -> str:
    old, new = _flatten(old), _flatten(new)
    changes = [f"{k.split('.')[-1]}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    return ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")


def _rng_state(shared_cuda: torch.device | None = None) -> dict:
    """The RNG states a checkpoint keeps. `shared_cuda`: the GPU of this process of several, whose generator holds the
    stream the processes share; it is recorded for every GPU, so each process resumes it on its own."""
    np_state = np.random.get_state(legacy=False)
    if shared_cuda is not None:
        cuda = [torch.cuda.get_rng_state(shared_cuda)] * torch.cuda.device_count()
    else:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate(state["python"])


def check_negative_sampling(config: TrainConfig, model_config: Any, num_items: int, device: torch.device) -> None:
    """bce/gbce draw `num_negatives` items per position, from the N-1 items that are not the target; the
    drawn vectors take batch_size x max_length x num_negatives x hidden_size floats (x3 with gradients),
    so a value that cannot fit is refused before any memory is taken."""
    if config.loss == "ce":
        return
    if config.num_negatives > num_items - 1:
        raise DelrecError(f"--num_negatives {config.num_negatives} exceeds the {num_items - 1} items that can be "
                          f"negatives (the catalogue has {num_items}); use at most {num_items - 1}, or --loss ce")
    hidden = getattr(model_config, "hidden_size", 0)
    length = getattr(model_config, "max_length", 0)
    needed = 3 * 4 * config.batch_size * length * config.num_negatives * hidden
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise DelrecError(
            f"--loss {config.loss} with --num_negatives {config.num_negatives}, --batch_size {config.batch_size}, "
            f"--max_length {length} and --hidden_size {hidden} needs ~{needed / 2**30:.1f} GiB for the sampled "
            f"negatives, more than the {available / 2**30:.1f} GiB available; lower --num_negatives or --batch_size"
        )


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of the GPU, or MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def snapshot_path(out: str | Path, epoch: int) -> Path:
    return Path(out) / SNAPSHOT_DIR / f"epoch-{epoch}.safetensors"


def save_snapshot(out: Path, epoch: int, model: SequentialRecommender) -> None:
    """The model's weights after `epoch`, as `save_pretrained` writes them (a wrapped item embedding baked on a
    copy)."""
    embedding = getattr(model, "item_embedding", None)
    if embedding is not None and type(embedding) is not ItemEmbedding:
        model = copy.deepcopy(model)
        model.bake_item_embedding()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = snapshot_path(out, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata={"format": "pt", "model_type": model.model_type,
                                                          "epoch": str(epoch)}))


def _cpu_state(module_or_state) -> dict:
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_checkpoint(out: Path, settings: dict) -> dict | None:
    """The checkpoint in OUT if its settings equal `settings`; None when there is none."""
    path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not path.is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DelrecError(
                f"{out} already holds files but no training checkpoint; choose another --out or empty it"
            )
        return None
    start_over = f"delete {path.parent} to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DelrecError(f"{path}: refused, it holds Python objects other than tensors and plain values, which "
                          f"delrec checkpoints never do (a foreign or tampered file; loading it could run code); "
                          f"{start_over}") from None
    except Exception as exc:  # noqa: BLE001 - torch reports a truncated or damaged file in many types
        raise DelrecError(f"{path}: unreadable checkpoint, truncated or damaged ({type(exc).__name__}); "
                          f"{start_over}") from None
    for key, kind in CHECKPOINT_ENTRIES.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), kind):
            raise DelrecError(f"{path}: not a delrec training checkpoint (entry '{key}' is missing or not a "
                              f"{kind.__name__}); {start_over}")
    version, saved = state["version"], state["settings"]
    if version != CHECKPOINT_VERSION:
        raise DelrecError(f"{path}: checkpoint version {version}, this delrec writes {CHECKPOINT_VERSION}; "
                          f"{start_over}")
    if saved != settings:
        raise DelrecError(
            f"{out}: cannot resume, its checkpoint was written with a different configuration "
            f"({_describe_difference(saved, settings)}); use the same options, another --out, or delete "
            f"{path.parent} to start over"
        )
    for key in ("model", "best_model"):
        broken = first_nonfinite(state[key].items())
        if broken is not None:
            raise DelrecError(f"{path}: '{key}' tensor '{broken[0]}' holds {broken[1]} NaN/inf value(s) (the run "
                              f"diverged, or the file was damaged); {start_over} (with a lower --lr if it diverged)")
    return state


def restore_checkpoint(path: Path, state: dict, model: SequentialRecommender,
                       optimizer: torch.optim.Optimizer | None, extra: torch.nn.Module | None = None) -> None:
    """Put the model, optimizer and RNGs back as the checkpoint left them; a checkpoint whose entries do not
    fit (edited, or a damaged file that still unpickles) is refused, naming the file."""
    try:
        for key in ("best_model", "model"):  # both must fit the model; the last one loaded stays
            model.load_state_dict(state[key])
        if extra is not None:
            extra.load_state_dict(state["extra_loss"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    except Exception as exc:  # noqa: BLE001 - torch, numpy and random each reject a misfit in their own types
        raise DelrecError(f"{path}: checkpoint does not fit this run ({type(exc).__name__}: "
                          f"{textwrap.shorten(str(exc), 240)}); delete {path.parent} to start over") from None


def save_checkpoint(out: Path, state: dict) -> None:
    """Serialised in memory first: torch's own writer turns a full disk into a cryptic RuntimeError, a plain
    write gives an OSError naming the file (and `atomic_write` keeps the previous checkpoint)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(out / CHECKPOINT_DIR / CHECKPOINT_FILE, "wb") as handle:
        handle.write(buffer.getbuffer())


# --- several processes (DDP) ----------------------------------------------------------------------


def process_bounds(rows: int, count: int) -> list[int]:
    """[count + 1] row bounds: process r takes rows bounds[r]:bounds[r + 1] of a batch of `rows` (contiguous, sizes
    differing by at most one, the larger first, as `np.array_split`)."""
    base, extra = divmod(rows, count)
    bounds = [0]
    for rank in range(count):
        bounds.append(bounds[-1] + base + (1 if rank < extra else 0))
    return bounds


def check_processes(config: TrainConfig, count: int, trainable: bool) -> None:
    """Refuse, in one line, what several processes cannot train as one process would."""
    if count == 1 or not trainable:
        return
    if config.batch_size % count:
        raise DelrecError(f"--batch_size {config.batch_size} is the global batch, split evenly over the {count} "
                          f"processes of this launch: use a multiple of {count}")
    if str(config.device).startswith("cuda:"):
        raise DelrecError(f"--device {config.device} with {count} processes would put them all on one GPU; use "
                          "--device cuda (or auto): each process takes the GPU of its LOCAL_RANK")


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose gradient is multiplied by `factor`."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def assemble_rows(parts: list[torch.Tensor], rank: int, own: torch.Tensor) -> torch.Tensor:
    """The whole batch's rows from every process's `parts` (in rank order, without gradient), with this process's
    own rows `own` in place of its part: they keep their gradient, multiplied by the process count, since every
    process computes the same batch-wide term and DDP averages their gradients."""
    parts = list(parts)
    parts[rank] = _ScaleGradient.apply(own, float(len(parts)))
    return torch.cat(parts)


class ProcessGroup:
    """The processes of a distributed launch as one training sees them: rank, count, this process's device, and
    the few collective operations the trainer needs (torch.distributed, set up by accelerate's `PartialState`)."""

    def __init__(self, rank: int, count: int, device: torch.device):
        self.rank, self.count, self.device = rank, count, device

    @classmethod
    def start(cls, device: torch.device) -> "ProcessGroup":
        from accelerate import PartialState  # under a launch only: alone, `delrec sr train` never imports accelerate

        state, count = PartialState(cpu=device.type == "cpu"), launch_position().count
        if state.num_processes != count or not torch.distributed.is_initialized():
            raise DelrecError(f"$WORLD_SIZE says {count} processes, but accelerate set up "
                              f"{state.num_processes}; start them with `accelerate launch` (or torchrun)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return cls(state.process_index, state.num_processes, device)

    def wrap(self, module: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
        """`module` under DDP. Its buffers are never broadcast: every process builds them from the same inputs (a
        teacher's tensors) and changes them alike (HetComp's curriculum)."""
        from torch.nn.parallel import DistributedDataParallel

        module._ddp_params_and_buffers_to_ignore = [name for name, _ in module.named_buffers()]
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused)

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        self.sum([0.0])

    def broadcast(self, value: Any) -> Any:
        """The main process's `value`, in every process."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_rows(self, own: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        """Every process's rows of a batch (process r's: rows bounds[r]:bounds[r + 1]), see `assemble_rows`."""
        most = max(stop - start for start, stop in zip(bounds, bounds[1:]))
        padded = own.detach().new_zeros((most, *own.shape[1:]))  # equal sizes for all_gather
        padded[:len(own)] = own.detach()
        parts = [torch.empty_like(padded) for _ in range(self.count)]
        torch.distributed.all_gather(parts, padded)
        return assemble_rows([part[:stop - start] for part, start, stop in zip(parts, bounds, bounds[1:])],
                             self.rank, own)


def stream_seed(seed: int, epoch: int, step: int, rank: int, purpose: int) -> int:
    """The seed of process `rank`'s own random stream at a step (0: its forward pass, 1: its extra loss)."""
    return int(np.random.SeedSequence([seed, epoch, step, rank, purpose]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def _own_stream(device: torch.device, seed: int | None):
    """Draws of this process alone, from a stream seeded by `seed`; the shared stream is left where it was."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def process_batch_loss(
    model: SequentialRecommender,
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    index: np.ndarray,
    config: TrainConfig,
    positions: str,
    extra_loss: ExtraLoss | None,
    progress: float,
    processes: Any,
    seeds: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This process's share of the batch `index` under several processes (module docstring, "Several processes"):
    (the loss it backpropagates, its part of the batch's logged loss, its part of the logged extra loss or None).
    The logged parts sum, over the processes, to what one process logs; the losses' gradients average to one
    process's gradient. `processes` has `rank`, `count` and `gather_rows`; `seeds` seed this process's own streams
    (forward pass, per-instance extra loss; None: the current stream)."""
    ids, lengths, seqs = data
    device = next(model.parameters()).device
    rank, count = processes.rank, processes.count
    width = int(lengths[index].max())  # the whole batch's: every row is computed as one process computes it
    batch = torch.from_numpy(seqs[index, -width:]).to(device)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    mask = (inputs != model.pad_id) & (labels != model.pad_id)
    if positions == "last":
        mask[:, :-1] = False
    bounds = process_bounds(len(index), count)
    start, stop = bounds[rank], bounds[rank + 1]
    rows = slice(start, stop) if stop > start else slice(0, 1)  # no row of a small last batch: run one, weighed 0
    with _own_stream(device, None if seeds is None else seeds[0]):
        states = model.sequence_states(inputs[rows])
    table = model.item_embeddings()
    per_row = mask.sum(1)
    everywhere, offset, here = int(per_row.sum()), int(per_row[:start].sum()), int(per_row[start:stop].sum())
    negatives = None
    if config.loss != "ce":  # the whole batch's, from the shared stream, as one process draws them: take ours
        negatives = sample_negatives(labels[mask], model.num_items, config.num_negatives)[offset:offset + here]
    if here:
        trained = mask[rows]
        main = next_item_loss(config.loss, states[trained], labels[rows][trained], table, config.num_negatives,
                              config.gbce_t, negatives=negatives)
    else:
        main = (states.sum() + table.sum()) * 0.0
    share = here / everywhere
    loss, logged, extra_logged = main * (count * share), main.detach() * share, None
    if extra_loss is None:
        return loss, logged, extra_logged
    if getattr(extra_loss, PER_INSTANCE, False):  # a mean over instances: ours, weighed by our share of the rows
        row_share = (stop - start) / len(index)
        if row_share:
            with _own_stream(device, None if seeds is None else seeds[1]):
                own = TrainBatch(torch.from_numpy(ids[index[rows]]).to(device), inputs[rows], labels[rows], mask[rows],
                                 states, progress)
                value = extra_loss(model, own, states[:, -1])
        else:
            value = states.sum() * 0.0
        return loss + value * (count * row_share), logged, value.detach() * row_share
    every = processes.gather_rows(states[:stop - start], bounds)  # the whole batch, in every process
    whole = TrainBatch(torch.from_numpy(ids[index]).to(device), inputs, labels, mask, every, progress)
    value = extra_loss(model, whole, every[:, -1])
    return loss + value, logged, value.detach() / count


class _Step(torch.nn.Module):
    """The model and a module extra loss as the one module DDP wraps; its forward runs `compute` (one process's
    `process_batch_loss`), so DDP sees every parameter the loss reaches and averages their gradients."""

    def __init__(self, model: SequentialRecommender, extra: torch.nn.Module | None):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, compute: Callable[[], tuple]) -> tuple:
        return compute()


# --- memory ---------------------------------------------------------------------------------------


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process peak RSS"
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "process peak RSS"


# --- training ---------------------------------------------------------------------------------------


def _train_epoch(
    model: SequentialRecommender,
    optimizer: torch.optim.Optimizer,
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    config: TrainConfig,
    positions: str,
    epoch: int,
    device: torch.device,
    extra_loss: ExtraLoss | None,
    processes: ProcessGroup | None = None,
    step_module: torch.nn.Module | None = None,
) -> dict:
    ids, lengths, seqs = data
    pad = model.pad_id
    model.train()
    total = extra_total = 0.0
    batches = epoch_batches(lengths, config.batch_size, config.bucket_by_length, np.random.default_rng([config.seed, epoch]))
    total_steps = config.epochs * len(batches)  # the same count every epoch
    shown = config.progress and (processes is None or processes.rank == 0)
    bar = tqdm(total=len(batches), desc=f"epoch {epoch}", disable=not shown, leave=False, dynamic_ncols=True)
    for step, index in enumerate(batches, start=1):
        if processes is not None:  # this process's share of the batch, under DDP (`step_module`)
            progress = ((epoch - 1) * len(batches) + step - 1) / max(total_steps - 1, 1)
            seeds = tuple(stream_seed(config.seed, epoch, step, processes.rank, purpose) for purpose in (0, 1))
            loss, logged, extra_logged = step_module(functools.partial(
                process_batch_loss, model, data, index, config, positions, extra_loss, progress, processes, seeds))
            total += logged.item()
            if extra_logged is not None:
                extra_total += extra_logged.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            continue
        width = int(lengths[index].max())
        batch = torch.from_numpy(seqs[index, -width:]).to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        mask = (inputs != pad) & (labels != pad)
        if positions == "last":
            mask[:, :-1] = False
        states = model.sequence_states(inputs)
        loss = next_item_loss(
            config.loss, states[mask], labels[mask], model.item_embeddings(), config.num_negatives, config.gbce_t
        )
        total += loss.item()
        if extra_loss is not None:
            progress = ((epoch - 1) * len(batches) + step - 1) / max(total_steps - 1, 1)
            train_batch = TrainBatch(torch.from_numpy(ids[index]).to(device), inputs, labels, mask, states, progress)
            extra = extra_loss(model, train_batch, states[:, -1])
            extra_total += extra.item()
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
        if step % 20 == 0 or step == len(batches):
            bar.set_postfix(loss=f"{total / step:.4f}")
    bar.close()
    if processes is not None:  # each process logged its share of every batch
        total, extra_total = processes.sum([total, extra_total])
    if not math.isfinite(total + extra_total):
        raise DelrecError(f"epoch {epoch}: the training loss became {total + extra_total} (training diverged); lower --lr")
    broken = first_nonfinite(model.state_dict().items())  # the last step can break the weights after a finite loss
    if broken is not None:
        raise DelrecError(f"epoch {epoch}: weight '{broken[0]}' became NaN/inf (training diverged); lower --lr")
    result = {"loss": total / max(len(batches), 1)}
    if extra_loss is not None:
        result["extra_loss"] = extra_total / max(len(batches), 1)
    return result


def train_sr(
    dataset: PreparedDataset | str | Path,
    model_config: Any,
    train_config: TrainConfig | None = None,
    out: str | Path = "runs/sr",
    extra_loss: ExtraLoss | None = None,
    model_hook: Callable[[SequentialRecommender], None] | None = None,
    extra_settings: dict | None = None,
) -> TrainResult:
    """Train (or resume, or just re-evaluate a finished run) and write OUT; see the module docstring.

    `model_config` is an instance of a model's config dataclass (`SASRecConfig`, `GRU4RecConfig`,
    `CaserConfig`, `PopConfig`); it picks the model.
    """
    config = train_config or TrainConfig()
    with torch_threads(config.num_threads):
        return _train(dataset, model_config, config, out, extra_loss, model_hook, extra_settings)


def _train(dataset, model_config, config: TrainConfig, out, extra_loss, model_hook, extra_settings) -> TrainResult:
    if not isinstance(dataset, PreparedDataset):
        dataset = PreparedDataset.load(dataset)
    for split in CANDIDATE_SPLITS:  # read (and checked) now: a bad file found at the end would cost the training
        dataset.candidates(split)
    out = Path(out)
    check_parents_are_folders(out)
    model_class = model_class_for_config(model_config)  # fails fast on a foreign config object
    model_type = model_class.model_type
    device = resolve_device(config.device)
    count = launch_position().count
    check_processes(config, count, model_class.trainable)
    processes = ProcessGroup.start(device) if count > 1 else None
    main = processes is None or processes.rank == 0  # the one process that evaluates, prints and writes
    positions = resolve_train_positions(config.train_positions, dataset)
    exclude_history = not config.keep_history

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    check_negative_sampling(config, model_config, dataset.num_items, device)
    sizes = ", ".join(f"{f.name} {getattr(model_config, f.name)}" for f in dataclasses.fields(model_config)
                      if type(getattr(model_config, f.name)) is int)
    with memory_for(f"the {model_type} model ({sizes}) of {dataset.num_items} items", "lower those sizes"):
        model = build_model(model_config, dataset.num_items, dataset.fingerprint)
        model.folder = out
        if model_hook is not None:
            model_hook(model)
        model = model.to(device)
    settings = run_settings(model, config, positions)
    if extra_settings:
        settings["extra"] = extra_settings
    state = load_checkpoint(out, settings)
    extra_module = extra_loss if isinstance(extra_loss, torch.nn.Module) else None
    parameters = list(model.parameters())
    if extra_module is not None:
        extra_module.to(device)
        parameters += list(extra_module.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay) if model.trainable else None

    def say(message: str) -> None:  # progress lines go to stderr, so stdout stays machine-readable
        if config.progress and main:
            tqdm.write(message, file=sys.stderr)

    if state is None:
        epoch, best_epoch, best_metric, log, best_state = 0, 0, -math.inf, [], None
    else:
        restore_checkpoint(out / CHECKPOINT_DIR / CHECKPOINT_FILE, state, model, optimizer, extra_module)
        epoch, best_epoch, best_metric = state["epoch"], state["best_epoch"], state["best_metric"]
        log, best_state = state["log"], state["best_model"]
        if main:  # said even without progress output: a resumed run must never pass for a fresh one
            tqdm.write(f"resuming {out} after epoch {epoch} (best so far: epoch {best_epoch}, valid {SELECTION_METRIC} "
                       f"{best_metric:.4f})", file=sys.stderr)
    step_module = None
    if processes is not None:
        processes.barrier()  # every process has read OUT before the main one writes into it
        if model.trainable:
            step_module = processes.wrap(_Step(model, extra_module), find_unused=extra_module is not None)

    data = training_sequences(dataset, model.max_length, model.pad_id) if model.trainable else None
    valid = dataset.instances("valid")
    _reset_peak_memory(device)
    while epoch < config.epochs:
        if not model.trainable and epoch >= 1:
            break  # counted once; nothing more to learn
        if config.patience and epoch - best_epoch >= config.patience:
            say(f"early stop: no better valid {SELECTION_METRIC} for {config.patience} epochs")
            break
        epoch += 1
        started = time.perf_counter()
        if model.trainable:
            with memory_for(f"training batches of batch_size {config.batch_size} ({sizes})",
                            "lower batch_size (epochs already done are kept: re-run to resume)"):
                entry = _train_epoch(model, optimizer, data, config, positions, epoch, device, extra_loss, processes,
                                     step_module)
        else:
            model.fit(_popularity_sequences(dataset, positions))
            entry = {"loss": None}
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        valid_metrics = evaluate_full(model, valid, config.eval_batch_size, exclude_history) if main else None
        if processes is not None:  # the others wait for the main process's: all stop and keep the same epoch
            valid_metrics = processes.broadcast(valid_metrics)
        eval_seconds = time.perf_counter() - started
        improved = valid_metrics[SELECTION_METRIC] > best_metric
        if improved:
            best_epoch, best_metric, best_state = epoch, valid_metrics[SELECTION_METRIC], _cpu_state(model)
        entry = {"epoch": epoch, **entry, "train_seconds": round(train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
                 "peak_memory_mb": round(_peak_memory_mb(device)[0], 1), "valid": valid_metrics, "best": improved}
        log.append(entry)
        if not main:
            continue
        if config.snapshot_epochs and epoch in config.snapshot_epochs and model.trainable:
            save_snapshot(out, epoch, model)
        shared_cuda = device if processes is not None and device.type == "cuda" else None
        save_checkpoint(out, {
            "version": CHECKPOINT_VERSION, "settings": settings, "epoch": epoch, "best_epoch": best_epoch,
            "best_metric": best_metric, "log": log, "model": _cpu_state(model), "best_model": best_state,
            "optimizer": optimizer.state_dict() if optimizer is not None else {}, "rng": _rng_state(shared_cuda),
            **({"extra_loss": _cpu_state(extra_module)} if extra_module is not None else {}),
        })
        write_jsonl(out / "log.jsonl", log)
        loss_text = "" if entry["loss"] is None else f"loss {entry['loss']:.4f}, "
        say(f"epoch {epoch}: {loss_text}valid {SELECTION_METRIC} {valid_metrics[SELECTION_METRIC]:.4f}"
            f"{' (best)' if improved else ''}, {train_seconds:.1f} s train + {eval_seconds:.1f} s eval")

    peak_mb, peak_kind = _peak_memory_mb(device)
    peak_mb = max([peak_mb] + [entry.get("peak_memory_mb", 0.0) for entry in log])  # over resumed sessions too
    model.load_state_dict({k: v.to(device) for k, v in best_state.items()})
    model.eval()
    metrics = evaluate_model(model, dataset, config.eval_batch_size, exclude_history) if main else None
    if processes is not None:  # the main process's metrics, log and timings: every process returns the same result
        metrics, log, peak_mb = processes.broadcast((metrics, log, peak_mb))
    train_seconds = sum(entry["train_seconds"] for entry in log)
    summary = {
        "model_type": model.model_type,
        "train_seconds": round(train_seconds, 3),
        "seconds_per_epoch": round(train_seconds / len(log), 3),
        "best_epoch": best_epoch,
        "epochs_run": len(log),
        "selection": f"valid {SELECTION_METRIC}",
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": peak_kind,
        "device": str(device),
        "train_config": dataclasses.asdict(config) | {"train_positions": positions},
        "model_config": dataclasses.asdict(model.config),
        **({"processes": count} if count > 1 else {}),
    }
    metrics = {**metrics, **summary}
    model.bake_item_embedding()  # a wrapped (distillation) embedding is saved as its final table
    if main:
        model.save_pretrained(out)
        write_json(out / "metrics.json", metrics)
    return TrainResult(out, model, metrics, log, best_epoch, len(log), summary["seconds_per_epoch"],
                       summary["train_seconds"], summary["peak_memory_mb"])
