"""The model families (spdf.model.families: gpt, ...) and their models. A model knows nothing of sparsity."""
from .config import CONFIGS, GPTConfig
from .gpt import GPT
from .families import FAMILIES, ModelFamily, config_by_name, family_of, get_family

__all__ = ["CONFIGS", "FAMILIES", "GPT", "GPTConfig", "ModelFamily", "config_by_name", "family_of", "get_family"]
