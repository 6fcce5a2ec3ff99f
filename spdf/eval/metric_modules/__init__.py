"""spdf's Hugging Face `evaluate` modules, one folder per metric family (load them with spdf.eval.metrics.load_metric)."""
