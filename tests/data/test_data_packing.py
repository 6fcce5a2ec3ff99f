import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from spdf.data import DataError, DataSpec, PackedDataset, build_packed_splits, iter_documents
from spdf.data import packing
from spdf.data.sources import stable_fraction

SEQ = 32


def _expected_streams(source, tok, val_fraction):
    streams = {"train": [], "val": []}
    for doc in iter_documents(source):
        split = "val" if stable_fraction(doc) < val_fraction else "train"
        streams[split] += tok.encode(doc) + [tok.eos_id]
    return streams


@pytest.fixture()
def packed(tmp_path, small_source, small_tokenizer):
    return build_packed_splits(replace(small_source, val_fraction=0.2), small_tokenizer, tmp_path, SEQ, progress=False)


def test_rows_have_seq_len_plus_one_tokens_and_round_trip_exactly(packed, small_source, small_tokenizer):
    train, val, meta = packed
    expected = _expected_streams(small_source, small_tokenizer, 0.2)
    assert meta["dtype"] == "uint16" and train.tokens.dtype == np.uint16
    for split, ds in (("train", train), ("val", val)):
        stream = expected[split]
        assert list(ds.tokens) == stream  # exact: same ids, EOS after every document, document order kept
        assert len(ds) == (len(stream) - 1) // SEQ == meta["splits"][split]["sequences"] > 0
        rows = [ds[i] for i in range(len(ds))]
        assert all(r.dtype == torch.long and r.shape == (SEQ + 1,) for r in rows)
        # consecutive rows overlap by one token: inputs/targets of all rows tile the stream
        rebuilt = torch.cat([r[:-1] for r in rows] + [rows[-1][-1:]]).tolist()
        assert rebuilt == stream[: len(ds) * SEQ + 1]
        assert meta["splits"][split]["dropped_tokens"] == len(stream) - len(rebuilt)
    n_val_docs = sum(stable_fraction(d) < 0.2 for d in iter_documents(small_source))
    assert int((val.tokens == small_tokenizer.eos_id).sum()) == n_val_docs == meta["splits"]["val"]["documents"]
    assert meta["splits"]["train"]["documents"] > 0
    with pytest.raises(IndexError):
        train[len(train)]


def test_second_call_reuses_the_cache_without_tokenizing(packed, tmp_path, small_source, small_tokenizer,
                                                         monkeypatch):
    _, _, meta = packed
    entry = tmp_path / meta["key"][:24]
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized a cached source")

    monkeypatch.setattr(small_tokenizer, "encode_batch", fail)
    monkeypatch.setattr(packing, "iter_documents", fail)
    train, _, meta2 = build_packed_splits(replace(small_source, val_fraction=0.2), small_tokenizer, tmp_path, SEQ,
                                          progress=False)
    assert meta2["cache_hit"] and not meta["cache_hit"]
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    assert len(train) == meta["splits"]["train"]["sequences"]


def test_cache_key_changes_with_seq_len_and_split(packed, tmp_path, small_source, small_tokenizer):
    _, _, meta = packed
    _, _, other = build_packed_splits(replace(small_source, val_fraction=0.2), small_tokenizer, tmp_path, SEQ + 1,
                                      progress=False)
    _, _, third = build_packed_splits(replace(small_source, val_fraction=0.3), small_tokenizer, tmp_path, SEQ,
                                      progress=False)
    assert len({meta["dir"], other["dir"], third["dir"]}) == 3
    assert not other["cache_hit"] and not third["cache_hit"]


def test_meta_is_written_last_and_a_crash_leaves_no_entry(tmp_path, small_source, small_tokenizer, monkeypatch):
    real = packing.tokenize_splits

    def crash(paths, *args, **kwargs):
        paths["train"].write_bytes(b"\x01\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(packing, "tokenize_splits", crash)
    with pytest.raises(KeyboardInterrupt):
        build_packed_splits(replace(small_source, val_fraction=0.2), small_tokenizer, tmp_path, SEQ,
                            progress=False)
    entries = list(tmp_path.iterdir())
    visible = lambda: sorted(p.name for p in entries[0].iterdir() if not p.name.startswith("."))  # noqa: E731
    assert len(entries) == 1 and visible() == []  # no meta and no split file: only the hidden partial state
    monkeypatch.setattr(packing, "tokenize_splits", real)
    train, _, meta = build_packed_splits(replace(small_source, val_fraction=0.2), small_tokenizer, tmp_path, SEQ,
                                         progress=False)
    assert not meta["cache_hit"] and len(train) > 0
    assert visible() == ["meta.json", "train.bin", "val.bin"]
    # the partial files became train.bin/val.bin and the progress record went with the completion
    assert sorted(p.name for p in entries[0].iterdir() if p.name.startswith(".")) == [".build.lock"]
    saved = json.loads((entries[0] / "meta.json").read_text())
    assert saved["splits"] == meta["splits"] and "cache_hit" not in saved


def test_damaged_cache_entry_is_rebuilt(packed, tmp_path, small_source, small_tokenizer):
    _, _, meta = packed
    train_bin = tmp_path / meta["key"][:24] / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:100])
    train, _, again = build_packed_splits(replace(small_source, val_fraction=0.2), small_tokenizer, tmp_path, SEQ,
                                          progress=False)
    assert not again["cache_hit"] and train.n_tokens == meta["splits"]["train"]["tokens"]


def test_token_budget_stops_a_source_at_exactly_max_tokens(tmp_path, small_tokenizer):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(200)))
    source = DataSpec(source="files", paths=(str(docs),), max_tokens=3000)
    train, val, meta = build_packed_splits(replace(source, val_fraction=0.1), small_tokenizer, tmp_path / "c", SEQ,
                                           progress=False)
    assert train.n_tokens + val.n_tokens == 3000 and meta["truncated"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] < 200


def test_packed_dataset_pickles_without_its_memmap_and_loads_batches(packed):
    train, _, _ = packed
    _ = train[0]
    blob = pickle.dumps(train)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert torch.equal(clone[3], train[3])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.long


def test_large_vocab_uses_uint32_tokens():
    assert packing.token_dtype(65535) == "uint16" and packing.token_dtype(65536) == "uint32"
    assert packing.token_dtype(50257) == "uint16"


def test_packing_errors_name_the_problem(tmp_path, small_tokenizer, small_source):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"gave 0 training tokens"):
        build_packed_splits(DataSpec(source="files", paths=(str(empty),)), small_tokenizer, tmp_path / "c", SEQ,
                            progress=False)
    assert not any((tmp_path / "c").rglob("*.bin*"))
    with pytest.raises(DataError, match=r"seq_len must be a positive integer"):
        build_packed_splits(small_source, small_tokenizer, tmp_path / "c", 0)
    with pytest.raises(DataError, match=r"token file not found"):
        PackedDataset(tmp_path / "missing.bin", SEQ)


def test_editing_a_source_file_invalidates_its_cache(tmp_path, small_tokenizer):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(20)))
    source = DataSpec(source="files", paths=(str(docs),), val_fraction=0.3)
    _, _, first = build_packed_splits(source, small_tokenizer, tmp_path / "c", SEQ, progress=False)
    docs.write_text(docs.read_text() + json.dumps({"text": "one more document " * 30}) + "\n")
    _, _, second = build_packed_splits(source, small_tokenizer, tmp_path / "c", SEQ, progress=False)
    assert not second["cache_hit"] and second["dir"] != first["dir"]

    def total(meta, key):
        return sum(split[key] for split in meta["splits"].values())

    assert total(second, "documents") == 21 and total(second, "tokens") > total(first, "tokens")
