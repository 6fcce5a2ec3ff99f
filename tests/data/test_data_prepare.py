"""Parallel, resumable tokenization (spdf.data.prepare) through build_packed_splits: same bytes for any worker count,
and a preparation interrupted after a committed chunk resumes to the bytes of an uninterrupted one."""
import functools
import itertools
import json
import os
from dataclasses import replace

import pytest

from spdf.data import build_packed_splits, iter_documents
from spdf.data import packing, prepare

SEQ = 32
BATCH = 2  # small batches: the ~200 KB source is 17 modules, so the pool and the commits get several


def _build(source, tokenizer, cache_dir, **kwargs):
    return build_packed_splits(replace(source, val_fraction=0.2, **kwargs), tokenizer, cache_dir, SEQ,
                               batch_docs=BATCH, progress=False)


def _files(meta) -> dict:
    entry = packing.Path(meta["dir"])
    return {name: (entry / name).read_bytes() for name in ("train.bin", "val.bin")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_source, small_tokenizer):
    """The uninterrupted one-worker build."""
    return _build(small_source, small_tokenizer, tmp_path_factory.mktemp("one"), workers=1)[2]


def test_two_workers_write_the_same_bytes_as_one(reference, tmp_path, small_source, small_tokenizer):
    assert len(list(iter_documents(small_source))) > 4 * BATCH  # enough batches for both workers to get some
    meta = _build(small_source, small_tokenizer, tmp_path, workers=2)[2]
    assert _files(meta) == _files(reference) and meta["splits"] == reference["splits"]
    # the worker count is not part of the cache key: both builds are the same entry
    assert packing.Path(meta["dir"]).name == packing.Path(reference["dir"]).name


def test_interrupted_preparation_resumes_to_the_same_bytes(reference, tmp_path, small_source, small_tokenizer,
                                                           monkeypatch):
    # commit after every batch, and let the source fail in the middle of its fourth batch
    monkeypatch.setattr(packing, "tokenize_splits", functools.partial(prepare.tokenize_splits, commit_batches=1))
    real_docs = packing.iter_documents

    def failing_docs(source):
        for doc in itertools.islice(real_docs(source), 3 * BATCH + 1):
            yield doc
        raise KeyboardInterrupt

    monkeypatch.setattr(packing, "iter_documents", failing_docs)
    with pytest.raises(KeyboardInterrupt):  # one worker: no batches read ahead of the commits
        _build(small_source, small_tokenizer, tmp_path, workers=1)
    (entry,) = tmp_path.iterdir()
    assert not (entry / "meta.json").exists() and not (entry / "train.bin").exists()
    committed = json.loads((entry / ".progress.json").read_text())
    assert committed["documents"] == 3 * BATCH and committed["bytes"]["train"] > 0

    monkeypatch.setattr(packing, "iter_documents", real_docs)
    # after the last commit, garbage was appended (a kill mid-write): the resume must cut it off
    with open(entry / ".train.bin.partial", "ab") as f:
        f.write(b"\xff" * 123)
    encoded = []
    real_encode = prepare._encode
    monkeypatch.setattr(prepare, "_encode", lambda batch, *a: encoded.append(len(batch)) or real_encode(batch, *a))
    meta = _build(small_source, small_tokenizer, tmp_path, workers=1)[2]  # in-process, so _encode is observed
    assert not meta["cache_hit"] and _files(meta) == _files(reference) and meta["splits"] == reference["splits"]
    # only what came after the commit was tokenized again
    assert sum(encoded) == len(list(iter_documents(small_source))) - 3 * BATCH
    assert not (entry / ".progress.json").exists() and not (entry / ".train.bin.partial").exists()


def test_progress_of_another_key_is_ignored(tmp_path, small_tokenizer):
    paths = {s: tmp_path / f"{s}.bin" for s in prepare.SPLITS}
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps({"key": "other", "documents": 3, "bytes": {"train": 4, "val": 0},
                                    "counts": {s: {"tokens": 2, "documents": 1} for s in prepare.SPLITS}}))
    paths["train"].write_bytes(b"\x01\x00" * 2)
    result = prepare.tokenize_splits(paths, progress, "mine", ["a b", "c"], small_tokenizer, 0.0, None, "uint16")
    assert result["counts"]["train"]["documents"] == 2  # started over: the other key's state is not this build's
    expected = [t for d in ("a b", "c") for t in small_tokenizer.encode(d) + [small_tokenizer.eos_id]]
    assert list(packing.np.fromfile(paths["train"], dtype="uint16")) == expected


