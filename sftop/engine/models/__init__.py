"""Models: the built-in demo model, tokenizer loading, and model + LoRA loading."""

from sftop.engine.models.tokenizer import load_tokenizer

__all__ = ["load_tokenizer"]
