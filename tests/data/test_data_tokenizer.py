import pytest

from spdf.data import DataError, TokenizerSpec, iter_documents, load_or_train_tokenizer
from spdf.recipe import RecipeError
from spdf.typed_spec import build
from spdf.data.tokenizer import EOS_TOKEN, TextTokenizer


def test_trained_bpe_has_requested_vocab_eos_and_exact_round_trip(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == 400
    assert tok.tokenizer.id_to_token(tok.eos_id) == EOS_TOKEN
    text = "def f(x):\n\treturn x  # héllo → 世界 🙂\r\n"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    # merges were learned: common code is shorter than its bytes
    assert len(tok.encode("    def __init__(self):\n        return None\n")) < 20


def test_trained_tokenizer_is_reused_not_retrained(small_tokenizer):
    # documents=None would raise if it tried to train again
    again = load_or_train_tokenizer(TokenizerSpec(vocab_size=400), None, small_tokenizer.path.parent)
    assert again.file_hash == small_tokenizer.file_hash


def test_changed_spec_on_existing_save_dir_is_refused(small_tokenizer):
    with pytest.raises(DataError, match=r"vocab_size': 400.*vocab_size': 512.*delete it"):
        load_or_train_tokenizer(TokenizerSpec(vocab_size=512), ["x"], small_tokenizer.path.parent)


def test_file_kind_loads_the_same_tokenizer(small_tokenizer):
    tok = load_or_train_tokenizer(TokenizerSpec(kind="file", path=str(small_tokenizer.path)), None, "unused")
    assert isinstance(tok, TextTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.file_hash) == (400, small_tokenizer.eos_id, small_tokenizer.file_hash)


def test_training_is_deterministic(tmp_path, small_source):
    a = load_or_train_tokenizer(TokenizerSpec(vocab_size=300), iter_documents(small_source), tmp_path / "a")
    b = load_or_train_tokenizer(TokenizerSpec(vocab_size=300), iter_documents(small_source), tmp_path / "b")
    assert a.file_hash == b.file_hash


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"kind must be one of 'train', 'file', 'hub', got 'bpe'"):
        build(TokenizerSpec, {"kind": "bpe"})
    with pytest.raises(DataError, match=r"tokenizer file not found: '.*nope.json'"):
        load_or_train_tokenizer(TokenizerSpec(kind="file", path=str(tmp_path / "nope.json")), None, tmp_path)
    with pytest.raises(RecipeError, match=r"vocab_size must be >= 257, got 100"):
        TokenizerSpec(vocab_size=100)
    with pytest.raises(RecipeError, match=r"unknown key 'vocab' \(did you mean 'vocab_size'\?\); allowed: kind, "):
        build(TokenizerSpec, {"kind": "train", "vocab": 100})
    with pytest.raises(RecipeError, match=r"max_bytes is only used when kind is 'train' \(kind is 'file'\)"):
        TokenizerSpec(kind="file", path="t.json", max_bytes=10)
    with pytest.raises(DataError, match=r"empty corpus"):
        load_or_train_tokenizer(TokenizerSpec(vocab_size=300), [], tmp_path / "e")
    assert not (tmp_path / "e" / "tokenizer.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read tokenizer file"):
        load_or_train_tokenizer(TokenizerSpec(kind="file", path=str(bad)), None, tmp_path)
