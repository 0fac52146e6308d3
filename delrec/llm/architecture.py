"""Whether a Hugging Face config describes a decoder-only causal LM: the one check shared by loading a
model and importing a GGUF file, so both refuse an encoder or a headless checkpoint in the same words."""

from __future__ import annotations

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Bidirectional encoders; some have an (unused in practice) causal-LM class, so the mapping alone cannot tell.
ENCODER_FAMILIES = {
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie", "mpnet",
    "modernbert", "roberta", "xlm-roberta",
}


def not_a_causal_lm(hf_config) -> str | None:
    """Describe a config that is not a decoder-only causal LM (e.g. 'an encoder model (BertModel)')."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = list(getattr(hf_config, "architectures", None) or [])
    named = f" ({architectures[0]})" if architectures else f" ({hf_config.model_type})"
    if getattr(hf_config, "is_encoder_decoder", False):
        return f"an encoder-decoder model{named}"
    if hf_config.model_type in ENCODER_FAMILIES and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        return f"an encoder model{named}"
    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"a '{hf_config.model_type}' model{named} with no causal-LM class in transformers"
    if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        return f"a checkpoint without a language-model head{named}"
    return None
