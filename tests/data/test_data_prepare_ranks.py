"""Preparation across the ranks of a launch (spdf.data.rank_share): two processes build one cache entry at once, each
tokenizing its own batches, and the entry is byte for byte the one-process entry, with and without a token budget
that stops the stream mid-way. The spdf run side (the shared-directory check, gloo) is in tests/train."""
import multiprocessing
from dataclasses import replace
from pathlib import Path

import pytest

from spdf.data import TextTokenizer, build_packed_splits

from test_data_prepare import killed_between_the_renames

SEQ, BATCH = 32, 2  # the ~200 KB source is 17 modules: 9 batches, shared out 5 / 4


def _build(source, tokenizer_path, cache_dir, ranks=(0, 1)):
    _, _, meta = build_packed_splits(source, TextTokenizer(tokenizer_path), cache_dir, SEQ, batch_docs=BATCH,
                                     progress=False, ranks=ranks)
    return meta


def _rank(rank, source, tokenizer_path, cache_dir, queue):
    meta = _build(source, tokenizer_path, cache_dir, (rank, 2))
    queue.put((rank, meta["rank_batches"], meta["dir"]))


def _files(entry) -> dict:
    return {name: (Path(entry) / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}


def _two_ranks(source, tokenizer_path, cache_dir) -> list[tuple]:
    """(rank, batches it tokenized, entry) of both ranks of a two-process build."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, source, tokenizer_path, cache_dir, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.exitcode is None:  # a rank waiting for a batch no rank will write
            for q in procs:
                q.kill()
            pytest.fail("the ranks did not finish")
        assert p.exitcode == 0
    return sorted(queue.get(timeout=5) for _ in procs)


@pytest.mark.parametrize("max_tokens", [None, 82_000])  # 82k: the cut falls in batch 3, rank 1's
def test_two_ranks_build_the_bytes_of_one_process(tmp_path, small_source, small_tokenizer, max_tokens):
    source = replace(small_source, val_fraction=0.2, workers=1, max_tokens=max_tokens)
    reference = _build(source, small_tokenizer.path, tmp_path / "one")
    assert reference["truncated"] == (max_tokens is not None)
    done = _two_ranks(source, small_tokenizer.path, tmp_path / "two")
    assert all(batches > 0 for _, batches, _ in done), done  # each rank tokenized a share
    entry = Path(done[0][2])
    ours, theirs = _files(entry), _files(reference["dir"])
    assert ours["train.bin"] == theirs["train.bin"] and ours["val.bin"] == theirs["val.bin"]
    for name in (".train.bin.partial", ".progress.json"):
        assert not (entry / name).exists()
    assert not list((entry / ".spool-2").glob("*.npz"))  # every handed-over batch was taken or cleaned up


def test_two_ranks_agree_to_start_over_a_commit_that_cannot_be_resumed(tmp_path, small_source, small_tokenizer,
                                                                       monkeypatch):
    """Rank 0 starts a build killed among its renames over (its partial train file is gone); a helper that resumed
    from the commit instead would never write the early batches rank 0 then waits for."""
    source = replace(small_source, val_fraction=0.2, workers=1)
    reference = _build(source, small_tokenizer.path, tmp_path / "one")
    entry = killed_between_the_renames(source, small_tokenizer, tmp_path / "two", monkeypatch)
    done = _two_ranks(source, small_tokenizer.path, tmp_path / "two")
    assert Path(done[0][2]) == entry
    ours, theirs = _files(entry), _files(reference["dir"])
    assert ours["train.bin"] == theirs["train.bin"] and ours["val.bin"] == theirs["val.bin"]
