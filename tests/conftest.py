"""Shared fixtures: a seeded tiny GPT, token batches for it, and a network that really is unreachable; the versions
line at the top of every run."""
import importlib.metadata
import os
import platform
import socket

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported; `import spdf` below may import it (through spdf.kernels),
# so the choice is made here, before any test module is collected (importing torch does not import triton). Without
# CUDA the kernel tests run Triton's CPU interpreter; on a GPU machine the suite runs the compiled kernels
# (tests/kernels/test_cuda.py), and an interpreter would only slow CUDA paths down. An explicit setting wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import spdf

# The packages whose new releases have broken (or could break) the suite: a red run names what it was run against.
REPORTED = ("torch", "triton", "transformers", "accelerate", "datasets", "evaluate", "kernels", "tokenizers")


def pytest_sessionstart(session):
    """One line of versions, printed even under -q (pytest's own header is not)."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    line = ", ".join([f"python {platform.python_version()}"] + [f"{n} {version(n)}" for n in REPORTED])
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"versions: {line}")


@pytest.fixture
def make_gpt():
    """Build `tiny-test` (2 layers, width 32, vocab 128, ctx 64) with a fixed init seed."""

    def make(seed: int = 0, **overrides) -> spdf.GPT:
        torch.manual_seed(seed)
        return spdf.GPT.from_name("tiny-test", **overrides)

    return make


@pytest.fixture
def batch():
    """(idx, targets) of shape (2, 16) for `tiny-test`."""
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, 128, (2, 17), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


@pytest.fixture
def offline(monkeypatch):
    """No connection can be opened from Python, and the Hugging Face libraries are told they are offline."""

    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the `offline` test fixture")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
