"""spdf: Sparse Pre-training and Dense Fine-tuning of GPT- and Llama-style models (Thangarasa et al., UAI 2023)."""
from .model import GPT, GPTConfig, Llama, LlamaConfig
from .sparsity import SparseLayer, SparseLinear, Sparsifier, densify, load_state_dict, sparsify
from .integrations.hf_save import from_pretrained, save_pretrained

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "SparseLayer", "SparseLinear", "Sparsifier", "densify",
           "from_pretrained", "load_state_dict", "save_pretrained", "sparsify"]
