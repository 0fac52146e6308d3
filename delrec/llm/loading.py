"""Load a decoder-only causal LM and its tokenizer, optionally quantised, and put LoRA on it.

One entry point for every LLM stage (soft-prompt distillation, LoRA fine-tuning, ranking,
teacher export), so a hub id, a local folder, a tiny local model and a merged delrec export all
load the same way. Anything the user can fix (a wrong folder, no network, no GPU for 4-bit) is
a one-line `DelrecError` saying what was found and what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from delrec.device import resolve_device
from delrec.llm.architecture import not_a_causal_lm
from delrec.config import DROPOUT, Device, WIDTH, at_least, device_option
from delrec.errors import DelrecError
from delrec.io import read_json
from delrec.llm.files import (INFO_FILE, RUN_FILE, SOFT_PROMPT_FILE, check_loaded_weights, damaged_file,
                              quiet_load_report, summary)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# What each loading step reads, to find the damaged file when it fails (names or glob patterns, in a folder).
CONFIG_READS = ("config.json",)
TOKENIZER_READS = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json")
WEIGHT_READS = ("config.json", "*.index.json", "*.safetensors", "pytorch_model*.bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FALLBACK_PAD_TOKEN = "<|pad|>"
# Measured on Gemma 3 270M, 2 cores (benchmarks/RESULTS.md, "The real LLM at its FLOP floor"): torch's CPU SDPA
# kernel runs head_dim 256 at ~17 GFLOP/s in bfloat16, eager attention's batched products at the GEMM rate.
CPU_ATTENTION = "eager"
TRUST_REMOTE_CODE_HELP = (
    "Run Python code shipped with the model folder (an auto_map in its config or tokenizer files): only for "
    "folders you trust, as you would trust a script from the same place. Only this flag or your own --config "
    "grants it, never a model folder's own delrec.json (docs/security.md)."
)


@dataclass
class ModelConfig:
    """Which causal LM to load and how."""

    model_name_or_path: str = field(
        metadata={"help": "A local model folder (e.g. from `delrec llm build-tiny`) or a Hugging Face Hub id."}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Weight dtype; auto: the checkpoint's (float16 checkpoints become float32 on CPU)."},
    )
    device: Device = device_option(what="Where to load the model")
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantise linear layers to 8 bit (bitsandbytes, CUDA)."})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Quantise linear layers to 4-bit NF4 with double quantisation (QLoRA; CUDA)."}
    )
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "Compute dtype of 4-bit layers."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel, e.g. eager, sdpa, flash_attention_2 (default: eager on CPU, where it "
                  "runs at the matrix-product rate and torch's SDPA kernel does not; transformers' elsewhere)."},
    )

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("choose one of load_in_8bit and load_in_4bit, not both")


# LoraConfig fields delrec sets itself (the task, the modules a stage trains besides LoRA: projectors) or PEFT fills
# in (what the adapter belongs to).
LORA_OWNED = frozenset({"task_type", "modules_to_save", "peft_type", "auto_mapping", "peft_version",
                        "base_model_name_or_path", "revision", "inference_mode"})


@dataclass
class LoraSettings:
    """A PEFT LoRA adapter, under PEFT's own option names (`LoraConfig`); `target_modules=["all-linear"]` adapts every
    linear layer but the LM head. Any other `LoraConfig` field is reached through `lora_options`."""

    r: int = field(default=16, metadata={"help": "LoRA rank.", "range": WIDTH})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling alpha (the update is scaled by lora_alpha / r).",
                              "range": at_least(1)}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input.", "range": DROPOUT})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt (e.g. q_proj v_proj), or all-linear."},
    )
    lora_options: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Any other field of PEFT's LoraConfig by its name, e.g. bias=lora_only use_rslora=true "
                  "(a mapping in YAML); checked against the installed PEFT."},
    )

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA r must be at least 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module (or all-linear)")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ValueError("LoRA target_modules: all-linear already covers every linear layer; give it alone")

    def peft_config(self, modules_to_save: list[str] | None = None):
        """PEFT's `LoraConfig` of a causal LM: the declared fields by name, then `lora_options`, which may name any
        field but those declared here and those delrec sets (`LORA_OWNED`); PEFT's own checks run as it is built."""
        import dataclasses

        from peft import LoraConfig

        declared = {f.name for f in dataclasses.fields(self)} - {"lora_options"}
        extra = dict(self.lora_options or {})
        known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        for name in extra:
            if name in declared:
                raise DelrecError(f"lora_options: {name} is an option of its own; set {name} directly")
            if name in LORA_OWNED or name not in known:
                valid = ", ".join(sorted(known - declared - LORA_OWNED))
                why = "is set by delrec" if name in LORA_OWNED else "is not a field of PEFT's LoraConfig"
                raise DelrecError(f"lora_options: {name} {why}; valid: {valid}")
        targets = "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)
        try:
            return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                              target_modules=targets, task_type="CAUSAL_LM", modules_to_save=modules_to_save, **extra)
        except (TypeError, ValueError) as exc:
            raise DelrecError(f"lora_options {extra}: PEFT refused them ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Without `enabled` (a command's --no_progress), also hide the bars transformers and datasets draw themselves
    (weight loading, dataset maps) while the command runs; they come back after it, for in-process callers."""
    if enabled:
        yield
        return
    import datasets
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown[0]:
            logging.enable_progress_bar()
        if shown[1]:
            datasets.enable_progress_bars()


def load_model(config: ModelConfig):
    """Return `(model, tokenizer)`: a causal LM on the requested device and its tokenizer with a pad token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(config.device)
    quantization = _quantization_config(config, device)
    source = resolve_source(config.model_name_or_path)
    with _explained_load_errors(source, CONFIG_READS):
        hf_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    problem = not_a_causal_lm(hf_config)
    if problem:
        raise DelrecError(
            f"{source} is {problem}, not a decoder-only causal LM; pass a causal LM (Llama, Qwen2, Mistral, GPT-2, ...)"
        )
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in WEIGHT_FILES):
        raise DelrecError(f"{source}: has config.json but no weights (model.safetensors or pytorch_model.bin)")
    tokenizer = load_tokenizer(source, config.trust_remote_code)

    # the load report is read (`check_loaded_weights`), not printed: missing or misshapen tensors are refused
    kwargs = {"trust_remote_code": config.trust_remote_code, "dtype": DTYPES.get(config.dtype, "auto"),
              "output_loading_info": True, "ignore_mismatched_sizes": True}
    attention = config.attn_implementation or (CPU_ATTENTION if device.type == "cpu" else None)
    if attention:
        kwargs["attn_implementation"] = attention
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device}  # bitsandbytes quantises while placing the weights on the GPU
    checked = quantization is None  # bitsandbytes replaces the layers of a quantised load, and their tensors too
    with _explained_load_errors(source, WEIGHT_READS), quiet_load_report() if checked else contextlib.nullcontext():
        model, loading = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if checked:
        folder = Path(source)
        weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), source)
        check_loaded_weights(weights, folder / "config.json" if folder.is_dir() else "its config", loading, model)
        if device.type == "cpu" and config.dtype == "auto" and model.dtype == torch.float16:
            model = model.float()  # many float16 kernels are missing or slow on CPU
        model = model.to(device)
    ensure_pad_token(model, tokenizer)
    return model, tokenizer


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        known = any((folder / name).is_file() for name in ("config.json", "meta.json", INFO_FILE))
        problem = describe_non_model_folder(folder) if known else None  # an SR model or a dataset, say
        if problem:
            raise DelrecError(f"{source} is {problem}")
        raise DelrecError(
            f"{source}: model folder without tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the base model's tokenizer into it (tokenizer.save_pretrained)"
        )
    with _explained_load_errors(source, TOKENIZER_READS):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def _quantization_config(config: ModelConfig, device: torch.device):
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    bits = "4-bit" if config.load_in_4bit else "8-bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DelrecError(
            f"{bits} loading needs bitsandbytes, which is not installed; pip install 'delrec[gpu]' on a CUDA machine"
        )
    if device.type != "cuda":
        reason = "--device cpu was requested" if torch.cuda.is_available() else "this machine has no CUDA GPU"
        raise DelrecError(f"{bits} loading (bitsandbytes) runs on CUDA only, but {reason}; drop the {bits} option")
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[config.bnb_4bit_compute_dtype],
    )


