"""spdf: Sparse Pre-training and Dense Fine-tuning of GPT models."""
from setuptools import setup

# Downstream metrics (spdf.eval.metrics): Hugging Face evaluate modules over the packages that define each metric.
EVAL = ["evaluate>=0.4", "sacrebleu>=2.3", "rouge-score>=0.1.2", "nltk>=3.8", "pycocoevalcap>=1.2"]

# `kernels/` is a top-level folder of the repository but installs as `spdf.kernels`: a top-level `kernels`
# module would clash with another well-known package of that name.
setup(
    name="spdf",
    version="0.1.0",
    description="Sparse Pre-training and Dense Fine-tuning (SPDF) of GPT models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "spdf",
        "spdf.sparsity",
        "spdf.model",
        "spdf.data",
        "spdf.train",
        "spdf.eval",
        "spdf.eval.metric_modules",
        "spdf.kernels",
    ],
    package_dir={"spdf.kernels": "kernels"},
    # The `evaluate` module scripts are loaded by path (evaluate.load), not imported as packages: ship them as data.
    package_data={"spdf.eval.metric_modules": ["*/*.py"]},
    install_requires=[
        "torch>=2.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
        "accelerate>=0.34",
        "tokenizers>=0.19",
        "safetensors>=0.4",
    ],
    extras_require={
        "kernels": ["triton>=3.0"],
        # Measured peers in benchmarks/kernels.py, never imported by spdf. No wheels for current torch: pip builds
        # them from source against the installed torch (--no-build-isolation), ~20 min on 2 cores, so not in [dev].
        "peers": ["torch-scatter>=2.1.2", "torch-sparse>=0.6.18"],
        "data": ["datasets>=2.19"],
        "plot": ["matplotlib>=3.7"],
        "eval": EVAL,
        "hf": ["transformers>=4.50"],
        "lm-eval": ["transformers>=4.50", "lm-eval>=0.4"],
        "tensorboard": ["tensorboard>=2.14"],  # logging.tensorboard: true
        "dev": ["pytest>=7", "hypothesis>=6", "triton>=3.0", "matplotlib>=3.7", "datasets>=2.19", "transformers>=4.50",
                "lm-eval>=0.4", *EVAL],
    },
    entry_points={"console_scripts": ["spdf=spdf.cli:main"]},
)
