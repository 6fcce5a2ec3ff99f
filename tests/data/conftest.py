"""Shared tiny inputs for the spdf.data tests: a ~200 KB slice of the stdlib and a 400-token BPE trained on it."""
import pytest

from spdf.data import DataSpec, TokenizerSpec
from spdf.data import iter_documents, load_or_train_tokenizer

SMALL_SOURCE = DataSpec(source="stdlib", part="pretrain", max_bytes=200_000)


@pytest.fixture(scope="session")
def small_source():
    return SMALL_SOURCE


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    return load_or_train_tokenizer(TokenizerSpec(kind="train", vocab_size=400), iter_documents(SMALL_SOURCE),
                                   tmp_path_factory.mktemp("tok"))
