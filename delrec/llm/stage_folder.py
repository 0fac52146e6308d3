"""The DELRec LLM folder (docs/architecture.md#llm-stage-folders) and its loader.

    delrec.json                  what the folder is: stage, base model (with its content fingerprint), SR
                                 model, templates and their fingerprints, soft-prompt name and size, dataset
                                 fingerprint, and the SHA-256 of the soft-prompt and adapter files
    soft_prompt.safetensors      the soft-prompt rows (absent when trained without a soft prompt)
    tokenizer files              the base tokenizer with the soft-prompt tokens (and item tokens) added
    adapter_config.json,         stage 2 only: the LoRA adapter (no embedding rows: the soft rows
    adapter_model.safetensors    are in soft_prompt.safetensors, everything else is the base's) and,
                                 with item tokens, the item projector with its SR table
    metrics.json                 valid (and stage 2: test) metrics

No full model copy: `load_delrec_model` rebuilds the model from the base it names, the soft rows
and the adapter, so the ranking stage and the tests score exactly what training evaluated. It
refuses pieces that do not belong together: a base whose content changed since training, an adapter
or soft prompt copied in from another run, weights holding NaN or inf.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from delrec.errors import DelrecError
from delrec.headers import FieldRule, Header, positive_int
from delrec.io import read_json, sha256_file, write_json
from delrec.llm.files import INFO_FILE, SOFT_PROMPT_FILE
from delrec.prompts.template import is_template_name

KIND = "delrec-llm"
FORMAT_VERSION = 1


def _is_base_model(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("model_name_or_path"), str)
            and isinstance(value.get("trust_remote_code", False), bool)
            and isinstance(value.get("fingerprint"), (str, type(None))))


def _is_item_tokens(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and isinstance(value.get("sr_model"), str) and all(
        positive_int(value.get(key)) for key in ("num_items", "sr_dim", "hidden", "first_token_id")))


def _is_sr_hint(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and positive_int(value.get("sr_top"))
                             and isinstance(value.get("item_table_sha256"), str))


def _is_soft_prompt(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and isinstance(value.get("name"), str)
                             and positive_int(value.get("num_tokens")))


def _names_a_template(value: Any) -> bool:
    return isinstance(value, dict) and is_template_name(value.get("name"))


# a template recorded by name is looked up in the prompts folder: never a path, which could lead anywhere on disk
TEMPLATE_RECORD = "null or an object whose name is a template of the prompts folder (a plain name, not a path)"


# what loading reads from delrec.json: a damaged one is refused in one line, not met as a KeyError mid-load
HEADER = Header("DELRec LLM description", "kind", KIND, FORMAT_VERSION,
                "re-run the stage that wrote this folder with this delrec", fields={
                    "stage": FieldRule(lambda value: isinstance(value, str), "the name of the stage that wrote it"),
                    "base_model": FieldRule(_is_base_model, "an object with the base model's model_name_or_path "
                                            "(a string), its fingerprint (a string or null) and trust_remote_code "
                                            "(true or false)"),
                    "domain": FieldRule(lambda value: value is None or isinstance(value, str), "null or a string"),
                    "item_tokens": FieldRule(_is_item_tokens, "null or an object with the SR model (sr_model) and "
                                             "positive num_items, sr_dim, hidden and first_token_id"),
                    "sr_hint": FieldRule(_is_sr_hint, "null or an object with a positive sr_top and the SR model's "
                                         "item_table_sha256"),
                    "soft_prompt": FieldRule(_is_soft_prompt, "null or an object with a name and a positive "
                                                              "num_tokens"),
                    "template": FieldRule(lambda value: value is None or _names_a_template(value), TEMPLATE_RECORD),
                    "templates": FieldRule(lambda value: value is None or (isinstance(value, dict) and all(
                        _names_a_template(entry) for entry in value.values())), f"null or a task -> {TEMPLATE_RECORD}"),
                    "sha256": FieldRule(lambda value: value is None or (isinstance(value, dict) and set(value) <= set(
                        recorded_files()) and all(isinstance(digest, str) for digest in value.values())),
                        "null or an object giving the SHA-256 of the soft-prompt and adapter weights files"),
                })
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TYPE = "LORA"  # the only PEFT adapter the stages write


def local_or_hub(name: str) -> str:
    """An existing local path made absolute (so the folder loads from anywhere); a hub id unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_fingerprint(name: str) -> str | None:
    """A content hash of a local model (its config.json and weight files; a .gguf file itself), so that the
    same model at a new path is recognised as the same; None for a hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.name == "config.json"
                                                                       or p.suffix in WEIGHT_SUFFIXES))
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def same_base_model(recorded: dict[str, Any], name: str) -> bool:
    """Whether `name` is the base model delrec.json recorded: the same content, wherever it is now (a base changed
    in place is not the same model); the same path where either side has no fingerprint (a hub id)."""
    found = model_fingerprint(name)
    if found is not None and recorded.get("fingerprint"):
        return found == recorded["fingerprint"]
    return recorded["model_name_or_path"] == local_or_hub(name)


def write_info(folder: str | Path, info: dict[str, Any]) -> None:
    """Write delrec.json, with the SHA-256 of each weights file the folder holds (`recorded_files`): loading checks
    them, so an adapter or a soft prompt copied in from another run is not taken for this folder's."""
    folder = Path(folder)
    digests = {name: sha256_file(folder / name) for name in recorded_files() if (folder / name).is_file()}
    write_json(folder / INFO_FILE, {"kind": KIND, "format_version": FORMAT_VERSION, **info, "sha256": digests})


