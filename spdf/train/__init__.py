"""The training engine: one accelerate loop for pre-training and fine-tuning, checkpoints, and the recipe runner."""
from .runner import prepare_recipe, run_recipe

__all__ = ["prepare_recipe", "run_recipe"]