def test_interrupted_pool_resumes_to_the_same_bytes(reference, tmp_path, small_source, small_tokenizer, monkeypatch):
    # two workers read batches ahead of the commits: what was read but not written is tokenized again on resume
    monkeypatch.setattr(packing, "tokenize_splits", functools.partial(prepare.tokenize_splits, commit_batches=1))
    real_docs = packing.iter_documents

    def failing_docs(source):
        yield from itertools.islice(real_docs(source), 7 * BATCH + 1)
        raise KeyboardInterrupt

    monkeypatch.setattr(packing, "iter_documents", failing_docs)
    with pytest.raises(KeyboardInterrupt):
        _build(small_source, small_tokenizer, tmp_path, workers=2)
    (entry,) = tmp_path.iterdir()
    committed = json.loads((entry / ".progress.json").read_text())["documents"]
    assert 0 < committed < 7 * BATCH and committed % BATCH == 0  # whole batches, fewer than were read
    monkeypatch.setattr(packing, "iter_documents", real_docs)
    meta = _build(small_source, small_tokenizer, tmp_path, workers=2)[2]
    assert _files(meta) == _files(reference) and meta["splits"] == reference["splits"]


def killed_between_the_renames(source, tokenizer, cache_dir, monkeypatch) -> packing.Path:
    """The cache entry a build leaves when killed as it finishes: train.bin renamed into place, val.bin not yet, its
    progress file (commits after every batch) still there. Returns the entry."""
    monkeypatch.setattr(packing, "tokenize_splits", functools.partial(prepare.tokenize_splits, commit_batches=1))
    real_replace = os.replace

    def killed(src, dst):
        if packing.Path(dst).name == "val.bin":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(packing.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            build_packed_splits(source, tokenizer, cache_dir, SEQ, batch_docs=BATCH, progress=False)
    monkeypatch.undo()
    (entry,) = packing.Path(cache_dir).iterdir()
    assert (entry / "train.bin").is_file() and not (entry / ".train.bin.partial").exists()
    assert json.loads((entry / ".progress.json").read_text())["bytes"]["train"] > 0
    return entry


def test_a_build_killed_between_its_renames_starts_over(reference, tmp_path, small_source, small_tokenizer,
                                                        monkeypatch, capsys):
    """Resuming that commit would pad the missing partial file with zeros up to its committed size: an entry whose
    train.bin begins with token 0s, checksummed as if they were data, and reused silently."""
    source = replace(small_source, val_fraction=0.2, workers=1)
    entry = killed_between_the_renames(source, small_tokenizer, tmp_path, monkeypatch)
    capsys.readouterr()
    meta = _build(small_source, small_tokenizer, tmp_path, workers=1)[2]
    assert packing.Path(meta["dir"]) == entry and not meta["cache_hit"]
    assert _files(meta) == _files(reference) and meta["splits"] == reference["splits"]
    assert "tokenizing this cache entry again from the start" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ['{"key": "k", "docu', '{"key": "k"}', "[1]", "\xff\xfe"])
def test_an_unreadable_progress_file_starts_the_preparation_over(tmp_path, small_tokenizer, damage, capsys):
    """The commit record of a preparation cut short or edited by hand: started over (the same bytes), never a
    traceback."""
    paths = {s: tmp_path / f"{s}.bin" for s in prepare.SPLITS}
    progress = tmp_path / "progress.json"
    progress.write_bytes(damage.encode("latin-1"))
    paths["train"].write_bytes(b"\x01\x00" * 7)
    result = prepare.tokenize_splits(paths, progress, "k", ["a b", "c"], small_tokenizer, 0.0, None, "uint16")
    assert result["counts"]["train"]["documents"] == 2
    expected = [t for d in ("a b", "c") for t in small_tokenizer.encode(d) + [small_tokenizer.eos_id]]
    assert list(packing.np.fromfile(paths["train"], dtype="uint16")) == expected
    assert "progress.json is unreadable" in capsys.readouterr().err