def recorded_files() -> tuple[str, ...]:
    """The weights files a stage folder's delrec.json identifies by content: the soft prompt and the adapter."""
    from delrec.llm.hybrid import ADAPTER_WEIGHTS

    return SOFT_PROMPT_FILE, ADAPTER_WEIGHTS


def read_info(folder: str | Path) -> dict[str, Any]:
    """The folder's delrec.json, checked; a folder without one was not (fully) written by a DELRec stage."""
    folder = Path(folder)
    path = folder / INFO_FILE
    if not path.is_file():
        raise DelrecError(f"{folder}: not a DELRec LLM folder (no {INFO_FILE}); write one with `delrec llm "
                          "distill-pattern` (stage 1) or `delrec llm finetune` (stage 2)")
    info = HEADER.read(path)
    return info


def load_delrec_model(folder: str | Path, device: str = "auto", dtype: str = "auto", base: str | None = None,
                      trust_remote_code: bool = False):
    """Return `(model, tokenizer, info)`: the base model + soft-prompt rows or per-user projector (+ the stage-2 LoRA
    adapter and item projector), in eval mode.

    `base` overrides the base model recorded in delrec.json (e.g. the same model at another path).
    `trust_remote_code` is the caller's (the user's) decision alone: a folder is data that anyone may have
    written, so its delrec.json recording `trust_remote_code: true` never lets code from the folder or its
    base run; it only makes loading refuse, in one line, until the user grants it (docs/security.md).
    """
    from delrec.llm import hybrid
    from delrec.llm.loading import ModelConfig, ensure_pad_token, load_model, load_tokenizer
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.user_prompt import UserPrompt

    folder = Path(folder)
    info = read_info(folder)
    _check_adapter_files(folder)  # before the base model: loading it can take a minute
    model_info = info["base_model"]
    if model_info.get("trust_remote_code") and not trust_remote_code:
        raise DelrecError(
            f"{folder / INFO_FILE}: this model was trained with trust_remote_code, so loading it runs Python code "
            f"shipped with {folder} and its base model; delrec never runs it because a folder asks: pass "
            "--trust_remote_code true only if you trust where both came from"
        )
    recorded = model_info["model_name_or_path"]
    if base is None and Path(recorded).is_absolute() and not Path(recorded).exists():  # a local base is recorded absolute
        raise DelrecError(f"{folder / INFO_FILE} field 'base_model': the base model {recorded} it was trained on is "
                          "not there (moved or deleted); put it back at that path, or re-run the stage")
    config = ModelConfig(
        base or recorded, dtype=dtype, device=device,
        load_in_4bit=model_info.get("load_in_4bit", False), load_in_8bit=model_info.get("load_in_8bit", False),
        trust_remote_code=trust_remote_code,
    )
    model, _ = load_model(config)
    _check_base_model(folder, model_info, config.model_name_or_path)  # after loading: a damaged base names its file
    tokenizer = load_tokenizer(str(folder), config.trust_remote_code)  # holds the soft-prompt tokens
    ensure_pad_token(model, tokenizer)
    soft = info.get("soft_prompt")
    if soft and soft.get("kind") == "user":  # a co-trained projector is then restored by the adapter
        UserPrompt.load(folder, model, tokenizer)
    elif soft:
        if not (folder / SOFT_PROMPT_FILE).is_file():
            raise DelrecError(f"{folder}: {INFO_FILE} names soft prompt '{soft['name']}' but {SOFT_PROMPT_FILE} "
                              "is missing")
        SoftPrompt.load(folder, model, tokenizer, num_tokens=soft["num_tokens"])
    item_tokens = info.get("item_tokens")
    if item_tokens:  # a placeholder projector of the recorded shape; the adapter holds the trained one
        hybrid.load(model, tokenizer, item_tokens, folder)
    if (folder / ADAPTER_CONFIG).is_file():
        model = _load_adapter(model, folder)
    if item_tokens:
        hybrid.check_loaded(model, folder)
    _check_written_together(folder, info)  # last: a damaged file is named by the loader that read it
    model.eval()
    return model, tokenizer, info


def _check_base_model(folder: Path, recorded: dict[str, Any], name: str) -> None:
    """Refuse a base model other than the one the folder was trained on (a base changed in place included): the
    soft rows and the adapter only mean something on top of that base."""
    if same_base_model(recorded, name):
        return
    path = recorded["model_name_or_path"]
    if local_or_hub(name) == path:
        raise DelrecError(f"{folder / INFO_FILE}: the base model {path} changed since this folder was trained (content "
                          f"fingerprint {model_fingerprint(name)}, recorded {recorded['fingerprint']}); put back the "
                          "model it was trained on, or re-run the stage on this one")
    raise DelrecError(f"{name} is not the base model {folder / INFO_FILE} records ({path}): its content fingerprint "
                      "differs; pass the model the folder was trained on")