def resolve_source(name: str) -> str:
    """Return a local folder, or a hub id to fetch; say what a local path is when it is not a model folder.

    A `.gguf` file becomes the plain folder converted from it (once, then cached: delrec.llm.gguf_import).
    """
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        from delrec.llm.gguf_import import converted_folder

        return str(converted_folder(path))
    if path.is_file():
        raise DelrecError(f"{name} is a file; pass the model folder that holds config.json, or a .gguf file")
    if path.is_dir():
        problem = describe_non_model_folder(path)
        if problem:
            raise DelrecError(f"{path} is {problem}")
        return str(path)
    if not HUB_ID.match(name):
        raise DelrecError(f"model folder not found: {name}")
    return name


def describe_non_model_folder(path: Path) -> str | None:
    """What a local folder is when it is not a Hugging Face model folder, or None when it looks like one."""
    if (path / INFO_FILE).is_file() and _json_field(path / INFO_FILE, "stage") in STAGE_FOLDER_USES:
        return _stage_folder_advice(path)
    written_by_a_stage = _stage_folder_evidence(path)
    if written_by_a_stage:
        return (f"a DELRec stage folder (it holds {written_by_a_stage}) without its {INFO_FILE}, which says how to "
                f"load it: the stage did not finish writing it, or {INFO_FILE} was deleted; re-run the stage that "
                "wrote it, or copy the folder again")
    if (path / "adapter_config.json").is_file():
        base = _json_field(path / "adapter_config.json", "base_model_name_or_path")
        return f"a PEFT adapter folder; load its base model ({base or 'see adapter_config.json'}) and then the adapter"
    config_file = path / "config.json"
    if not config_file.is_file():
        if (path / "meta.json").is_file() and _json_field(path / "meta.json", "kind") == "delrec-dataset":
            return "a prepared delrec dataset folder, not a model folder"
        if any((path / name).is_file() for name in TOKENIZER_FILES):
            return "a tokenizer-only folder (no config.json, no weights); pass the model folder"
        return "not a model folder (no config.json)"
    config = read_json(config_file)  # invalid JSON is refused here, with its line
    if not isinstance(config, dict):
        return f"not a model folder ({config_file} is not a JSON object)"
    if {"num_items", "dataset_fingerprint"} <= config.keys():
        return f"a delrec SR model folder ({config.get('model_type')}), not an LLM; pass a causal LM folder or hub id"
    if "model_type" not in config:
        return f"not a Hugging Face model folder ({config_file} has no model_type)"
    return None


