"""The one way a (prompt, completion) pair becomes token ids, for training and for scoring/serving.

Stage 1/2 datasets are pre-tokenized with `encode_pair` and handed to TRL as `input_ids` +
`completion_mask`; the ranking read-out scores candidates with `encode_prompt` +
`encode_completion`. Because both sides call these functions, a model is never trained on one
tokenization and evaluated on another.

The rules, made explicit instead of left to each tokenizer's defaults:
- the prompt and the completion are encoded separately and concatenated (never the joined
  text), so the ids at the prompt/answer boundary do not depend on the answer, and a prompt's
  ids (and its KV cache) can be shared by all candidate answers;
- the prompt starts with BOS exactly when the tokenizer itself adds one (Llama does, Qwen2 does
  not); no other special token is added, in particular no EOS after the prompt;
- the completion ends with EOS, so a title that is a prefix of another ("Title" vs
  "Title Deluxe") gets its own probability of stopping there;
- added special tokens (the soft-prompt placeholders) are always one id each
  (`split_special_tokens=False`, whatever the tokenizer's default);
- nothing is truncated here: callers shorten the history before rendering, or refuse.
"""

from __future__ import annotations

from delrec.errors import DelrecError

_PROBE = "a"  # any ordinary text: shows which special ids the tokenizer wraps around it


def _text_ids(tokenizer, text: str) -> list[int]:
    # verbose=False: no warning that a text is longer than the tokenizer's model_max_length; every caller applies its
    # own length rule and says what it does about a long text (refuses it, truncates it) in its own words
    return tokenizer(text, add_special_tokens=False, split_special_tokens=False, verbose=False)["input_ids"]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own `add_special_tokens=True` puts BOS in front of a text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_specials = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    return with_specials[:1] == [bos] and _text_ids(tokenizer, _PROBE)[:1] != [bos]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids: BOS (when the tokenizer adds one) + the text's ids; no EOS."""
    ids = _text_ids(tokenizer, prompt)
    return [tokenizer.bos_token_id, *ids] if adds_bos(tokenizer) else ids


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion ids: the text's ids (no special tokens added) + EOS."""
    if not completion:
        raise DelrecError("empty completion: a candidate or answer title must have text")
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "")
        raise DelrecError(f"tokenizer {name!r} has no EOS token; completions need an end marker")
    return [*_text_ids(tokenizer, completion), tokenizer.eos_token_id]


def decode_completion(tokenizer, ids: list[int]) -> str:
    """A generated answer's text: the ids up to the first EOS, decoded at once.

    Every backend decodes whole id lists here rather than trusting a server's incremental
    detokenizer, which holds back a trailing partial UTF-8 character and so may end earlier.
    """
    eos = tokenizer.eos_token_id
    return tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)


def encode_pair(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    """`input_ids` = prompt ids + completion ids; `completion_mask` is 1 on exactly the completion ids (EOS too)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = encode_completion(tokenizer, completion)
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }
