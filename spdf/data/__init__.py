"""spdf.data: pre-training corpora → packed token rows; downstream tasks → prompt/completion rows.

Public API (inputs are plain dicts, as a recipe writes them; every user-caused problem raises DataError):

    DataError(ValueError)
    iter_documents(source: dict) -> Iterator[str]
        source: {"source": "stdlib", "part": "pretrain"|"heldout", "heldout_fraction": 0.1, "max_bytes": int|None}
              | {"source": "files", "paths": [path or glob, ...], "text_field": "text"}      # .txt .jsonl .parquet
              | {"source": "hf", "name": str, "config": str|None, "split": "train", "streaming": True,
                 "text_field": "text"}
              any of them + "max_tokens": int (token budget, read by build_packed_splits)
    load_or_train_tokenizer(spec: dict, documents: Iterable[str] | None, save_dir) -> TextTokenizer
        spec: {"kind": "train", "vocab_size": 4096, "max_bytes": None} | {"kind": "file", "path": str}
            | {"kind": "hub", "name": "gpt2"}
    TextTokenizer: .encode(str), .encode_batch(list[str]), .decode(ids), .eos_id, .vocab_size, .path, .file_hash
    build_packed_splits(source: dict, tokenizer: TextTokenizer, cache_dir, seq_len: int, val_fraction=0.02,
                        batch_docs=256, progress=True) -> (train: PackedDataset, val: PackedDataset, meta: dict)
    PackedDataset[i] -> LongTensor(seq_len + 1)          # inputs = row[:-1], targets = row[1:]
    ResumableSampler(dataset_len, seed=0, rank=0, world_size=1, shuffle=True)
        .state_dict(consumed=None) -> {"epoch", "offset", ...}, .load_state_dict(state), .set_epoch(epoch)
    load_finetune_task(task: dict, split: str) -> TaskSplit (list-like of Example(prompt, completion, references))
        task: {"task": "docstring"|"jsonl"|"e2e"|"webnlg"|"dart"|"curation", "max_examples": int|None, ...}
    FinetuneDataset(examples, tokenizer, max_len)[i] -> {"input_ids", "labels"}   # labels -100 on the prompt
    pad_collate(batch, pad_id=0) -> {"input_ids", "labels", "attention_mask"}     # [B, T], right-padded

Both kinds of rows feed a causal LM the same way: inputs = ids[:, :-1], targets = labels[:, 1:] (a packed row is
its own labels).
"""
from .errors import DataError
from .finetune import Example, FinetuneDataset, pad_collate
from .packing import PackedDataset, build_packed_splits
from .sampler import ResumableSampler
from .sources import iter_documents
from .tasks import TaskSplit, load_finetune_task
from .tokenizer import TextTokenizer, load_or_train_tokenizer

__all__ = ["DataError", "iter_documents", "load_or_train_tokenizer", "TextTokenizer", "build_packed_splits",
           "PackedDataset", "ResumableSampler", "load_finetune_task", "TaskSplit", "Example", "FinetuneDataset",
           "pad_collate"]
