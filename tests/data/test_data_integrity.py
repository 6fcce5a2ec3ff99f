"""What a run reads is checked, not only its size: the packed cache's chunk checksums (written when it is made,
verified when it is reused), the run directory's tokenizer against the sha256 recorded beside it, and token ids
against the model's vocabulary (a clear error, never the embedding's IndexError)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from spdf.data import DataError, PackedDataset, TextTokenizer, TokenizerSpec, build_packed_splits
from spdf.data import checksums, load_or_train_tokenizer
from spdf.train.batches import BatchSource

SEQ = 32


@pytest.fixture()
def entry(tmp_path, small_source, small_tokenizer):
    source = replace(small_source, val_fraction=0.2)
    _, _, meta = build_packed_splits(source, small_tokenizer, tmp_path, SEQ, progress=False)
    return source, tmp_path / meta["key"][:24], meta


def _rebuild(entry, tokenizer, **kwargs):
    source, where, _ = entry
    return build_packed_splits(source, tokenizer, where.parent, SEQ, progress=False, **kwargs)


def test_a_new_entry_records_chunk_checksums_and_reuses_them(entry, small_tokenizer):
    _, where, meta = entry
    for split in meta["splits"].values():
        assert split["checksums"]["crc32"] and split["checksums"]["chunk_bytes"] == checksums.CHUNK_BYTES
    assert _rebuild(entry, small_tokenizer)[2]["cache_hit"]


def test_zeroed_bytes_inside_the_cache_are_refused_naming_the_file(entry, small_tokenizer):
    _, where, meta = entry
    train_bin = where / "train.bin"
    data = bytearray(train_bin.read_bytes())
    data[1000:5000] = bytes(4000)  # the size is unchanged: the old size check saw nothing
    train_bin.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"data cache {train_bin}: bytes 0-[0-9,]+ do not match the checksum"):
        _rebuild(entry, small_tokenizer)
    _rebuild(entry, small_tokenizer, verify=False)  # a rank that leaves the check to the main process


def test_the_damaged_chunk_is_located(tmp_path, monkeypatch):
    file = tmp_path / "train.bin"
    file.write_bytes(np.arange(5000, dtype=np.uint16).tobytes())
    recorded = checksums.chunk_checksums(file, chunk=1024)
    assert len(recorded["crc32"]) == 10
    data = bytearray(file.read_bytes())
    data[3000] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bytes 2,048-3,072 do not match"):
        checksums.verify_chunk_checksums(file, recorded, tmp_path)
    file.write_bytes(bytes(data[:4000]))
    with pytest.raises(DataError, match="4 chunks on disk, 10 recorded"):
        checksums.verify_chunk_checksums(file, recorded, tmp_path)


def test_an_older_entry_without_checksums_is_used_with_a_warning(entry, small_tokenizer, capsys):
    _, where, meta = entry
    saved = json.loads((where / "meta.json").read_text())
    for split in saved["splits"].values():
        del split["checksums"]
    (where / "meta.json").write_text(json.dumps(saved))
    assert _rebuild(entry, small_tokenizer)[2]["cache_hit"]
    assert "without checksums" in capsys.readouterr().err


def test_unreadable_meta_json_names_it(entry, small_tokenizer):
    _, where, _ = entry
    (where / "meta.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(DataError, match=f"{where / 'meta.json'} is unreadable"):
        _rebuild(entry, small_tokenizer)


def test_token_ids_outside_the_vocabulary_are_a_data_error(tmp_path):
    file = tmp_path / "train.bin"
    file.write_bytes(np.array([1, 2, 3, 999, 4, 5, 6, 7, 8], dtype=np.uint16).tobytes())
    data = PackedDataset(file, 4)
    source = BatchSource(data, data, seed=0, rank=0, world_size=1, vocab_size=500)
    with pytest.raises(DataError, match=f"token id 999 in the training data \\({file}\\) is outside the model's "
                                        f"vocabulary of 500 tokens"):
        source.next_step(2, 2)
    with pytest.raises(DataError, match="validation data"):
        list(source.val_batches(1, 2))
    fine = BatchSource(data, data, seed=0, rank=0, world_size=1, vocab_size=1000)
    assert len(fine.next_step(2, 2)) == 2


def _flip_a_letter(path):
    """Change one character inside a token string: still valid JSON, a different vocabulary."""
    text = path.read_text()
    at = text.index('"vocab"') + 40
    while not text[at].isalpha():
        at += 1
    path.write_text(text[:at] + ("a" if text[at] != "a" else "b") + text[at + 1:])
    json.loads(path.read_text())


def test_a_run_directorys_tokenizer_is_verified_against_its_record(tmp_path, small_source):
    from spdf.data import iter_documents
    spec = TokenizerSpec(kind="train", vocab_size=300, max_bytes=50_000)
    made = load_or_train_tokenizer(spec, iter_documents(small_source), tmp_path)
    assert json.loads((tmp_path / "tokenizer_spec.json").read_text())["sha256"] == made.file_hash
    assert load_or_train_tokenizer(spec, None, tmp_path).file_hash == made.file_hash  # reused as it was
    _flip_a_letter(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="does not match the checksum recorded in .*tokenizer_spec.json"):
        load_or_train_tokenizer(spec, None, tmp_path)
    with pytest.raises(DataError, match="tokenizer.json does not match"):
        TextTokenizer(tmp_path / "tokenizer.json")
