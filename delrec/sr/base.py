"""The interface every sequential recommender implements, the model registry and model folders.

Conventions (the same for every model, so one trainer, one evaluator and the distillation code
serve them all):

- Item ids are `0..N-1`. Inside a model, `N` (= `num_items`) is the padding id; it never leaves
  the model: files hold item ids only.
- Histories are LongTensor[B, T], oldest item first, LEFT-padded with `pad_id`, so the most
  recent item is always in the last column. `pad_histories` builds them.
- `sequence_states(seqs[B, T]) -> [B, T, d]`: the user state after each position, computed
  causally (position t sees items <= t only), so training predicts the next item at every
  position in one pass. Pad positions produce states that callers ignore. A model's state at
  position t equals `encode` of the prefix ending at t (tests check it).
- `encode(histories) -> [B, d]`: the state after the whole history (last column).
- `score_all(histories) -> [B, N]` and `score_items(histories, items[B, M]) -> [B, M]`: the dot
  product of the state with the item vectors of `item_embeddings()`.

The item-embedding seam
-----------------------
Every item vector a model uses, as input and (tied) as output, comes from ONE module,
`model.item_embedding`, through two calls:

    model.item_embedding(ids)      -> [..., d]   input lookup (pad id -> zero vector)
    model.item_embedding.table()   -> [N, d]     output table used for scoring

`ItemEmbedding` (an `nn.Embedding` with a zero padding row) is the default. Forward
distillation (DLLM2Rec's collaborative embedding distillation, e_i = b_i + alpha * (W z_i + c)
with z_i a frozen teacher embedding) replaces `model.item_embedding` with any module offering the
same two calls, e.g. one holding the base `ItemEmbedding` (b_i), a `Linear` (W, c) and the
teacher matrix as a buffer; nothing else in the model changes. Keep `forward(ids)` equal to
`table()[ids]` (and zero for the pad id) so input and output stay tied; then `bake_item_embedding()`
turns the trained wrapper back into a plain `ItemEmbedding` holding the final vectors, and the
student is saved, loaded and served with torch alone (no teacher file needed at serving time).

Model folders
-------------
`save_pretrained(folder)` writes `config.json` = {"model_type", "format_version", "num_items",
"dataset_fingerprint", **model config} and `model.safetensors`; `load_model(folder)` (or
`SequentialRecommender.from_pretrained`) validates both and rebuilds the model on CPU, in eval mode.
Loading then scoring on CPU gives bit-identical scores. The files are checked before anything is
allocated by them: each config field must have its dataclass type (JSON `"16"` is not the integer 16),
and the tensor shapes the config implies (computed on torch's meta device, which allocates nothing)
must be the ones the safetensors header lists, so an edited `num_items` of 10**12 is an error, not a
terabyte allocation. Weights with NaN or inf are refused.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from delrec.config import dataclass_from_dict, excerpt
from delrec.errors import DelrecError, where
from delrec.headers import SR_MODEL_CONFIG_FILE as CONFIG_FILE
from delrec.headers import SR_MODEL_FORMAT_VERSION as FORMAT_VERSION
from delrec.headers import SR_MODEL_HEADER as HEADER
from delrec.headers import SR_MODEL_WEIGHTS_FILE as WEIGHTS_FILE
from delrec.io import atomic_write, json_text, read_json, safetensors_bytes
from delrec.tensors import first_nonfinite

RESERVED_KEYS = ("model_type", "format_version", "num_items", "dataset_fingerprint")
# The types a model config's fields may have, as config.json holds them: (accepts the JSON value, what it expects).
FIELD_TYPES: dict[type, tuple[typing.Callable[[Any], bool], str]] = {
    int: (lambda value: type(value) is int, "an integer"),
    float: (lambda value: type(value) in (int, float), "a number"),
    bool: (lambda value: type(value) is bool, "true or false"),
    str: (lambda value: type(value) is str, "text"),
}
_JSON_NAMES = {str: "text", bool: "true/false", int: "an integer", float: "a number", list: "a list", dict: "an object",
               type(None): "null"}

MODELS: dict[str, type["SequentialRecommender"]] = {}


def register(cls: type["SequentialRecommender"]) -> type["SequentialRecommender"]:
    """Class decorator: make a model available by its `model_type` (CLI `--model`, config.json)."""
    clash = {f.name for f in dataclasses.fields(cls.config_class)} & set(RESERVED_KEYS)
    if clash:
        raise TypeError(f"{cls.config_class.__name__} uses reserved config keys {sorted(clash)}")
    untyped = {name: kind for name, kind in typing.get_type_hints(cls.config_class).items() if kind not in FIELD_TYPES}
    if untyped:
        raise TypeError(f"{cls.config_class.__name__} fields {untyped} are not of a type config.json holds "
                        f"({', '.join(k.__name__ for k in FIELD_TYPES)})")
    MODELS[cls.model_type] = cls
    return cls


def model_class(name: str) -> type["SequentialRecommender"]:
    """The registered model class named `name`; a `DelrecError` listing the names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise DelrecError(f"unknown model '{name}'; expected one of: {', '.join(MODELS)}") from None


