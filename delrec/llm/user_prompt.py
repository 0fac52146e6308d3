"""A per-user soft prompt: P vectors computed from the SR model's representation of this user's history.

DELRec's soft prompt is one set of P vectors shared by every user (`delrec.llm.soft_prompt`), so at
best it carries how the SR model ranks in general. The per-user prompt fills the same template slot
with P vectors that depend on the user: with s the SR model's state of the history (SASRec's last
hidden state, `delrec sr predict --user_states`) and LN a layer norm without parameters,

    v_j(s) = scale * (base_j + LN(s) @ W[:, j] / d)        j = 1..P,  W: [d, P * hidden]

`scale` is the embedding layer's own (Gemma multiplies rows by sqrt(hidden)), so `base` lives where
vocabulary rows live and starts as P of them, as the global prompt does; W starts at zero, so an
untrained per-user prompt IS a global one and training can only add what the state tells. The 1/d
keeps one Adam step (every weight moves about `lr`) from moving a user's offset further than a base
row moves (|LN(s)|_1 <= d). RPS becomes learnable: the SR model's top-1 is a function of s.

Layout, as LLaRA's item tokens (`delrec.llm.hybrid`): P added special tokens `<|up:NAME:j|>` with no
embedding rows (the LM head keeps its size); the input-embedding module is wrapped
(`UserPromptEmbedding`) so that token j of batch row b is embedded as v_j(states[b]), every other id
exactly as before. The states of a batch are handed to the wrapper for one forward pass
(`reading_states`): the collators put each row's state beside its ids, the trainers and the read-out
pass them on (`delrec rank --predictions`, `delrec teacher export --mode rerank --predictions`). The
projector is the causal LM's attribute `user_projector` (plain parameters, so LoRA's
`all-linear` leaves it alone; PEFT's `modules_to_save` co-trains it in stage 2). A merged export has
no room for a function of the user, so it is refused (`delrec.llm.merge`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from delrec.errors import DelrecError
from delrec.io import atomic_write, safetensors_bytes
from delrec.llm.files import USER_PROMPT_FILE
from delrec.llm.hybrid import ProjectedEmbedding
from delrec.llm.soft_prompt import NAME_PATTERN, real_token_ids
from delrec.tensors import first_nonfinite

FILE_FORMAT = "delrec-user-prompt"
PROJECTOR = "user_projector"  # the causal LM's attribute, and PEFT's modules_to_save entry when co-trained


def user_token(name: str, index: int) -> str:
    return f"<|up:{name}:{index}|>"


class UserProjector(nn.Module):
    """states [B, d] -> the P per-user vectors [B, P, hidden] (module docstring), in float32."""

    def __init__(self, num_tokens: int, state_dim: int, hidden: int, scale: float):
        super().__init__()
        self.base = nn.Parameter(torch.zeros(num_tokens, hidden))
        self.weight = nn.Parameter(torch.zeros(state_dim, num_tokens * hidden))
        self.scale = scale

    @property
    def num_tokens(self) -> int:
        return self.base.shape[0]

    @property
    def state_dim(self) -> int:
        return self.weight.shape[0]

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        normed = nn.functional.layer_norm(states.to(self.weight.device, torch.float32), (self.state_dim,))
        offsets = (normed @ self.weight).view(len(states), *self.base.shape) / self.state_dim
        return self.scale * (self.base + offsets)


class UserPromptEmbedding(ProjectedEmbedding):
    """The model's input-embedding module, with the P user-prompt ids embedded from the batch's states.

    Ids `first_token_id .. first_token_id + P - 1` are looked up as id 0 (any valid id) and replaced by
    `model.user_projector(states)[row, j]`; every other id gives exactly the wrapped module's output.
    """

    projector_name = PROJECTOR

    def __init__(self, embedding: nn.Module, first_token_id: int, num_tokens: int, model: nn.Module):
        super().__init__(embedding, model)
        self.first_token_id = first_token_id
        self.num_tokens = num_tokens
        self.states: torch.Tensor | None = None  # set for one forward pass by `reading_states`

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots = input_ids - self.first_token_id
        at = (slots >= 0) & (slots < self.num_tokens)
        if not at.any():
            return self.embedding(input_ids)
        if self.states is None or len(self.states) != len(input_ids):
            got = "none" if self.states is None else f"{len(self.states)}"
            raise DelrecError(f"the prompts hold a per-user soft prompt, which needs the SR model's state of each of "
                              f"the {len(input_ids)} prompts in this pass (got {got}); pass the user states (`delrec "
                              "sr predict --user_states`) with the prompts")
        embeds = self.embedding(input_ids.masked_fill(at, 0))
        vectors = self.projector(self.states)  # [B, P, hidden]
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(input_ids)
        return embeds.index_put((at,), vectors[rows[at], slots[at]].to(embeds.dtype))


@contextlib.contextmanager
def reading_states(model, states: torch.Tensor | None):
    """Hand `states` [B, d] (row b: the state of prompt b) to the model's per-user prompt for the passes inside;
    nothing to do when `states` is None."""
    if states is None:
        yield
        return
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, UserPromptEmbedding):
        raise DelrecError("user states were given, but the model reads no per-user soft prompt (train one with "
                          "`delrec llm distill-pattern --soft_prompt user`)")
    previous, embedding.states = embedding.states, states
    try:
        yield
    finally:
        embedding.states = previous


def with_user_states(batch: dict, examples: list[dict]) -> dict:
    """A collator's `batch` with the rows' SR user states (`user_states` [B, d]) when they carry them."""
    if "user_state" in examples[0]:
        batch["user_states"] = torch.tensor([e["user_state"] for e in examples], dtype=torch.float32)
    return batch


class UserPrompt:
    """A named per-user soft prompt of `num_tokens` vectors; attach it with `add_to` (new) or `load` (saved)."""

    def __init__(self, name: str, num_tokens: int):
        if not NAME_PATTERN.match(name):
            raise DelrecError(f"user prompt name '{name}': use letters, digits, '_', '.' or '-' (e.g. the SR model's "
                              "name)")
        if num_tokens < 1:
            raise DelrecError(f"user prompt '{name}': num_tokens must be at least 1, got {num_tokens}")
        self.name = name
        self.num_tokens = num_tokens
        self.item_table_sha256: str | None = None  # the SR model whose states it reads (its item table's digest)
        self._token_ids: list[int] | None = None

    def __repr__(self) -> str:
        return f"UserPrompt({self.name!r}, {self.num_tokens})"

    @property
    def tokens(self) -> list[str]:
        return [user_token(self.name, i) for i in range(self.num_tokens)]

    @property
    def token_ids(self) -> list[int]:
        if self._token_ids is None:
            raise RuntimeError(f"{self!r} is not attached to a model yet; call add_to() or UserPrompt.load()")
        return self._token_ids

    def placeholder_text(self) -> str:
        """What a template's `soft_prompt` slot receives: the P tokens with no spaces (exactly P ids)."""
        return "".join(self.tokens)

    def add_to(self, model, tokenizer, state_dim: int, item_table_sha256: str, seed: int = 0) -> "UserPrompt":
        """Attach a new projector for the states (size `state_dim`) of the SR model whose item table has the digest
        `item_table_sha256`: `base` = P distinct vocabulary rows (a seeded sample, DELRec's init of the global
        prompt), W = 0."""
        embedding = model.get_input_embeddings()
        pool = real_token_ids(tokenizer, embedding.num_embeddings)
        if len(pool) < self.num_tokens:
            raise DelrecError(f"user prompt '{self.name}': {self.num_tokens} tokens need as many distinct vocabulary "
                              f"tokens to start from, the tokenizer has {len(pool)}; use fewer tokens")
        projector = self._install(model, tokenizer, state_dim)
        self.item_table_sha256 = item_table_sha256
        sources = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[: self.num_tokens]]
        with torch.no_grad():
            projector.base.copy_(embedding.weight[sources.to(embedding.weight.device)].float())
        return self

    def _install(self, model, tokenizer, state_dim: int) -> UserProjector:
        """Add the tokens (after all the tokenizer's tokens, unless it holds them there) and a zero projector."""
        from tokenizers import AddedToken

        if isinstance(model.get_input_embeddings(), UserPromptEmbedding):
            raise DelrecError(f"the model already reads a per-user soft prompt; load {self!r} into the base model")
        held = [t for t in tokenizer.added_tokens_encoder if t.startswith(f"<|up:{self.name}:")]
        if not held:
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
                                  for t in self.tokens], special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        first = ids[0]
        if ids != list(range(first, first + self.num_tokens)) or len(tokenizer) != first + self.num_tokens:
            raise DelrecError(f"the tokenizer holds {len(held)} tokens of user prompt '{self.name}' that are not its "
                              f"last {self.num_tokens} tokens; start from the base model's tokenizer")
        embedding = model.get_input_embeddings()
        if first < embedding.num_embeddings:
            raise DelrecError(f"the model has an embedding row for id {first}, where user prompt '{self.name}' "
                              "starts; its tokens must come after every row (start from the base model)")
        scale = getattr(embedding, "embed_scale", 1.0)
        scale = float(scale.to(embedding.weight.dtype)) if torch.is_tensor(scale) else float(scale)
        with torch.no_grad():
            probe = torch.arange(min(8, embedding.num_embeddings), device=embedding.weight.device)
            if not torch.equal(embedding(probe), (embedding.weight[probe] * scale).to(embedding.weight.dtype)):
                raise DelrecError(f"{type(embedding).__name__}: the input embedding layer transforms its rows beyond "
                                  "a scale, so a per-user prompt cannot stand in for its rows")
        projector = UserProjector(self.num_tokens, state_dim, embedding.embedding_dim, scale).to(
            embedding.weight.device)
        setattr(model, PROJECTOR, projector)
        model.set_input_embeddings(UserPromptEmbedding(embedding, first, self.num_tokens, model))
        self._token_ids = ids
        return projector

    def trained_parameters(self, model) -> list[nn.Parameter]:
        """Freeze every parameter but the projector's (stage 1); return those, the optimiser's parameters."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        projector = getattr(model, PROJECTOR)
        for parameter in projector.parameters():
            parameter.requires_grad_(True)
        return list(projector.parameters())

    def check_optimizer(self, optimizer, model) -> None:
        """Refuse weight decay on the projector (it would pull every user towards the zero offset and `base` to 0)."""
        trained = list(getattr(model, PROJECTOR).parameters())
        for group in optimizer.param_groups:
            if any(p is q for p in group["params"] for q in trained) and group.get("weight_decay", 0.0) != 0.0:
                raise DelrecError(f"user prompt '{self.name}': training it needs weight_decay 0, got "
                                  f"{group['weight_decay']}; set weight_decay to 0")

    def save(self, folder: str | Path, model) -> Path:
        """Write `user_prompt.safetensors`: base [P, hidden], W [d, P * hidden] (float32) and what they belong to:
        the SR model whose states they read is named by the SHA-256 of its item table."""
        projector = _unwrapped(getattr(model, PROJECTOR))
        metadata = {
            "format": FILE_FORMAT, "version": "1", "name": self.name, "num_tokens": str(self.num_tokens),
            "hidden_size": str(projector.base.shape[1]), "state_dim": str(projector.state_dim),
            "scale": repr(projector.scale), "item_table_sha256": self.item_table_sha256,
            "tokens": json.dumps(self.tokens),
        }
        tensors = {"base": projector.base.detach().float().cpu().contiguous(),
                   "weight": projector.weight.detach().float().cpu().contiguous()}
        path = Path(folder) / USER_PROMPT_FILE
        with atomic_write(path, "wb") as handle:
            handle.write(safetensors_bytes(tensors, metadata=metadata))
        return path

    def restore(self, folder: str | Path, model) -> None:
        """Set the attached projector from a file this prompt saved (resuming, the best checkpoint)."""
        path = _file(folder)
        metadata, tensors = read_file(path)
        projector = _unwrapped(getattr(model, PROJECTOR))
        if metadata["name"] != self.name or tensors["base"].shape != projector.base.shape \
                or tensors["weight"].shape != projector.weight.shape:
            raise DelrecError(f"{path}: holds user prompt '{metadata['name']}' of shape "
                              f"{list(tensors['weight'].shape)}, this run trains '{self.name}' of shape "
                              f"{list(projector.weight.shape)}")
        with torch.no_grad():
            projector.base.copy_(tensors["base"])
            projector.weight.copy_(tensors["weight"])

    @classmethod
    def load(cls, folder: str | Path, model, tokenizer) -> "UserPrompt":
        """Attach a saved per-user prompt to `model` (its tokens added unless the tokenizer holds them)."""
        path = _file(folder)
        metadata, tensors = read_file(path)
        hidden = model.get_input_embeddings().embedding_dim
        if int(metadata["hidden_size"]) != hidden:
            raise DelrecError(f"{path}: user prompt hidden size {metadata['hidden_size']}, but the model's is {hidden} "
                              "(it was trained for another model)")
        prompt = cls(metadata["name"], int(metadata["num_tokens"]))
        prompt._install(model, tokenizer, int(metadata["state_dim"]))
        prompt.item_table_sha256 = metadata["item_table_sha256"]
        prompt.restore(path, model)
        return prompt


def _file(folder: str | Path) -> Path:
    path = Path(folder)
    return path / USER_PROMPT_FILE if path.is_dir() else path


def _unwrapped(module: nn.Module) -> UserProjector:
    """The projector itself, or the trained copy of PEFT's `modules_to_save` wrapper around it."""
    if isinstance(module, UserProjector):
        return module
    active = getattr(module, "modules_to_save", {})
    for name in getattr(module, "active_adapters", ["default"]):
        if name in active:
            return active[name]
    return module.original_module


