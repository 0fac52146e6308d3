"""Soft prompts as added tokens: P special tokens whose input-embedding rows are the soft prompt.

Why this design (DESIGN.md, "Soft prompts, concretely"): the learned vectors live in ordinary
vocabulary rows, so a template marks the slot with plain text (`placeholder_text()`), stage 1
trains only those rows, stage 2 freezes them while LoRA trains, and a merged export is a plain
Hugging Face folder that vLLM serves with no custom code. Each soft prompt has a name (one per SR
model), so several coexist in one tokenizer: `<|sp:sasrec:0|>` .. `<|sp:sasrec:99|>`,
`<|sp:gru4rec:0|>` ...

Training only P rows of a 262k-row matrix (Gemma) must not cost a gradient of the whole matrix:
`train_only_soft_prompt` freezes the matrix and trains a float32 master copy of the P rows (a
parameter of the embedding layer, so DDP averages its gradient), which a forward hook puts at the
soft positions of the embedding layer's output, with the layer's own scale (Gemma multiplies
embeddings by sqrt(hidden)). The matrix's rows follow the master copy after each optimizer step,
so the LM head of a tied model, saving and evaluation read the current rows. The dense
alternative (the whole matrix trainable, a gradient mask on the other rows) spent 45% of a Gemma
stage-1 step writing, masking and adding [262k, 640] gradients (benchmarks/RESULTS.md, "The real
LLM at its FLOP floor"). With tied input/output embeddings the rows act in the LM head too, but
train from the input side only: the output-side gradient (pushing down the probability of
emitting a soft token) is not the soft prompt's job. Weight decay stays 0 (`check_optimizer`),
DELRec's setting. Tied embeddings keep their tie: the soft rows are the LM head's rows for those
tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch

from delrec.errors import DelrecError
from delrec.io import atomic_write, safetensors_bytes
from delrec.llm.files import SOFT_PROMPT_FILE
from delrec.tensors import first_nonfinite
from delrec.llm.loading import resize_embeddings

FILE_FORMAT = "delrec-soft-prompt"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def soft_token(name: str, index: int) -> str:
    return f"<|sp:{name}:{index}|>"


class SoftPrompt:
    """A named soft prompt of `num_tokens` vectors; attach it with `add_to` (new) or `load` (saved)."""

    def __init__(self, name: str, num_tokens: int):
        if not NAME_PATTERN.match(name):
            raise DelrecError(f"soft prompt name '{name}': use letters, digits, '_', '.' or '-' (e.g. the SR model's name)")
        if num_tokens < 1:
            raise DelrecError(f"soft prompt '{name}': num_tokens must be at least 1, got {num_tokens}")
        self.name = name
        self.num_tokens = num_tokens
        self._token_ids: list[int] | None = None
        self._hook = None
        self._master: torch.nn.Parameter | None = None  # the float32 rows being trained (train_only_soft_prompt)

    def __repr__(self) -> str:
        return f"SoftPrompt({self.name!r}, {self.num_tokens})"

    @property
    def tokens(self) -> list[str]:
        return [soft_token(self.name, i) for i in range(self.num_tokens)]

    @property
    def master_rows(self) -> torch.nn.Parameter:
        """The float32 rows `train_only_soft_prompt` trains (the optimiser's one parameter)."""
        if self._master is None:
            raise RuntimeError(f"{self!r} is not being trained; call train_only_soft_prompt() first")
        return self._master

    @property
    def token_ids(self) -> list[int]:
        if self._token_ids is None:
            raise RuntimeError(f"{self!r} is not attached to a tokenizer yet; call add_to() or SoftPrompt.load()")
        return self._token_ids

    def placeholder_text(self) -> str:
        """What a template's `soft_prompt` slot receives: the P tokens with no spaces, so it encodes to exactly P ids."""
        return "".join(self.tokens)

    def add_to(self, model, tokenizer, init: Literal["vocab", "random"] = "vocab", seed: int = 0) -> "SoftPrompt":
        """Add the tokens to `tokenizer` and `model` and initialise their rows.

        `vocab` copies the embeddings of P distinct real tokens (a seeded sample; better than
        random per DELRec, and unlike mean-resizing it keeps the P vectors apart); `random` draws
        them with the scale of the existing rows.
        """
        if init not in ("vocab", "random"):
            raise DelrecError(f"soft prompt init must be vocab or random, got '{init}'")
        held = _held_tokens(tokenizer, self.name)
        if held:
            raise DelrecError(
                f"the tokenizer already holds soft prompt '{self.name}' ({held} tokens); "
                "load it with SoftPrompt.load, or choose another name"
            )
        pool = real_token_ids(tokenizer, model.get_input_embeddings().num_embeddings)
        if init == "vocab" and len(pool) < self.num_tokens:
            raise DelrecError(
                f"soft prompt '{self.name}': {self.num_tokens} tokens need as many distinct vocabulary tokens "
                f"to start from, the tokenizer has {len(pool)}; use init='random' or fewer tokens"
            )
        self._attach(model, tokenizer)
        generator = torch.Generator().manual_seed(seed)
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            if init == "vocab":
                sources = pool[torch.randperm(len(pool), generator=generator)[: self.num_tokens]]
                rows = weight[sources.to(weight.device)].clone()
            else:
                scale = weight[pool.to(weight.device)].float().std().item()
                rows = torch.randn(self.num_tokens, weight.shape[1], generator=generator) * scale
            weight[self.token_ids] = rows.to(weight.device, weight.dtype)
        return self

    def _attach(self, model, tokenizer) -> None:
        """Add the tokens (special: never split, never normalised) and grow the embeddings if needed."""
        from tokenizers import AddedToken

        added = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in self.tokens]
        tokenizer.add_tokens(added, special_tokens=True)
        self._token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        resize_embeddings(model, len(tokenizer))

    def rows(self, model) -> torch.Tensor:
        """A detached copy of the P soft-prompt vectors, shape [P, hidden] (the float32 master copy while training)."""
        if self._master is not None:
            return self._master.detach().clone()
        return model.get_input_embeddings().weight[self.token_ids].detach().clone()

    def set_rows(self, model, rows: torch.Tensor) -> None:
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.token_ids] = rows.to(weight.device, weight.dtype)
            if self._master is not None:
                self._master.copy_(rows)

    def trained_parameters(self, model) -> list[torch.nn.Parameter]:
        """Stage 1's parameters: the float32 master rows (`train_only_soft_prompt`)."""
        return [self.train_only_soft_prompt(model)]

    def train_only_soft_prompt(self, model) -> torch.nn.Parameter:
        """Freeze every parameter and train a float32 master copy of this prompt's rows instead.

        Returns that parameter [P, hidden], the one thing to give the optimiser (with weight decay 0).
        """
        self._remove_hook(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        embedding = model.get_input_embeddings()
        weight = embedding.weight
        ids = torch.tensor(self.token_ids, device=weight.device)
        scale = getattr(embedding, "embed_scale", 1.0)
        scale = float(scale.to(weight.dtype)) if torch.is_tensor(scale) else float(scale)
        with torch.no_grad():
            if not torch.equal(embedding(ids), (weight[ids] * scale).to(weight.dtype)):
                raise DelrecError(f"{type(embedding).__name__}: the input embedding layer transforms its rows beyond "
                                  "a scale, so soft-prompt rows cannot be trained apart from it")
        master = torch.nn.Parameter(weight[ids].detach().float().clone())
        embedding.register_parameter("soft_prompt_rows", master)
        slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slots[ids] = torch.arange(len(ids), device=weight.device)
        synced = {"version": None}

        def put_rows(module, args, output):
            """The master rows at the soft positions; the matrix's rows follow them once per optimizer step."""
            if synced["version"] != master._version:  # not on every call: a pass may hold the matrix for backward
                with torch.no_grad():
                    weight[ids] = master.to(weight.dtype)
                synced["version"] = master._version
            slot = slots[args[0]]
            at = slot >= 0
            if not at.any():
                return None
            return output.index_put((at,), (master[slot[at]] * scale).to(output.dtype))

        self._master = master
        self._hook = embedding.register_forward_hook(put_rows)
        return master

    def freeze(self, model) -> None:
        """Fix the soft-prompt rows (stage 2): the input embeddings stop training, whatever wraps the model."""
        self._remove_hook(model)
        embedding = model.get_input_embeddings()
        embedding.weight.requires_grad_(False)
        trainable = [name for name, p in embedding.named_parameters() if p.requires_grad]
        if trainable:
            raise DelrecError(
                f"the input embeddings still train through {', '.join(trainable)} (a PEFT adapter on the embedding "
                "layer); the soft prompt must stay fixed: leave embed_tokens out of the LoRA target modules"
            )

    def check_optimizer(self, optimizer, model) -> None:
        """Refuse an optimiser that decays the soft rows or the embedding matrix (DELRec trains them without decay)."""
        trained = [model.get_input_embeddings().weight, self._master]
        for group in optimizer.param_groups:
            if any(p is q for p in group["params"] for q in trained) and group.get("weight_decay", 0.0) != 0.0:
                raise DelrecError(
                    f"soft prompt '{self.name}': training it needs weight_decay 0, got {group['weight_decay']} "
                    "(decay would pull the soft rows towards zero whatever the task says); set weight_decay to 0"
                )

    def _remove_hook(self, model=None) -> None:
        """End training of the master rows: the matrix keeps their last values."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._master is not None and model is not None:
            embedding = model.get_input_embeddings()
            with torch.no_grad():
                embedding.weight[self.token_ids] = self._master.to(embedding.weight.dtype)
            if getattr(embedding, "soft_prompt_rows", None) is self._master:
                del embedding.soft_prompt_rows
            self._master = None

    def save(self, folder: str | Path, model) -> Path:
        """Write `soft_prompt.safetensors`: the P x hidden rows (float32) and what they belong to."""
        rows = self.rows(model).float().cpu().contiguous()
        metadata = {
            "format": FILE_FORMAT,
            "version": "1",
            "name": self.name,
            "num_tokens": str(self.num_tokens),
            "hidden_size": str(rows.shape[1]),
            "tokens": json.dumps(self.tokens),
        }
        path = Path(folder) / SOFT_PROMPT_FILE
        with atomic_write(path, "wb") as handle:
            handle.write(safetensors_bytes({"embeddings": rows}, metadata=metadata))
        return path

    def restore(self, folder: str | Path, model) -> None:
        """Set this (attached) prompt's rows, the float32 master copy included, from a file it saved (resuming)."""
        path = Path(folder)
        path = path / SOFT_PROMPT_FILE if path.is_dir() else path
        name, rows = _read_file(path)
        if name != self.name or rows.shape[0] != self.num_tokens:
            raise DelrecError(f"{path}: holds soft prompt '{name}' ({rows.shape[0]} tokens), this run trains "
                              f"'{self.name}' ({self.num_tokens} tokens)")
        self.set_rows(model, rows)

    @classmethod
    def load(cls, folder: str | Path, model, tokenizer, num_tokens: int | None = None) -> "SoftPrompt":
        """Read a saved soft prompt, add its tokens (unless the tokenizer has them) and set its rows exactly.

        `num_tokens`, when given, is the size the caller expects (e.g. from delrec.json).
        """
        path = Path(folder)
        path = path / SOFT_PROMPT_FILE if path.is_dir() else path
        name, rows = _read_file(path)
        if num_tokens is not None and rows.shape[0] != num_tokens:
            raise DelrecError(f"{path}: soft prompt '{name}' has {rows.shape[0]} tokens, expected {num_tokens}")
        hidden = model.get_input_embeddings().embedding_dim
        if rows.shape[1] != hidden:
            raise DelrecError(
                f"{path}: soft prompt hidden size {rows.shape[1]}, but the model's is {hidden} "
                "(it was trained for another model)"
            )
        prompt = cls(name, rows.shape[0])
        held = _held_tokens(tokenizer, name)
        if held == 0:
            prompt._attach(model, tokenizer)
        elif held == prompt.num_tokens and all(t in tokenizer.added_tokens_encoder for t in prompt.tokens):
            prompt._token_ids = tokenizer.convert_tokens_to_ids(prompt.tokens)
            resize_embeddings(model, max(prompt._token_ids) + 1)
        else:
            raise DelrecError(
                f"{path}: the tokenizer already holds {held} tokens of soft prompt '{name}', the file has "
                f"{prompt.num_tokens}; load it into the base model's tokenizer"
            )
        prompt.set_rows(model, rows)
        return prompt


def _read_file(path: Path) -> tuple[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise DelrecError(f"{path}: soft prompt file not found; train one first (DELRec stage 1)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            rows = handle.get_tensor("embeddings") if "embeddings" in handle.keys() else None
    except (SafetensorError, OSError) as exc:
        raise DelrecError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FILE_FORMAT or rows is None:
        raise DelrecError(f"{path}: not a delrec soft-prompt file (metadata format should be '{FILE_FORMAT}')")
    try:
        expected = (int(metadata["num_tokens"]), int(metadata["hidden_size"]))
        name = metadata["name"]
    except (KeyError, ValueError):
        raise DelrecError(f"{path}: soft-prompt metadata lacks name, num_tokens or hidden_size") from None
    if not rows.is_floating_point():
        raise DelrecError(f"{path}: embeddings of dtype {rows.dtype}, expected floating-point soft-prompt rows (damaged "
                          "file)")
    if rows.ndim != 2 or tuple(rows.shape) != expected:
        raise DelrecError(f"{path}: embeddings of shape {list(rows.shape)}, its metadata says {list(expected)} (damaged file)")
    if first_nonfinite([("embeddings", rows)]):
        raise DelrecError(f"{path}: the soft-prompt rows hold NaN or inf values (the training that wrote them diverged, "
                          "or the file is damaged); copy it again, or re-run stage 1 (with a lower learning_rate if it "
                          "diverged)")
    return name, rows


def _held_tokens(tokenizer, name: str) -> int:
    """How many tokens of soft prompt `name` the tokenizer already has."""
    prefix = f"<|sp:{name}:"
    return sum(1 for token in tokenizer.added_tokens_encoder if token.startswith(prefix))


def real_token_ids(tokenizer, num_rows: int) -> torch.Tensor:
    """Ids of ordinary vocabulary tokens (no special or added tokens) that have an embedding row."""
    added = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(min(len(tokenizer), num_rows)) if i not in added], dtype=torch.long)
