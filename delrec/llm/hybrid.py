"""LLaRA's hybrid item tokens: each item shown as its title followed by one token carrying its SR embedding.

An item k is written `f"{title} <|item_k|>"` in the stage-2 prompt (history and candidates; the
answer and the scored candidate titles stay plain titles). `<|item_k|>` is an added special token
(one id, `first_token_id + k`), but it has no embedding row: the input embedding module is
wrapped (`HybridEmbedding`) so that the vector of an item token is `projector(sr_item_table[k])`,
a two-layer GELU MLP from the SR model's item space (d_sr) into the LLM's input space, while every
other id is looked up as before, bit for bit. The SR table is a frozen buffer; the projector
trains with LoRA.

Why this layout:
- The ids stay in `input_ids`, so the pre-tokenized instances, the collators, TRL, the KV-cache
  scoring and generation need nothing new; no `inputs_embeds` path.
- No embedding rows are added: the LM head keeps its size, so the log-softmax over the
  vocabulary, which the read-out ranks titles by, is not diluted by N extra outputs, and an item
  token can never be generated.
- The projector is an attribute of the causal LM (`item_projector`, not a child of the embedding
  module) that PEFT's `modules_to_save` wraps: PEFT trains it, writes it (table included) into the
  adapter file of every checkpoint and of the final folder, and `load_adapter` restores it with the
  adapter (best-checkpoint reload, resume). The input-embedding module itself keeps no trainable
  parameter, so the soft prompt's check that the embeddings stay frozen still holds.
- Plain `nn.Parameter`s, not `nn.Linear`: LoRA's `all-linear` must not adapt the projector.
- The SR table is read from the SR folder's files (`config.json`, `model.safetensors`, header in
  `delrec.headers`), not through `delrec.sr`: the LLM layer never imports the SR layer (docs/architecture.md).
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import torch
from torch import nn

from delrec.errors import DelrecError
from delrec.headers import SR_MODEL_CONFIG_FILE as SR_CONFIG
from delrec.headers import SR_MODEL_HEADER as SR_HEADER
from delrec.headers import SR_MODEL_WEIGHTS_FILE as SR_WEIGHTS

PROJECTOR = "item_projector"  # the causal LM's attribute, and PEFT's modules_to_save entry
SR_TABLE_KEY = "item_embedding.weight"  # [N + 1, d]: the SR model's one item-embedding module, pad row N last
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PEFT's save_pretrained writes
RMS_SAMPLE = 4096  # vocabulary rows whose embedding scale the projector's outputs start at


def item_token(item: int) -> str:
    return f"<|item_{item}|>"


def item_text(title: str, item: int) -> str:
    """How a prompt shows item `item`: its title, a space, its item token."""
    return f"{title} {item_token(item)}"


def read_item_table(folder: str | Path, dataset) -> torch.Tensor:
    """The [N, d] float32 item embeddings of an SR model folder trained on `dataset` (the padding row left out)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    expected = f"item_tokens needs an SR model folder trained on {dataset.path} (from `delrec sr train`)"
    if not (folder / SR_CONFIG).is_file() or not (folder / SR_WEIGHTS).is_file():
        raise DelrecError(f"{folder}: not an SR model folder (no {SR_CONFIG} and {SR_WEIGHTS}); {expected}")
    config = SR_HEADER.read(folder / SR_CONFIG)
    if config["num_items"] != dataset.num_items:
        raise DelrecError(f"{folder}: the SR model has {config['num_items']} items, the dataset {dataset.path} has "
                          f"{dataset.num_items}; {expected}")
    if config.get("dataset_fingerprint") not in (None, dataset.fingerprint):
        raise DelrecError(f"{folder}: the SR model was trained on dataset {config['dataset_fingerprint']}, not on "
                          f"{dataset.path} (fingerprint {dataset.fingerprint}); {expected}")
    try:
        with safe_open(str(folder / SR_WEIGHTS), framework="pt") as handle:
            table = handle.get_tensor(SR_TABLE_KEY) if SR_TABLE_KEY in handle.keys() else None
    except (SafetensorError, OSError) as exc:
        raise DelrecError(f"{folder / SR_WEIGHTS}: not a readable safetensors file ({exc})") from None
    if table is None:
        raise DelrecError(f"{folder}: a '{config.get('model_type')}' model has no item embeddings "
                          f"({SR_TABLE_KEY}); item_tokens needs an embedding model such as sasrec or gru4rec")
    if table.ndim != 2 or table.shape[0] != dataset.num_items + 1:
        raise DelrecError(f"{folder / SR_WEIGHTS}: {SR_TABLE_KEY} has shape {list(table.shape)}, expected "
                          f"[{dataset.num_items + 1}, d] (the items and the padding row); the folder is damaged")
    table = table[: dataset.num_items].float()  # row N is the SR model's padding id, never an item
    if not torch.isfinite(table).all() or not table.any():
        raise DelrecError(f"{folder}: the item embeddings are all zero or not finite; train the SR model first")
    return table


