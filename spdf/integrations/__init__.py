"""Thin adapters to other ecosystems: Hugging Face transformers' save/load and Trainer, spdf.GPT <-> GPT-2.

Nothing here is imported by spdf's own packages; transformers is imported only where a function needs it.
"""
