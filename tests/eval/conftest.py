"""Shared fixtures for the spdf.eval tests: a network that really is unreachable."""
import socket

import pytest


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
