"""A tiny local LLM: a BPE tokenizer trained on the dataset, a random Llama/Qwen2, optional pre-training.

No weights can be downloaded here, yet every LLM stage needs a model to run on, in tests, the
demo and CPU benchmarks. This builds one in seconds from a prepared dataset: the tokenizer
knows the item titles and the prompt templates' wording, and a short causal-LM pre-training on
the training histories ("Title A; Title B; ...") teaches it which items co-occur, a stand-in for
a real LLM's knowledge of the catalogue. The result is a plain Hugging Face folder that
`AutoModelForCausalLM` / `AutoTokenizer` (and vLLM) load with no delrec code.

Heads are 64 wide because the vLLM CPU build supports that head size (16 fails). The Llama is
built with an untied LM head, the Qwen2 with tied embeddings (like Qwen2-0.5B), so the tests
cover both layouts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch

from delrec.data.dataset import PreparedDataset
from delrec.config import SEED, above, at_least, between
from delrec.device import torch_threads
from delrec.errors import DelrecError
from delrec.tensors import first_nonfinite
from delrec.prompts import prompts_dir as templates_folder
from delrec.prompts.options import PromptsFolder
from delrec.io import check_apart_from_inputs, is_occupied, replace_directory, staged_directory, write_json

HEAD_DIM = 64
SIZES = {
    "tiny": {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2,
             "intermediate_size": 256},
    "small": {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
              "intermediate_size": 512},
}
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
HISTORY_SEPARATOR = "; "
BUILD_INFO_FILE = "build_info.json"
# Wording of recommendation prompts, so the tokenizer has merges for it even without the template folder.
FALLBACK_PROMPT_TEXT = """\
You are a recommender system. The user has watched, played, listened to or bought these items, \
from the oldest to the most recent: {history}. The most recent item is {item}.
Candidates: {candidates}. Which item will the user choose next? Recommend the next item. \
Answer with the title of one candidate only. Answer: {title}
The recommendation pattern of the SASRec model is: {soft_prompt}. The GRU4Rec and Caser models \
predicted the next item. Based on the recommendation pattern, the model predicted {prediction}.
Example: a user interacted with movies, games, artists and products; the next item the user \
interacted with was the following one. Given the history below, predict the item the model \
recommends. Title, titles, item, items, history, candidate, user, users, next, previous, first, last.
0 1 2 3 4 5 6 7 8 9 10 20 100 1000 2000 . , ; : ! ? ' " ( ) [ ] { } - _ / & + * # @ % $ = < > |
"""


@dataclass
class TinyLLMConfig(PromptsFolder):
    """Shape and pre-training of a tiny local LLM."""

    arch: Literal["llama", "qwen2"] = field(
        default="llama", metadata={"help": "llama: untied LM head; qwen2: tied input/output embeddings."}
    )
    size: Literal["tiny", "small"] = field(
        default="tiny",
        metadata={"help": "tiny: hidden 128, 2 heads, 2 layers; small: hidden 256, 4 heads (2 KV), 4 layers. Heads are 64 wide."},
    )
    vocab_size: int = field(
        default=4096, metadata={"help": "Target BPE vocabulary size (smaller if the text is small).",
                                "range": between(1, 1_000_000)}
    )
    max_position_embeddings: int = field(
        default=2048, metadata={"help": "Longest sequence the model accepts.", "range": between(1, 1_048_576)}
    )
    pretrain_steps: int = field(
        default=0, metadata={"help": "Causal-LM steps on the training histories as title sequences (0: random model).",
                             "range": at_least(0)}
    )
    batch_size: int = field(default=16, metadata={"help": "Pre-training sequences per step.", "range": at_least(1)})
    block_size: int = field(
        default=256, metadata={"help": "Pre-training sequence length in tokens (at most max_position_embeddings).",
                               "range": at_least(1)}
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak AdamW learning rate (warm-up, cosine decay).", "range": above(0)}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the initialisation and the pre-training batches.", "range": SEED}
    )
    threads: int = field(
        default=1,
        metadata={"help": "CPU threads for pre-training; matrices this small gain little from more threads, and "
                  "on busy shared cores a second thread made each step several times slower.",
                  "range": between(1, 1024)},
    )

    def __post_init__(self):
        for name in ("vocab_size", "max_position_embeddings", "batch_size", "block_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be 0 or more, got {self.pretrain_steps}")
        if self.block_size > self.max_position_embeddings:
            raise ValueError("block_size cannot exceed max_position_embeddings")


def build_tiny_llm(data: str | Path, out: str | Path, config: TinyLLMConfig, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Build the tokenizer and model from the prepared dataset `data`, write them to `out`; return build info."""
    out = Path(out)
    check_apart_from_inputs(out, {"dataset": data}, "the model")
    if is_occupied(out) and not overwrite:
        raise DelrecError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    started = time.perf_counter()
    dataset = PreparedDataset.load(data)
    tokenizer = train_tokenizer(tokenizer_corpus(dataset.titles, config.prompts_dir), config)
    model = build_model(tokenizer, config)
    training = pretrain(model, tokenizer, history_texts(dataset), config, progress) if config.pretrain_steps else {}
    model_config = model.config
    info = {
        "kind": "delrec-tiny-llm",
        "arch": config.arch,
        "size": config.size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "hidden_size": model_config.hidden_size,
        "num_hidden_layers": model_config.num_hidden_layers,
        "num_attention_heads": model_config.num_attention_heads,
        "head_dim": HEAD_DIM,
        "tie_word_embeddings": config.arch == "qwen2",
        "pretrain_steps": config.pretrain_steps,
        **training,
        "dataset": {"path": str(dataset.path), "fingerprint": dataset.fingerprint},
        "config": vars(config).copy(),
    }
    with staged_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["seconds"] = round(time.perf_counter() - started, 2)
        write_json(tmp / BUILD_INFO_FILE, info)
        replace_directory(tmp, out)
    return info


