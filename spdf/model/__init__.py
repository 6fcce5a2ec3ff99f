"""The model families (spdf.model.families: gpt, llama) and their models. A model knows nothing of sparsity."""
from .config import CONFIGS, GPTConfig
from .gpt import GPT
from .llama import Llama
from .llama_config import LLAMA_CONFIGS, LlamaConfig
from .families import FAMILIES, ModelFamily, config_by_name, family_of, get_family

__all__ = ["CONFIGS", "FAMILIES", "GPT", "GPTConfig", "LLAMA_CONFIGS", "Llama", "LlamaConfig", "ModelFamily",
           "config_by_name", "family_of", "get_family"]