class ItemProjector(nn.Module):
    """`GELU(table[k] W_in + b_in) W_out + b_out`: item k's SR embedding in the LLM's input space.

    The table is a persistent buffer (frozen, but saved with the projector, so a stage-2 folder
    does not depend on the SR folder after training).
    """

    def __init__(self, item_table: torch.Tensor, hidden: int, output_dim: int):
        super().__init__()
        self.register_buffer("item_table", item_table)
        input_dim = item_table.shape[1]
        options = {"dtype": item_table.dtype, "device": item_table.device}
        self.weight_in = nn.Parameter(torch.empty(input_dim, hidden, **options))
        self.bias_in = nn.Parameter(torch.zeros(hidden, **options))
        self.weight_out = nn.Parameter(torch.empty(hidden, output_dim, **options))
        self.bias_out = nn.Parameter(torch.zeros(output_dim, **options))

    @classmethod
    def placeholder(cls, num_items: int, input_dim: int, hidden: int, output_dim: int, device) -> "ItemProjector":
        """A projector of the given shape filled with NaN, to be overwritten by a saved one (a missed load shows)."""
        projector = cls(torch.full((num_items, input_dim), math.nan, device=device), hidden, output_dim)
        with torch.no_grad():
            for parameter in projector.parameters():
                parameter.fill_(math.nan)
        return projector

    @torch.no_grad()
    def reset_parameters(self, target_rms: float, seed: int = 0) -> None:
        """Gaussian weights, zero biases, scaled on the table itself: unit-RMS pre-activations (GELU's bend),
        and outputs whose RMS over all items is `target_rms` (the scale of the LLM's own input embeddings)."""
        generator = torch.Generator().manual_seed(seed)
        table = self.item_table
        input_dim, hidden = self.weight_in.shape
        rms_in = table.pow(2).mean().sqrt().item()
        self.weight_in.copy_(torch.randn(input_dim, hidden, generator=generator) / (math.sqrt(input_dim) * rms_in))
        self.weight_out.copy_(torch.randn(hidden, self.weight_out.shape[1], generator=generator) / math.sqrt(hidden))
        self.bias_in.zero_()
        self.bias_out.zero_()
        rms_out = self(torch.arange(table.shape[0], device=table.device)).pow(2).mean().sqrt().item()
        self.weight_out.mul_(target_rms / rms_out)

    @property
    def num_items(self) -> int:
        return self.item_table.shape[0]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.gelu(self.item_table[items] @ self.weight_in + self.bias_in)
        return hidden @ self.weight_out + self.bias_out


class ProjectedEmbedding(nn.Module):
    """An input-embedding module that embeds some ids through a projector held by the causal LM (attribute
    `projector_name`), every other id through the wrapped module. The projector is found on the model at each call,
    so PEFT's wrapper around it (a trained copy) is what runs. `weight` is the wrapped table, so tied LM heads,
    devices and the soft prompt's row operations see the usual matrix. Subclasses: item tokens (here) and the
    per-user soft prompt (`delrec.llm.user_prompt`)."""

    projector_name: str

    def __init__(self, embedding: nn.Module, model: nn.Module):
        super().__init__()
        self.embedding = embedding
        self._model = weakref.ref(model)  # not a submodule: the projector's parameters belong to the model

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def projector(self) -> nn.Module:
        return getattr(self._model(), self.projector_name)