def read_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a `user_prompt.safetensors`, checked: one line naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise DelrecError(f"{path}: user prompt file not found; train one first (`delrec llm distill-pattern "
                          "--soft_prompt user`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in ("base", "weight") if key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise DelrecError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FILE_FORMAT or len(tensors) != 2:
        raise DelrecError(f"{path}: not a delrec user-prompt file (metadata format should be '{FILE_FORMAT}', with "
                          "tensors base and weight)")
    try:
        num_tokens, hidden, state_dim = (int(metadata[k]) for k in ("num_tokens", "hidden_size", "state_dim"))
        float(metadata["scale"])
    except (KeyError, ValueError):
        num_tokens = None
    if num_tokens is None or not all(isinstance(metadata.get(k), str) for k in ("name", "item_table_sha256")):
        raise DelrecError(f"{path}: user-prompt metadata lacks name, num_tokens, hidden_size, state_dim, scale or "
                          "item_table_sha256")
    expected = {"base": (num_tokens, hidden), "weight": (state_dim, num_tokens * hidden)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
            raise DelrecError(f"{path}: {key} of shape {list(tensors[key].shape)}, its metadata says {list(shape)} "
                              "(damaged file)")
    bad = first_nonfinite(list(tensors.items()))
    if bad:
        raise DelrecError(f"{path}: {bad[0]} holds NaN or inf values (the training that wrote it diverged, or the "
                          "file is damaged); re-run stage 1")
    return metadata, {key: value.float() for key, value in tensors.items()}