STAGE_FOLDER_USES = {
    "distill-pattern": ("stage 1 (distill-pattern)", "to use its soft prompt, pass the folder as --stage1 of "
                        "`delrec llm finetune` (with --soft_prompt stage1)"),
    "finetune": ("stage 2 (finetune)", "rank it with `delrec rank --model`, or merge it with `delrec export`"),
}


def _stage_folder_advice(path: Path) -> str:
    """A finished stage folder passed where a base model goes: which stage wrote it, and what to pass instead."""
    label, use = STAGE_FOLDER_USES[_json_field(path / INFO_FILE, "stage")]
    base = _json_field(path / INFO_FILE, "base_model")
    base_name = base.get("model_name_or_path") if isinstance(base, dict) else None
    return (f"a DELRec {label} folder ({INFO_FILE}), not a base model: pass the base model it was trained on "
            f"({base_name or f'see {INFO_FILE}'}) instead; {use}")


def _stage_folder_evidence(path: Path) -> str | None:
    """What shows that a DELRec LLM stage wrote the folder `path`: its soft-prompt rows, or its run record."""
    if (path / SOFT_PROMPT_FILE).is_file():
        return SOFT_PROMPT_FILE
    stage = _json_field(path / RUN_FILE, "stage") if (path / RUN_FILE).is_file() else None
    return f"the {RUN_FILE} of a {stage} run" if isinstance(stage, str) else None


def _json_field(file: Path, key: str):
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


@contextlib.contextmanager
def _explained_load_errors(source: str, reads: tuple[str, ...] = ()):
    """Turn what transformers raises for an unreadable model into a one-line DelrecError.

    A local folder is data on disk, so any failure to load it is the folder's: the message names the first
    damaged file among those the step `reads` (names or glob patterns), else says what the library said. A hub
    id that cannot be fetched says why.
    """
    try:
        yield
    except DelrecError:
        raise
    except Exception as exc:
        if Path(source).is_dir():
            raise _folder_load_error(Path(source), reads, exc) from None
        if isinstance(exc, (OSError, ValueError)):
            raise _load_error(source, exc) from None
        raise


