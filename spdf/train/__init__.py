"""The training engine: one accelerate loop for pre-training and fine-tuning, checkpoints, and the recipe runner."""
from .runner import run_recipe

__all__ = ["run_recipe"]
