"""The benchmark scripts' tests import a script from benchmarks/ as a module (the `import_benchmark` fixture)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


@pytest.fixture
def import_benchmark():
    def load(name: str):
        """benchmarks/NAME.py as a module, with benchmarks/ on sys.path only while it imports: left there, a script's
        name could shadow an installed package (benchmarks/kernels.py once shadowed Hugging Face's `kernels`)."""
        sys.path.insert(0, BENCHMARKS)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(BENCHMARKS)

    return load