def _folder_load_error(folder: Path, reads: tuple[str, ...], exc: Exception) -> DelrecError:
    problem = damaged_file(path for pattern in reads for path in sorted(folder.glob(pattern)))
    if problem:
        return DelrecError(f"{problem}; the file is damaged or was cut short: copy or write {folder} again")
    read = sorted({path.name for pattern in reads for path in folder.glob(pattern) if path.is_file()})
    return DelrecError(f"{folder}: cannot load ({summary(exc)})" + (f" from {', '.join(read)}" if read else ""))


def _load_error(source: str, exc: Exception) -> DelrecError:
    first_line = summary(exc)
    from huggingface_hub import is_offline_mode

    text = str(exc).lower()
    if is_offline_mode():
        reason = "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE) and it is not in the local cache"
    elif "connect" in text:
        reason = "the Hugging Face Hub cannot be reached (no network) and it is not in the local cache"
    elif "not a valid model identifier" in text or "repositorynotfound" in type(exc).__name__.lower():
        return DelrecError(f"{source} is neither a local folder nor a model on the Hugging Face Hub")
    else:
        reason = first_line
    return DelrecError(
        f"no local folder '{source}', and as a hub id it cannot be fetched: {reason}; pass the path of a local "
        "model folder (download it where there is network, e.g. `hf download ID --local-dir DIR`)"
    )


def ensure_pad_token(model, tokenizer) -> None:
    """Give the tokenizer a pad token when it has none: its EOS token, else a new one (embeddings resized).

    Padding reuses EOS in many base models, so collators must mask padding with the attention mask,
    not by comparing token ids (that would also mask the real EOS of an answer).
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD_TOKEN})
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def resize_embeddings(model, num_tokens: int) -> None:
    """Grow the vocabulary to `num_tokens` rows without breaking tied or untied output embeddings.

    `resize_token_embeddings` re-ties weights afterwards; this checks that the tie state did not
    change and that an untied LM head kept its rows. New rows (input, and output when untied) are
    set to the mean of the old rows: deterministic, so reloading a saved soft prompt into a fresh
    model reproduces the same logits, and the new tokens get an average, not a random, logit.
    """
    inputs = model.get_input_embeddings()
    old_rows = inputs.num_embeddings
    if num_tokens <= old_rows:
        return
    tied_before = embeddings_tied(model)
    old_head = None if tied_before or model.get_output_embeddings() is None else model.get_output_embeddings().weight
    old_head_rows = None if old_head is None else old_head.detach()[:old_rows].clone()
    model.resize_token_embeddings(num_tokens, mean_resizing=False)
    if embeddings_tied(model) != tied_before:
        raise RuntimeError(f"resizing the embeddings {'untied' if tied_before else 'tied'} the LM head; refusing to continue")
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[old_rows:] = weight[:old_rows].mean(0)
        if old_head is not None:
            head = model.get_output_embeddings().weight
            if head.shape[0] != num_tokens or not torch.equal(head[:old_rows], old_head_rows):
                raise RuntimeError("resizing the embeddings lost the LM head's rows; refusing to continue")
            head[old_rows:] = head[:old_rows].mean(0)


def embeddings_tied(model) -> bool:
    """Whether the LM head shares its weight with the input embeddings (Qwen2-0.5B, GPT-2 do)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_lora(model, settings: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap `model` in a PEFT LoRA adapter (only the adapter trains); a 4/8-bit model is prepared for QLoRA first."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, settings.target_modules)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return get_peft_model(model, settings.peft_config())
    except ValueError as exc:
        raise DelrecError(f"LoRA target_modules {settings.target_modules}: {str(exc).splitlines()[0]}") from None


def check_target_modules(model, targets: list[str]) -> None:
    """Refuse LoRA target module names that name no module of `model` (PEFT matches a name or a dotted-path suffix):
    PEFT fails deep inside the Trainer's setup when none matches, and adapts fewer layers than asked when some do.
    The message lists the model's linear layers, the usual targets."""
    if targets == ["all-linear"]:
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if unmatched:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise DelrecError(f"LoRA target_modules: {', '.join(map(repr, unmatched))} names no module of "
                          f"{model.config.name_or_path}; its linear modules are {', '.join(linear)} (or give "
                          "all-linear)")


def max_positions(model) -> int | None:
    """The longest sequence the model's positions cover (its config's max_position_embeddings; GPT-2: n_positions),
    None when the config does not say: a longer one is not refused by transformers, only warned about."""
    config = model.config
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) and value > 0 else None