def model_class_for_config(config: Any) -> type["SequentialRecommender"]:
    for cls in MODELS.values():
        if type(config) is cls.config_class:
            return cls
    raise TypeError(f"{type(config).__name__} is not the config class of a registered SR model")


def build_model(config: Any, num_items: int, dataset_fingerprint: str | None = None) -> "SequentialRecommender":
    """A freshly initialised model for `config` (an instance of one model's config dataclass)."""
    return model_class_for_config(config)(config, num_items, dataset_fingerprint)




def pad_histories(
    histories: Sequence[Sequence[int]], pad_id: int, max_length: int | None = None, min_length: int = 1
) -> torch.LongTensor:
    """LongTensor[B, T] of the last `max_length` items of each history, left-padded with `pad_id`.

    T is the longest (truncated) history in the batch, at least `min_length`, so no column is
    padding in every row (except when all histories are shorter than `min_length`).
    """
    if max_length is not None:
        histories = [h[-max_length:] if len(h) > max_length else h for h in histories]
    width = max(min_length, max((len(h) for h in histories), default=0))
    out = np.full((len(histories), width), pad_id, dtype=np.int64)
    for row, history in zip(out, histories):
        if len(history):
            row[width - len(history):] = history
    return torch.from_numpy(out)


class ItemEmbedding(nn.Embedding):
    """Item vectors with a zero, never-updated padding row (id N). See "The item-embedding seam"."""

    def __init__(self, num_items: int, dim: int):
        super().__init__(num_items + 1, dim, padding_idx=num_items)

    def table(self) -> torch.Tensor:
        """[N, d]: the vectors of items 0..N-1 (the pad row excluded), used to score items."""
        return self.weight[:-1]

    @classmethod
    def from_table(cls, table: torch.Tensor) -> "ItemEmbedding":
        """An `ItemEmbedding` holding `table` [N, d] (plus a zero pad row)."""
        module = cls(table.shape[0], table.shape[1]).to(device=table.device, dtype=table.dtype)
        with torch.no_grad():
            module.weight[:-1].copy_(table)
            module.weight[-1].zero_()
        return module


