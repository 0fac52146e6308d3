"""`delrec export`: a DELRec stage-2 folder -> one plain Hugging Face model folder.

Why it lives in `delrec.llm`: it transforms one LLM folder format into another (the stage-2
folder written by the LLM trainers into the merged folder that serving reads), and the teacher
export of `delrec.distill` serves the same merged folder; ranking only reads it.

What the export holds: the base model with the LoRA update merged into its weights and the soft
prompt kept as what it already is, P added vocabulary rows
(docs/architecture.md#soft-prompts-as-added-tokens); the tokenizer with those P special tokens; and a `delrec.json` of kind
`delrec-export` saying how to prompt it (template, domain, SR model name, the soft prompt's
placeholder text). `AutoModelForCausalLM` and vLLM load it with no delrec code, and the rendered
prompt text needs no custom embedding code. Tied input/output embeddings (Qwen2) stay tied: the
tie is never changed, so the soft rows are the LM head's rows for those tokens, as in training.

A folder trained with hybrid item tokens (`delrec.llm.hybrid`) is refused: their embeddings come
from the item projector, not from vocabulary rows, so no plain folder can hold them.

The export checks itself: probe logits on a prompt holding the soft tokens are computed with the
unmerged model before merging and with the saved folder reloaded by plain transformers after;
a float32 export whose logits differ by more than `LOGIT_TOLERANCE` is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from delrec.errors import DelrecError
from delrec.io import check_apart_from_inputs, is_occupied, read_json, replace_directory, staged_directory, write_json
from delrec.llm.files import USER_PROMPT_FILE, explained_write_errors
from delrec.llm.stage_folder import ADAPTER_CONFIG, INFO_FILE, load_delrec_model, read_info, same_base_model
from delrec.llm.loading import DTYPES, TOKENIZER_FILES, WEIGHT_FILES, describe_non_model_folder, resolve_source
from delrec.llm.soft_prompt import SOFT_PROMPT_FILE, SoftPrompt
from delrec.llm.tokenization import encode_prompt
from delrec.llm.user_prompt import UserPrompt
from delrec.prompts.template import is_template_name

EXPORT_KIND = "delrec-export"
EXPORT_VERSION = 1
STAGE2 = "finetune"  # delrec.llm.stage2.STAGE (not imported: that module loads TRL)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LOGIT_TOLERANCE = 1e-3
PROBE_TEXT = "A user has interacted with these items, from oldest to most recent: {soft}\nAnswer:"


# ----------------------------------------------------------------------------- reading folders


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a delrec.json of kind `delrec-export`."""
    if not (folder / INFO_FILE).is_file():
        return False
    info = read_json(folder / INFO_FILE)
    return isinstance(info, dict) and info.get("kind") == EXPORT_KIND


def read_export(folder: str | Path) -> dict:
    """The delrec.json of an exported folder, after checking the folder has every piece it needs."""
    folder = Path(folder)
    info = read_json(folder / INFO_FILE)
    if not isinstance(info, dict) or info.get("kind") != EXPORT_KIND:
        raise DelrecError(f"{folder / INFO_FILE}: not an exported model (field 'kind' should be '{EXPORT_KIND}')")
    missing = [name for name, present in (
        ("config.json", (folder / "config.json").is_file()),
        ("the model weights (model.safetensors)", any((folder / n).is_file() for n in WEIGHT_FILES)),
        ("tokenizer files", any((folder / n).is_file() for n in TOKENIZER_FILES)),
    ) if not present]
    if missing:
        raise DelrecError(f"{folder}: exported model folder is missing {', '.join(missing)}; re-run `delrec export`")
    for key in ("template", "domain", "sr_model", "soft_prompt"):
        if key not in info:
            raise DelrecError(f"{folder / INFO_FILE}: no '{key}' field; re-run `delrec export`")
    if info["template"] is not None and not is_template_name(info["template"]):
        raise DelrecError(f"{folder / INFO_FILE}: field 'template' must name a template of the prompts folder (a plain "
                          f"name, not a path), got {info['template']!r}; re-run `delrec export`")
    return info


