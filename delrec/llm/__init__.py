"""The LLM side: loading causal LMs (+ LoRA), the tiny local LLM, and soft prompts as added tokens."""

from delrec.llm.loading import LoraSettings, ModelConfig, apply_lora, load_model
from delrec.llm.soft_prompt import SOFT_PROMPT_FILE, SoftPrompt

__all__ = ["LoraSettings", "ModelConfig", "SOFT_PROMPT_FILE", "SoftPrompt", "apply_lora", "load_model"]
