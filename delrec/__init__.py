"""delrec: bidirectional distillation between sequential recommenders and LLMs."""

__version__ = "0.1.0"
