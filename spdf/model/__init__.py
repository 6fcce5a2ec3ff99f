"""The GPT model family. It knows nothing of sparsity."""
from .config import CONFIGS, GPTConfig
from .gpt import GPT

__all__ = ["CONFIGS", "GPT", "GPTConfig"]