def read_stage2(folder: str | Path) -> dict:
    """The delrec.json of a DELRec stage-2 folder, after checking it has every piece loading needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DelrecError(f"model folder not found: {folder}")
    if is_export(folder):
        raise DelrecError(f"{folder}: already an exported model folder; use it as it is")
    if not (folder / INFO_FILE).is_file():
        what = describe_non_model_folder(folder) or "a plain Hugging Face model folder"
        raise DelrecError(f"{folder}: not a DELRec stage-2 folder (no {INFO_FILE}); it is {what}")
    info = read_info(folder)
    if info.get("stage") != STAGE2:
        raise DelrecError(
            f"{folder}: a DELRec '{info.get('stage')}' folder, not a stage-2 ('{STAGE2}') one; "
            "pass the output folder of `delrec llm finetune`"
        )
    pieces = [
        (f"the LoRA adapter ({ADAPTER_CONFIG})", (folder / ADAPTER_CONFIG).is_file()),
        (f"the adapter weights ({ADAPTER_WEIGHTS[0]})", any((folder / n).is_file() for n in ADAPTER_WEIGHTS)),
        ("tokenizer files", any((folder / n).is_file() for n in TOKENIZER_FILES)),
    ]
    if info.get("soft_prompt"):
        file = USER_PROMPT_FILE if user_prompt_record(info) else SOFT_PROMPT_FILE
        pieces.append((f"the soft prompt ({file})", (folder / file).is_file()))
    missing = [name for name, present in pieces if not present]
    if missing:
        raise DelrecError(f"{folder}: incomplete DELRec stage-2 folder, missing {', '.join(missing)}")
    return info


def soft_prompt_text(info: dict) -> str | None:
    """The placeholder text of the soft prompt a DELRec folder's delrec.json names (None: it has none)."""
    soft = info.get("soft_prompt")
    if not soft:
        return None
    kind = UserPrompt if user_prompt_record(info) else SoftPrompt
    return kind(soft["name"], int(soft["num_tokens"])).placeholder_text()


def user_prompt_record(info: dict) -> dict | None:
    """What a folder with a per-user soft prompt records of it (`item_table_sha256`: the SR model whose user states
    it reads); None for a global soft prompt or none."""
    soft = info.get("soft_prompt") or {}
    return {"item_table_sha256": soft.get("item_table_sha256")} if soft.get("kind") == "user" else None


def prompt_settings(info: dict) -> dict:
    """How a stage-2 model's prompts were rendered: template (+ fingerprint), domain, SR model display name."""
    template = info.get("template") or {}
    return {
        "template": template.get("name"),
        "template_fingerprint": template.get("fingerprint"),
        "domain": info.get("domain"),
        "sr_model": (info.get("sr_model") or {}).get("display_name"),
    }


# ----------------------------------------------------------------------------- export