def tokenizer_corpus(titles: Iterable[str], prompts_dir: str | None) -> list[str]:
    """The tokenizer's training text: item titles, every file under the templates folder, and the fallback wording."""
    texts = list(titles)
    folder = templates_folder(prompts_dir)
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        texts.append(file.read_text(encoding="utf-8", errors="replace"))
    texts.append(FALLBACK_PROMPT_TEXT)
    return texts


def train_tokenizer(texts: list[str], config: TinyLLMConfig):
    """A byte-level BPE tokenizer (every string encodes, no unknowns) with digits split one by one.

    The Llama tokenizer prepends BOS to every encoding and the Qwen2 one does not, as in the real
    families, so downstream code is exercised with both conventions.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=config.arch == "llama",
        model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, config: TinyLLMConfig):
    """A randomly initialised LlamaForCausalLM or Qwen2ForCausalLM sized for `tokenizer`, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = SIZES[config.size]
    assert shape["hidden_size"] == HEAD_DIM * shape["num_attention_heads"]
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, head_dim=HEAD_DIM, **common))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    return model.float()


def history_texts(dataset: PreparedDataset) -> list[str]:
    """The training split's item sequences (history + target), each as "Title A; Title B; ...".

    Rows datasets (LLaRA-style) store a user as many instances, each a prefix or a sliding window
    of the sequence plus its next item; an instance that continues the previous one by exactly one
    item extends it instead of starting a new text, so each user's sequence is read once, whole.
    """
    sequences: list[list[int]] = []
    for inst in dataset.instances("train"):
        items = [*inst.history, inst.target]
        overlap = items[:-1]
        if sequences and overlap and len(overlap) <= len(sequences[-1]) and sequences[-1][-len(overlap):] == overlap:
            sequences[-1].append(inst.target)
        else:
            sequences.append(items)
    titles = dataset.titles
    return [HISTORY_SEPARATOR.join(titles[i] for i in seq) for seq in sequences]


def pretrain(model, tokenizer, texts: list[str], config: TinyLLMConfig, progress: bool = True) -> dict:
    """Train `model` as a causal LM on `texts` packed into blocks; return loss statistics.

    Texts are encoded the way prompts will be (BOS where the tokenizer adds one), ended with EOS,
    concatenated and cut into `block_size` blocks; batches are drawn in a seeded order, epoch by epoch.
    `final_loss` is the mean over the last steps (up to 10), less noisy than the last step alone.
    """
    from transformers import get_cosine_schedule_with_warmup

    stream = [t for ids in tokenizer(texts).input_ids for t in ids + [tokenizer.eos_token_id]]
    block = min(config.block_size, len(stream))
    if block < 2:
        raise DelrecError("the training split has no text to pre-train on; use --pretrain_steps 0")
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    batch_size = min(config.batch_size, len(blocks))
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, config.pretrain_steps // 10)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.pretrain_steps)

    with torch_threads(config.threads):
        losses = _train(model, blocks, batch_size, optimizer, scheduler, generator, config.pretrain_steps, progress)
    _check_converged(model, losses, config)
    tail = losses[-max(1, min(10, len(losses) // 10)):]
    return {
        "pretrain_tokens": len(stream),
        "pretrain_epochs": round(config.pretrain_steps * batch_size / len(blocks), 2),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "final_perplexity": round(math.exp(sum(tail) / len(tail)), 2),
    }


def _check_converged(model, losses: list[float], config: TinyLLMConfig) -> None:
    """Refuse a pre-training whose loss or weights became NaN or inf: the model would score everything NaN, and its
    build_info would report the loss of the steps before the weights broke (the last update comes after it)."""
    step = next((i + 1 for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    broken = first_nonfinite(model.named_parameters())
    if step is None and broken is None:
        return
    found = (f"the loss of step {step} of {len(losses)} is not finite" if step else
             f"after {len(losses)} steps, tensor '{broken[0]}' holds NaN/inf values")
    raise DelrecError(f"pre-training diverged with learning_rate {config.learning_rate:g}: {found}; nothing was "
                      f"written: lower --learning_rate (default {TinyLLMConfig.learning_rate:g})")


def _train(model, blocks, batch_size, optimizer, scheduler, generator, steps: int, progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    model.train()
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(steps), desc="pre-training", disable=not progress)
    for _ in bar:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        batch, order = blocks[order[:batch_size]], order[batch_size:]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
