"""Tokenize+pack throughput of `spdf prepare` with 1 and 2 worker processes, and the wall time it projects for the
Pile budget of the XL recipe on a 64-core node. Writes benchmarks/results/prepare.{json,md}.

    python benchmarks/prepare.py [--repeat 8] [--vocab-size 8192] [--batch-docs 64]

The corpus is the standard library's source (~8 MB), `--repeat` times over, written to a .jsonl file (so reading it
costs what reading a local shard costs); big enough that the pool's start-up (each worker imports spdf) is small. TOKENIZERS_PARALLELISM=false throughout: one worker is then one core, which is what the ratio
and the projection are about (a worker of `spdf prepare` runs that way too).
"""
from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from machine import cpu_name  # noqa: E402
from spdf.data import DataSpec, TokenizerSpec, build_packed_splits, iter_documents, load_or_train_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PILE_TOKENS = 26.5e9
NODE_CORES = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--batch-docs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        docs = list(iter_documents(DataSpec(source="stdlib")))
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) * args.repeat)
        tok = load_or_train_tokenizer(TokenizerSpec(vocab_size=args.vocab_size), docs, Path(tmp) / "tok")
        runs = {}
        for workers in (1, 2):
            source = DataSpec(source="files", paths=(str(corpus),), workers=workers)
            start = time.perf_counter()
            train, val, meta = build_packed_splits(source, tok, Path(tmp) / f"cache{workers}", args.seq_len,
                                                   batch_docs=args.batch_docs, progress=False)
            seconds = time.perf_counter() - start
            tokens = train.n_tokens + val.n_tokens
            runs[workers] = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)}
        same = all((Path(tmp) / "cache1" / Path(meta["dir"]).name / f).read_bytes()
                   == (Path(meta["dir"]) / f).read_bytes() for f in ("train.bin", "val.bin"))
    ratio = runs[2]["tokens_per_s"] / runs[1]["tokens_per_s"]
    # linear in the cores at the measured 2-process efficiency: an optimistic bound, since the one reading and
    # writing process is not parallel and was not loaded to its limit by 2 workers
    node_rate = runs[1]["tokens_per_s"] * NODE_CORES * ratio / 2
    result = {
        "config": vars(args),
        "environment": {"python": platform.python_version(), "cpu": cpu_name(), "cpus": os.cpu_count()},
        "corpus": {"documents": len(docs) * args.repeat, "bytes": sum(len(d.encode()) for d in docs) * args.repeat},
        "workers": {str(k): v for k, v in runs.items()},
        "speedup_2_vs_1": round(ratio, 2),
        "byte_identical_1_vs_2": same,
        "projection": {"tokens": PILE_TOKENS, "cores": NODE_CORES, "tokens_per_s": round(node_rate),
                       "hours": round(PILE_TOKENS / node_rate / 3600, 2)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prepare.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v['tokens']:,} | {v['seconds']} | {v['tokens_per_s']:,} |" for k, v in runs.items())
    (RESULTS / "prepare.md").write_text(
        f"# spdf prepare: tokenize+pack throughput\n\n"
        f"`python benchmarks/prepare.py` on {result['environment']['cpu']} ({os.cpu_count()} CPUs), stdlib corpus "
        f"{result['corpus']['bytes'] / 1e6:.1f} MB as .jsonl, BPE vocab {args.vocab_size}, batches of "
        f"{args.batch_docs} documents.\n\n| workers | tokens | seconds | tokens/s |\n|---|---|---|---|\n{rows}\n\n"
        f"2 workers vs 1: {ratio:.2f}x; output byte-identical: {same}.\n\n"
        f"Projection for the XL recipe's Pile budget ({PILE_TOKENS / 1e9:.1f}B tokens) on a {NODE_CORES}-core node, "
        f"linear in the cores at the measured 2-worker efficiency ({ratio / 2:.0%}): "
        f"{node_rate / 1e6:.1f}M tokens/s, **{result['projection']['hours']} h**. Optimistic: the one process that "
        f"reads the source and writes the shards is serial, and 2 workers do not load it to its limit.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