def export_model(
    source: str | Path, out: str | Path, *, dtype: str = "auto", device: str = "cpu", overwrite: bool = False,
    base_model: str | None = None, trust_remote_code: bool = False,
) -> dict:
    """Merge the stage-2 folder `source` into a plain model folder `out`; return its delrec.json.

    `dtype`: the saved weights' dtype; `auto` keeps the base checkpoint's (merging is done in float32,
    on `device`). `base_model`: the base at a new path, when it moved from the one delrec.json records
    (accepted when its content fingerprint is the recorded one). `trust_remote_code`: the user's grant to run
    code shipped with the folder or its base (`load_delrec_model`); only then does the export carry such code.
    """
    from transformers import AutoModelForCausalLM

    source, out = Path(source), Path(out)
    info = read_stage2(source)
    if user_prompt_record(info):
        raise DelrecError(f"{source}: a per-user soft prompt needs the hf backend; its vectors are computed from each "
                          "user's SR state, not held in vocabulary rows, so there is no plain folder to export: rank "
                          "the stage-2 folder itself with `delrec rank --backend hf --predictions FILE`")
    if info.get("item_tokens"):
        raise DelrecError(f"{source}: hybrid item tokens need the hf backend; their embeddings come from the item "
                          "projector, not from vocabulary rows, so there is no plain folder to export: rank the "
                          "stage-2 folder itself with `delrec rank --backend hf`")
    if dtype != "auto" and dtype not in DTYPES:
        raise DelrecError(f"dtype must be auto, {', '.join(DTYPES)}; got '{dtype}'")
    base = info["base_model"]
    if base.get("load_in_4bit") or base.get("load_in_8bit"):
        raise DelrecError(f"{source}: trained on a 4/8-bit base (QLoRA); `delrec export` merges into a full-precision "
                          "base only and does not support QLoRA folders yet")
    base_path = locate_base_model(source, base, base_model)
    # the base is read as the export is written: --overwrite would replace it by the merged model
    check_apart_from_inputs(out, {"stage-2": source, "base model": base_path}, "the export")
    if is_occupied(out) and not overwrite:
        raise DelrecError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")

    model, tokenizer, _ = load_delrec_model(source, device=device, dtype="float32", base=base_path,
                                            trust_remote_code=trust_remote_code)
    target_dtype = DTYPES[dtype] if dtype != "auto" else _checkpoint_dtype(base_path, trust_remote_code)
    soft = soft_prompt_text(info)
    probe = torch.tensor([encode_prompt(tokenizer, PROBE_TEXT.format(soft=soft or ""))], device=model.device)
    with torch.inference_mode():
        expected = model(input_ids=probe).logits.float().cpu()
    merged = model.merge_and_unload().to(target_dtype)

    export_info = {
        "kind": EXPORT_KIND,
        "format_version": EXPORT_VERSION,
        **prompt_settings(info),
        "soft_prompt": None if soft is None else {**info["soft_prompt"], "text": soft},
        "base_model": base["model_name_or_path"],
        "dtype": str(target_dtype).removeprefix("torch."),
        "source": str(source),
        "stage2": info,
    }
    with staged_directory(out) as tmp:
        with explained_write_errors(out):  # safetensors reports a full disk as its own error, naming no file
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=trust_remote_code)
        with torch.inference_mode():
            diff = (reloaded(input_ids=probe.cpu()).logits.float() - expected).abs().max().item()
        if target_dtype == torch.float32 and diff > LOGIT_TOLERANCE:
            raise DelrecError(
                f"the exported model's logits differ from the stage-2 model's by {diff:.2e} (> {LOGIT_TOLERANCE}); "
                "the export was not written"
            )
        export_info["max_abs_logit_diff"] = diff
        write_json(tmp / INFO_FILE, export_info)
        replace_directory(tmp, out)
    return export_info


def locate_base_model(source: Path, recorded: dict, given: str | None) -> str:
    """The base model to merge into: the one delrec.json records, or `given` if it is the same model."""
    path = recorded["model_name_or_path"]
    if given is None:
        if Path(path).is_absolute() and not Path(path).exists():
            raise DelrecError(f"{source / INFO_FILE} records the base model {path}, which is not there any more; "
                              "put it back, or pass its new path with --base_model")
        return path
    if not Path(given).exists():
        raise DelrecError(f"--base_model {given}: not found")
    if not same_base_model(recorded, given):
        known = "its content fingerprint differs" if recorded.get("fingerprint") else \
            "the folder records no content fingerprint to compare"
        raise DelrecError(f"--base_model {given} is not the base model {source / INFO_FILE} records ({path}): "
                          f"{known}; pass the model stage 2 was trained on")
    return given


def _checkpoint_dtype(base: str, trust_remote_code: bool) -> torch.dtype:
    """The dtype the base checkpoint was saved in (float32 when its config does not say)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_source(base), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, DelrecError):
        return torch.float32
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else torch.float32
