"""spdf.data: pre-training corpora → packed token rows; downstream tasks → prompt/completion rows.

Public API (settings are the typed specs of spdf.data.specs, which a recipe's data/task/tokenizer blocks are;
every user-caused problem while reading data raises DataError):

    DataSpec, TaskSpec, TokenizerSpec, SourceSpec         # the settings, validated at construction (RecipeError)
    DataError(SpdfUserError, a ValueError)
    iter_documents(source: DataSpec) -> Iterator[str]
    load_or_train_tokenizer(spec: TokenizerSpec, documents: Iterable[str] | None, save_dir) -> TextTokenizer
    TextTokenizer: .encode(str), .encode_batch(list[str]), .decode(ids), .eos_id, .vocab_size, .path, .file_hash
    build_packed_splits(source: DataSpec, tokenizer, cache_dir, seq_len: int, batch_docs=256, progress=True)
        -> (train: PackedDataset, val: PackedDataset, meta: dict)
    PackedDataset[i] -> LongTensor(seq_len + 1)          # inputs = row[:-1], targets = row[1:]
    MixedDataset({name: dataset}, {name: weight})        # a pre-training mixture read as one dataset (weights are
        .interleaved(count) -> indices                   #   token shares), drawn from by
    MixtureSampler(mixed, seed, rank, world_size)        #   .draw(), .rows_by_source(), state_dict / load_state_dict
    ResumableSampler(dataset_len, seed=0, rank=0, world_size=1, shuffle=True)
        .draw() -> int, .state_dict(consumed=None) -> {"epoch", "offset", ...}, .load_state_dict(state), .set_epoch(epoch)
    load_finetune_task(task: TaskSpec, split: str) -> TaskSplit (list-like of Example(prompt, completion, references),
        one per input with all its references)
    task_splits(task: str) -> the split names a task has
    TASKS, register_task(Task(...)): the task registry (spdf.data.task_registry): loader, splits, metrics, settings
    FinetuneDataset(examples, tokenizer, max_len)[i] -> {"input_ids", "labels"}   # one row per (input, reference)
    pad_collate(batch, pad_id=0) -> {"input_ids", "labels", "attention_mask"}     # [B, T], right-padded

Both kinds of rows feed a causal LM the same way: inputs = ids[:, :-1], targets = labels[:, 1:] (a packed row is
its own labels).
"""
from .errors import DataError
from .finetune import Example, FinetuneDataset, pad_collate
from .mixture import MixedDataset, MixtureSampler
from .packing import PackedDataset, build_packed_splits
from .sampler import ResumableSampler
from .sources import iter_documents
from .specs import DataSpec, SourceSpec, TaskSpec, TokenizerSpec
from .task_registry import TASKS, Task, register_task, task_splits
from .tasks import TaskSplit, load_finetune_task
from .tokenizer import TextTokenizer, load_or_train_tokenizer

__all__ = ["DataSpec", "SourceSpec", "TaskSpec", "TokenizerSpec", "MixedDataset", "MixtureSampler", "TASKS", "Task",
           "register_task", "task_splits", "DataError", "iter_documents",
           "load_or_train_tokenizer", "TextTokenizer", "build_packed_splits",
           "PackedDataset", "ResumableSampler", "load_finetune_task", "TaskSplit", "Example", "FinetuneDataset",
           "pad_collate"]