def _check_written_together(folder: Path, info: dict[str, Any]) -> None:
    """Refuse an adapter or a soft prompt that is not the one delrec.json was written with (copied in from another
    run): the adapter's LoRA settings against those recorded, and each weights file against its recorded SHA-256
    (folders written before delrec recorded them are accepted as they are)."""
    remedy = f"the folder mixes files of different runs: {_remake(folder)}"
    lora, config = info.get("lora"), folder / ADAPTER_CONFIG
    if isinstance(lora, dict) and config.is_file():
        settings = read_json(config)
        recorded_alpha = lora.get("lora_alpha", lora.get("alpha"))  # "alpha" in folders written before delrec took PEFT's names
        pairs = {"r": (settings.get("r"), lora.get("r")), "lora_alpha": (settings.get("lora_alpha"), recorded_alpha)}
        if lora.get("target_modules") != ["all-linear"]:  # PEFT records all-linear as the module paths it found
            pairs["target_modules"] = (_layer_names(settings.get("target_modules")),
                                       _layer_names(lora.get("target_modules")))
        for key, (found, expected) in pairs.items():
            if found != expected:
                raise DelrecError(f"{config}: LoRA {key} {found!r}, but {folder / INFO_FILE} records {expected!r}; "
                                  f"{remedy}")
    for name, digest in (info.get("sha256") or {}).items():
        path = folder / name
        if not path.is_file():
            raise DelrecError(f"{path}: missing, though {folder / INFO_FILE} records it; {remedy}")
        if sha256_file(path) != digest:
            raise DelrecError(f"{path}: not the file {folder / INFO_FILE} was written with (its SHA-256 differs from "
                              f"the recorded one); {remedy}")


def _layer_names(targets) -> list[str]:
    """The layers LoRA targets, by name: `q_proj` for `model.layers.0.self_attn.q_proj` as for `q_proj` itself."""
    return sorted({str(target).rsplit(".", 1)[-1] for target in targets or ()})


def _remake(folder: Path) -> str:
    return f"copy {folder} again, or re-run the stage that wrote it"


def _check_adapter_files(folder: Path) -> None:
    """Refuse, in one line naming the file, a stage folder's adapter whose config or weights file is damaged."""
    from delrec.llm.files import damaged_file
    from delrec.llm.hybrid import ADAPTER_WEIGHTS

    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        return
    remedy = _remake(folder)
    problem = damaged_file([config, folder / ADAPTER_WEIGHTS])
    if problem:
        raise DelrecError(f"{problem}; {remedy}")
    settings = read_json(config)
    if not isinstance(settings, dict) or settings.get("peft_type") != ADAPTER_TYPE:
        found = repr(settings.get("peft_type")) if isinstance(settings, dict) else f"a JSON {type(settings).__name__}"
        raise DelrecError(f"{config}: not a LoRA adapter config (field 'peft_type' should be '{ADAPTER_TYPE}', got "
                          f"{found}); {remedy}")


def _load_adapter(model, folder: Path):
    """The base `model` with the folder's LoRA adapter; an adapter that does not fit the base, lacks tensors (PEFT
    would only warn and leave those at their initial values) or holds NaN or inf is refused in one line."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    from delrec.llm.files import summary
    from delrec.tensors import first_nonfinite
    from delrec.llm.hybrid import ADAPTER_WEIGHTS

    weights = folder / ADAPTER_WEIGHTS
    remedy = _remake(folder)
    try:  # PEFT fails on a config value it cannot use, and on tensors that do not fit the base
        with warnings.catch_warnings():  # missing tensors are refused below, in one line
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, RuntimeError) and "state_dict" not in str(exc):  # not the tensors (out of memory, ...)
            raise
        raise DelrecError(f"{weights}: does not fit {folder / ADAPTER_CONFIG} and the base model ({summary(exc)}); "
                          f"{remedy} with this base model") from None
    adapter = get_peft_model_state_dict(model, save_embedding_layers=False)
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            held = set(handle.keys())
            integral = next(((k, handle.get_slice(k).get_dtype()) for k in sorted(held)
                             if not handle.get_slice(k).get_dtype().startswith(("F", "BF"))), None)
        if integral is not None:  # PEFT would cast it to the LoRA matrices' dtype without a word
            raise DelrecError(f"{weights}: tensor '{integral[0]}' is {integral[1]}, expected floating-point LoRA "
                              f"weights; the file is damaged or not an adapter: {remedy}")
        missing = sorted(set(adapter) - held)
        if missing:
            shown = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
            raise DelrecError(f"{weights}: lacks {len(missing)} of the adapter's tensors ({shown}); the file is "
                              f"damaged, or not the one written with {ADAPTER_CONFIG}: {remedy}")
    broken = first_nonfinite(adapter.items())
    if broken:
        raise DelrecError(f"{weights}: adapter tensor '{broken[0]}' holds {broken[1]} NaN/inf value(s) (the training that wrote it "
                          f"diverged, or the file is damaged); {remedy}")
    return model
