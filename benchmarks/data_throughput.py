"""Data pipeline throughput at the offline demo's size: stdlib corpus build, BPE training, tokenize+pack, cache hit,
and the docstring fine-tuning task. Writes benchmarks/results/data_throughput.{json,md}.

    python benchmarks/data_throughput.py [--max-bytes 4000000] [--vocab-size 4096] [--seq-len 128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import tokenizers
import torch

from spdf.data import (DataSpec, FinetuneDataset, TaskSpec, TokenizerSpec, build_packed_splits, iter_documents,
                       load_finetune_task, load_or_train_tokenizer)

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=4_000_000)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    args = ap.parse_args()
    source = DataSpec(source="stdlib", part="pretrain", max_bytes=args.max_bytes, val_fraction=args.val_fraction)

    with tempfile.TemporaryDirectory() as tmp:
        docs, t_corpus = timed(lambda: list(iter_documents(source)))
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        tok, t_train = timed(lambda: load_or_train_tokenizer(TokenizerSpec(vocab_size=args.vocab_size),
                                                             docs, Path(tmp) / "tok"))
        (train, val, meta), t_pack = timed(lambda: build_packed_splits(source, tok, Path(tmp) / "cache", args.seq_len,
                                                                       progress=False))
        _, t_hit = timed(lambda: build_packed_splits(source, tok, Path(tmp) / "cache", args.seq_len, progress=False))
        n_tokens = train.n_tokens + val.n_tokens
        task, t_task = timed(lambda: load_finetune_task(TaskSpec(task="docstring"), "train"))
        rows, t_rows = timed(lambda: FinetuneDataset(task, tok, args.seq_len + 1))

    result = {
        "config": {**vars(args), "source": source},
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "tokenizers": tokenizers.__version__, "machine": platform.machine()},
        "corpus": {"documents": len(docs), "bytes": n_bytes, "seconds": round(t_corpus, 3),
                   "MB_per_s": round(n_bytes / 1e6 / t_corpus, 1)},
        "tokenizer_training": {"vocab_size": tok.vocab_size, "seconds": round(t_train, 3),
                               "MB_per_s": round(n_bytes / 1e6 / t_train, 1)},
        "tokenize_pack": {"tokens": n_tokens, "train_sequences": len(train), "val_sequences": len(val),
                          "bytes_per_token": round(n_bytes / n_tokens, 2), "seconds": round(t_pack, 3),
                          "tokens_per_s": round(n_tokens / t_pack), "MB_per_s": round(n_bytes / 1e6 / t_pack, 1)},
        "cache_hit_seconds": round(t_hit, 4),
        "docstring_task": {"train_examples": len(task), "load_seconds": round(t_task, 3),
                           "tokenize_seconds": round(t_rows, 3)},
        "total_prepare_seconds": round(t_corpus + t_train + t_pack, 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    c, tt, tp = result["corpus"], result["tokenizer_training"], result["tokenize_pack"]
    md = [
        "# Data pipeline throughput (offline demo size)",
        "",
        f"stdlib pretrain corpus capped at {args.max_bytes:,} bytes, byte-level BPE vocab {tok.vocab_size}, "
        f"seq_len {args.seq_len}, val_fraction {args.val_fraction}. Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, tokenizers {tokenizers.__version__}.",
        "",
        "| stage | size | seconds | throughput |",
        "|---|---|---|---|",
        f"| corpus build (read + split stdlib) | {c['documents']} modules, {c['bytes'] / 1e6:.2f} MB | "
        f"{c['seconds']:.2f} | {c['MB_per_s']} MB/s |",
        f"| BPE training | vocab {tt['vocab_size']} | {tt['seconds']:.2f} | {tt['MB_per_s']} MB/s |",
        f"| tokenize + pack + write | {tp['tokens']:,} tokens ({tp['train_sequences']} train / "
        f"{tp['val_sequences']} val rows) | {tp['seconds']:.2f} | {tp['tokens_per_s']:,} tok/s, "
        f"{tp['MB_per_s']} MB/s |",
        f"| cache hit (second call) | - | {result['cache_hit_seconds']:.4f} | - |",
        f"| docstring task (held-out modules) | {len(task)} train examples | "
        f"{t_task:.2f} load + {t_rows:.2f} tokenize | - |",
        "",
        f"Corpus + tokenizer + packing: **{result['total_prepare_seconds']:.2f} s**.",
        "",
    ]
    (RESULTS / "data_throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