class SequentialRecommender(nn.Module):
    """Base class: subclasses set `model_type`, `config_class` and implement `sequence_states`."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    trainable: ClassVar[bool] = True  # False: fitted by counting (pop), no gradient training

    def __init__(self, config: Any, num_items: int, dataset_fingerprint: str | None = None):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be positive, got {num_items}")
        self.config = config
        self.num_items = num_items
        self.pad_id = num_items
        self.dataset_fingerprint = dataset_fingerprint
        self.folder: Path | None = None  # where it is loaded from or trained to: errors about its scores name it

    # --- the interface --------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Longest history the model reads; `encode` keeps the last `max_length` items and the
        trainer cuts training sequences to `max_length + 1` items."""
        return int(self.config.max_length)

    @property
    def context_length(self) -> int:
        """How many of the most recent items `encode` needs (Caser: its window only)."""
        return self.max_length

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:
        """Input item vectors (pad id -> zeros): the one place inputs are looked up."""
        return self.item_embedding(ids)

    def item_embeddings(self) -> torch.Tensor:
        """[N, d] output item table (tied with the input embedding)."""
        return self.item_embedding.table()

    def sequence_states(self, seqs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        histories = histories[:, -self.context_length:]
        return self.sequence_states(histories)[:, -1]

    def score_all(self, histories: torch.Tensor) -> torch.Tensor:
        return self.encode(histories) @ self.item_embeddings().T

    def score_items(self, histories: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        states = self.encode(histories)
        vectors = self.item_embeddings()[items]  # [B, M, d]
        return torch.einsum("bd,bmd->bm", states, vectors)

    # --- the seam for forward distillation ---------------------------------------------------
    def bake_item_embedding(self) -> None:
        """Replace a wrapped `item_embedding` by a plain `ItemEmbedding` with its current table."""
        embedding = getattr(self, "item_embedding", None)
        if embedding is not None and type(embedding) is not ItemEmbedding:
            with torch.no_grad():
                self.item_embedding = ItemEmbedding.from_table(self.item_embedding.table().detach().clone())

    def _init_item_embedding(self, std: float) -> None:
        """Normal(0, std) item vectors with a zero padding row."""
        with torch.no_grad():
            nn.init.normal_(self.item_embedding.weight, 0.0, std)
            self.item_embedding.weight[self.pad_id].zero_()

    def _init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for linear and embedding weights, zero biases, LayerNorm at identity."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(getattr(self, "item_embedding", None), ItemEmbedding):
            with torch.no_grad():
                self.item_embedding.weight[self.pad_id].zero_()

    # --- model folders -------------------------------------------------------------------------
    def folder_config(self) -> dict:
        return {
            "model_type": self.model_type,
            "format_version": FORMAT_VERSION,
            "num_items": self.num_items,
            "dataset_fingerprint": self.dataset_fingerprint,
            **dataclasses.asdict(self.config),
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into `folder` (each file atomically)."""
        embedding = getattr(self, "item_embedding", None)
        if embedding is not None and type(embedding) is not ItemEmbedding:
            raise ValueError("call bake_item_embedding() before saving a model with a wrapped item embedding")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_write(folder / WEIGHTS_FILE, "wb") as handle:
            handle.write(safetensors_bytes(tensors, metadata={"format": "pt", "model_type": self.model_type}))
        with atomic_write(folder / CONFIG_FILE) as handle:
            handle.write(json_text(self.folder_config(), folder / CONFIG_FILE, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "SequentialRecommender":
        model = load_model(folder, device)
        if cls is not SequentialRecommender and not isinstance(model, cls):
            raise DelrecError(f"{folder}: holds a '{model.model_type}' model, expected '{cls.model_type}'")
        return model


def describe_folder(folder: Path) -> str:
    """What a folder that is not an SR model folder seems to be, for error messages."""
    if (folder / "adapter_config.json").is_file():
        return "a PEFT adapter folder"
    if (folder / "delrec.json").is_file():
        return "a delrec LLM folder"
    if (folder / "meta.json").is_file():
        return "a prepared dataset folder"
    if (folder / "checkpoint").is_dir():
        return "an unfinished `delrec sr train` run (a checkpoint but no model yet; re-run the same command to finish it)"
    return "a folder without config.json"


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> SequentialRecommender:
    """Load an SR model folder written by `save_pretrained`; `DelrecError` if it is anything else."""
    folder = Path(folder)
    expected = f"expected an SR model folder (config.json + {WEIGHTS_FILE} from `delrec sr train`)"
    if folder.is_file():
        raise DelrecError(f"{folder} is a file, expected an SR model folder (the folder holding {CONFIG_FILE} and "
                          f"{WEIGHTS_FILE})")
    if not folder.is_dir():
        raise DelrecError(f"{folder}: model folder not found; {expected}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise DelrecError(f"{folder}: not an SR model folder, it is {describe_folder(folder)}; {expected}")
    data = read_json(config_path)
    if not isinstance(data, dict):
        raise DelrecError(f"{config_path}: expected a JSON object; {expected}")
    model_type = data.get("model_type")
    if model_type not in MODELS:
        kind = "a Hugging Face model folder" if "architectures" in data or model_type else "not an SR model config"
        raise DelrecError(
            f"{config_path}: {kind} (model_type {model_type!r}), not a delrec SR model "
            f"(model_type one of {', '.join(MODELS)}); {expected}"
        )
    HEADER.validate(data, config_path)
    num_items = data["num_items"]
    cls = MODELS[model_type]
    fields = {k: v for k, v in data.items() if k not in RESERVED_KEYS}
    check_field_types(cls.config_class, fields, config_path)
    config = dataclass_from_dict(cls.config_class, fields, str(config_path))
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise DelrecError(f"{folder}: {WEIGHTS_FILE} is missing (config.json alone); {expected}")
    with torch.device("meta"):  # the shapes and dtypes config.json implies, without allocating them
        expected_tensors = cls(config, num_items).state_dict()
    tensors = read_weights(weights_path, {k: tuple(v.shape) for k, v in expected_tensors.items()})
    check_dtypes(tensors, expected_tensors, weights_path)
    broken = first_nonfinite(tensors.items())
    if broken is not None:
        name, count = broken
        raise DelrecError(f"{weights_path}: tensor '{name}' holds {count} NaN/inf value(s), so the model's scores "
                          "would be NaN (its training diverged, or the file was damaged); train the model again")
    model = cls(config, num_items, data.get("dataset_fingerprint"))
    model.load_state_dict(tensors)
    model.folder = folder
    return model.to(device).eval()


def check_field_types(config_class: type, fields: Mapping[str, Any], path: Path) -> None:
    """Refuse a config.json field whose value is not of its dataclass field's type (`"16"` for an int would fail
    later, far from the file, as `'<' not supported between 'int' and 'str'`). Unknown keys are
    `dataclass_from_dict`'s to name."""
    hints = typing.get_type_hints(config_class)
    for name, value in fields.items():
        if name in hints:
            accepts, expected = FIELD_TYPES[hints[name]]
            if not accepts(value):
                found = _JSON_NAMES.get(type(value), type(value).__name__)
                raise DelrecError(f"{where(path, field=name)}: expected {expected}, found {found} "
                                  f"{excerpt(value, 60)}; the folder was edited (retrain the model, or restore its "
                                  "config.json)")


def read_weights(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`, once its header (read first, and checked against the file's
    size by safetensors) lists exactly the tensor names and shapes `shapes`: nothing is read or allocated for
    weights that do not fit the model."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            if found != shapes:
                raise DelrecError(f"{path}: weights do not match config.json ({_shape_mismatch(shapes, found)}); "
                                  "the folder was edited or mixed up")
            return {name: handle.get_tensor(name) for name in found}
    except (SafetensorError, OSError) as exc:
        raise DelrecError(f"{path}: not a readable safetensors file ({exc})") from None


def check_dtypes(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse integer or bool tensors for floating parameters: `load_state_dict` would cast them silently, so an
    edited or mixed-up file would score with weights rounded to integers. Another float width is a real choice
    (half-precision exports) and is cast."""
    for name, tensor in tensors.items():
        if expected[name].is_floating_point() and not tensor.is_floating_point():
            raise DelrecError(f"{path}: tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}, expected a "
                              f"floating-point tensor ({str(expected[name].dtype).removeprefix('torch.')}); the file "
                              "was edited or is not this model's weights, train the model again")


def _shape_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str:
    """The tensors missing from the file, those it has in excess, and the first of a wrong shape, with both shapes."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    parts = [f"missing {missing[:3]}"] if missing else []
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    if wrong:
        more = f" ({len(wrong) - 1} more of a wrong shape)" if len(wrong) > 1 else ""
        parts.append(f"'{wrong[0]}' is {list(found[wrong[0]])} in the file, config.json implies "
                     f"{list(expected[wrong[0]])}{more}")
    return "; ".join(parts)