class HybridEmbedding(ProjectedEmbedding):
    """Ids from `first_token_id` on are item tokens: looked up as id 0 (any valid id) and replaced by
    `model.item_projector(id - first)`, cast to the embedding dtype; every other id gives exactly the wrapped
    module's output (Gemma's sqrt(d) scaling included)."""

    projector_name = PROJECTOR

    def __init__(self, embedding: nn.Module, first_token_id: int, model: nn.Module):
        super().__init__(embedding, model)
        self.first_token_id = first_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        items = input_ids >= self.first_token_id
        embeds = self.embedding(input_ids.masked_fill(items, 0))
        # every position goes through the projector: the same graph whatever the batch (DDP), and it is tiny
        projected = self.projector((input_ids - self.first_token_id).clamp(min=0)).to(embeds.dtype)
        return torch.where(items.unsqueeze(-1), projected, embeds)


def attach(model, tokenizer, item_table: torch.Tensor, hidden: int, seed: int = 0) -> int:
    """Add the N item tokens to `tokenizer` (after all its tokens, the soft prompt's included) and a newly
    initialised projector to `model`; return the first item token's id. Call it before the PEFT model is made."""
    first = len(tokenizer)
    _add_tokens(tokenizer, item_table.shape[0])
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    projector = ItemProjector(item_table.to(device), hidden, embedding.embedding_dim)
    projector.reset_parameters(_embedding_rms(embedding, tokenizer, first, seed), seed)
    _install(model, projector, first)
    return first


def load(model, tokenizer, record: dict, folder: str | Path) -> None:
    """Rebuild the item tokens of a stage-2 folder (`record`: its delrec.json `item_tokens`) with a placeholder
    projector, before `PeftModel.from_pretrained` loads the trained one (table included) from the adapter."""
    from safetensors import safe_open

    weights = Path(folder) / ADAPTER_WEIGHTS
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            held = any(f".{PROJECTOR}." in key for key in handle.keys())
        if not held:  # PEFT would fail with a KeyError on the missing modules_to_save tensors
            raise DelrecError(f"{weights}: the adapter holds no trained item projector; re-run `delrec llm finetune` "
                              "with item_tokens")
    first, num_items = record["first_token_id"], record["num_items"]
    tokens = [item_token(k) for k in range(num_items)]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(first, first + num_items)) or len(tokenizer) != first + num_items:
        raise DelrecError(f"{folder}: its tokenizer does not hold the {num_items} item tokens at ids {first}.. that "
                          "delrec.json records; the tokenizer files are not the ones stage 2 wrote")
    embedding = model.get_input_embeddings()
    projector = ItemProjector.placeholder(num_items, record["sr_dim"], record["hidden"], embedding.embedding_dim,
                                          embedding.weight.device)
    _install(model, projector, first)


def check_loaded(model, folder: str | Path) -> None:
    """Refuse a model whose adapter did not restore the projector (its outputs would still be the NaN placeholder)."""
    projector = model.get_input_embeddings().projector
    items = torch.arange(projector.num_items, device=model.get_input_embeddings().weight.device)
    with torch.no_grad():
        if not torch.isfinite(projector(items)).all():
            raise DelrecError(f"{folder}: the adapter holds no trained item projector; re-run `delrec llm finetune` "
                              "with item_tokens")


def _add_tokens(tokenizer, num_items: int) -> None:
    from tokenizers import AddedToken

    if item_token(0) in tokenizer.get_vocab():
        raise DelrecError(f"the tokenizer already holds item tokens ({item_token(0)}); start from the base model's "
                          "tokenizer")
    tokens = [AddedToken(item_token(k), special=True, normalized=False, lstrip=False, rstrip=False)
              for k in range(num_items)]
    tokenizer.add_tokens(tokens, special_tokens=True)


def _install(model, projector: ItemProjector, first: int) -> None:
    setattr(model, PROJECTOR, projector)
    model.set_input_embeddings(HybridEmbedding(model.get_input_embeddings(), first, model))


@torch.no_grad()
def _embedding_rms(embedding: nn.Module, tokenizer, first: int, seed: int) -> float:
    """RMS of what the embedding module outputs for a seeded sample of ordinary vocabulary tokens."""
    added = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    ids = torch.tensor([i for i in range(min(first, embedding.num_embeddings)) if i not in added])
    sample = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:RMS_SAMPLE]]
    return embedding(sample.to(embedding.weight.device)).float().pow(2).mean().sqrt().item()
