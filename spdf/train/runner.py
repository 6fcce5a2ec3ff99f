"""From a recipe to a finished run: tokenizer, model, sparsity, then each phase through the one loop.

The run directory's layout (recipe.yaml, tokenizer.json, metrics.jsonl, phases/<name>/{checkpoints,export,done.json})
is spdf.layout's; an export's own format is spdf.export's.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..export import (export_family, find_export, find_tokenizer, is_checkpoint, is_export, load_weights,
                      model_fingerprint, sparse_model, verify_export, write_export)
from ..data import (FinetuneDataset, MixedDataset, TokenizerSpec, build_packed_splits, iter_documents,
                    load_finetune_task, load_or_train_tokenizer)
from ..data.tokenizer import TextTokenizer, record_tokenizer
from ..flops import TrainingFlops
from ..fswrite import check_dir_target, read_json, replacing_file, write_json_atomic
from ..layout import CHECKPOINT_META, CONFIG_FILE, FINISHED_AT, MASKS_FILE, RunLayout
from ..model import family_of
from ..recipe import PhaseSpec, Recipe, RecipeError, model_config
from ..sparsity import densify, sparse_layers
from .batches import BatchSource
from .checkpoint import check_checkpoint
from .downstream import DownstreamEval, check_metrics_available
from .fsdp import check_parallelism, gathered, is_fsdp2, shard_family_blocks, use_fsdp2_on_cpu
from .lock import RunLock
from .loop import PhaseInputs, PhasePlan, PhaseRecords, PhaseRun, TrainState
from .metrics import MetricsLog
from .nonfinite import all_finite, state_tensors
from .parametrization import apply_supar_init
from .rank_data import packed_splits
from .preemption import StopRequest
from .run_dir import RefusedStart, check_run_dir, make_run_dir, record_recipe
from .sparsity_plan import sparsify_recipe


def data_cache_dir() -> Path:
    return Path(os.environ.get("SPDF_CACHE_DIR", Path.home() / ".cache" / "spdf" / "data"))


def _mixed_precision(precision: str) -> str:
    if precision == "fp16" and not torch.cuda.is_available():
        # refused rather than silently trained in fp32: the user asked for something this machine cannot do
        raise RecipeError("precision: fp16 needs a CUDA GPU (accelerate has no fp16 training on CPU); use "
                          "precision: fp32, bf16 or auto on this machine")
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def _tokenizer(recipe: Recipe, run_dir: Path, init_from: Path | None):
    if init_from is not None:  # fine-tuning a checkpoint: its tokenizer, never a new one
        path = find_tokenizer(find_export(init_from))
        if path is None:
            raise CheckpointError(f"{init_from} has no tokenizer.json next to its weights (or in its run directory)")
        return load_or_train_tokenizer(TokenizerSpec(kind="file", path=str(_keep_copy(path, run_dir))), None, run_dir)
    t = recipe.tokenizer
    if t.kind == "file":
        return load_or_train_tokenizer(TokenizerSpec(kind="file", path=str(_keep_copy(Path(t.path), run_dir))), None,
                                       run_dir)
    pretrain = next((p for p in recipe.phases if p.kind == "pretrain"), None)
    documents = None
    if t.kind == "train" and pretrain is not None:  # the first pre-training phase's corpora, one after the other
        documents = itertools.chain.from_iterable(map(iter_documents, recipe.corpora(pretrain).values()))
    return load_or_train_tokenizer(t, documents, run_dir)


def _keep_copy(tokenizer_file: Path, run_dir: Path) -> Path:
    """Copy a tokenizer file into the run directory, so the run stays usable if the original moves or changes."""
    kept = RunLayout(run_dir).tokenizer
    if not tokenizer_file.is_file():
        raise RecipeError(f"tokenizer file not found: '{tokenizer_file}'")
    if kept.exists():
        TextTokenizer(kept)  # a copy damaged since it was made is named as such (its recorded checksum)
        if kept.read_bytes() != tokenizer_file.read_bytes():
            raise RecipeError(f"{kept} differs from the tokenizer '{tokenizer_file}' this run asks for; "
                              f"use another run_dir")
        return kept
    data = tokenizer_file.read_bytes()
    TextTokenizer(tokenizer_file)  # verified where it comes from (a run directory's, against its record)
    # its checksum, verified whenever the run loads it; written first, as a trained tokenizer's: a copy killed
    # between the two files is made again, never left without its record (and so never verified)
    record_tokenizer(kept, {"kind": "file"}, data)
    with replacing_file(kept) as tmp:  # every rank copies the same bytes, each through its own temporary file
        tmp.write_bytes(data)
    return kept


def _micro_batch(phase: PhaseSpec, world: int) -> int:
    """Sequences per process per forward: the recipe's, or else the whole per-process share of the batch."""
    micro = phase.micro_batch_size or max(phase.batch_size // world, 1)
    if phase.batch_size % (micro * world):
        raise RecipeError(f"phases.{phase.name}.batch_size ({phase.batch_size}) must be divisible by "
                          f"micro_batch_size ({micro}) × processes ({world})")
    return micro


def _plan(recipe: Recipe, phase: PhaseSpec, train_len: int, world: int) -> PhasePlan:
    micro = _micro_batch(phase, world)
    tokens_per_step = phase.batch_size * phase.seq_len
    if phase.steps is not None:
        steps = phase.steps
    elif phase.tokens is not None:
        steps = math.ceil(phase.tokens / tokens_per_step)
    else:
        steps = max(1, math.ceil(phase.epochs * train_len / phase.batch_size))
    s = phase.schedule
    warmup = s.warmup_steps if s.warmup_steps is not None else (
        math.ceil(s.warmup_tokens / tokens_per_step) if s.warmup_tokens is not None else 0)
    o = phase.optimizer
    return PhasePlan(
        name=phase.name, kind=phase.kind, total_steps=steps, micro_batch_size=micro,
        accum_steps=phase.batch_size // (micro * world), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
        weight_decay=o.weight_decay, grad_clip=o.grad_clip, max_nonfinite_steps=o.max_nonfinite_steps,
        warmup_steps=min(warmup, steps),
        decay=s.decay, min_lr_ratio=s.min_lr_ratio, eval_every=phase.eval.every_steps,
        eval_batches=phase.eval.batches, checkpoint_every=phase.checkpoint.every_steps,
        keep_checkpoints=phase.checkpoint.keep, log_every=recipe.logging.every_steps,
        progress=recipe.logging.progress)


def _packed(data, tokenizer, seq_len: int, progress: bool):
    # a redrawn bar is only readable on a terminal; in a log file it is thousands of fragments
    return build_packed_splits(data, tokenizer, data_cache_dir(), seq_len, progress=progress and sys.stderr.isatty())


def _datasets(recipe: Recipe, phase: PhaseSpec, tokenizer, accelerator, progress: bool):
    if phase.kind == "pretrain":
        # a redrawn bar is only readable on a terminal; in a log file it is thousands of fragments
        splits = {name: packed_splits(accelerator, data, tokenizer, data_cache_dir(), phase.seq_len,
                                      progress=progress and sys.stderr.isatty())
                  for name, data in recipe.corpora(phase).items()}
        if phase.mixture is None:
            (train, val, _), = splits.values()
        else:
            train, val = (MixedDataset({name: parts[k] for name, parts in splits.items()}, phase.mixture)
                          for k in (0, 1))
    else:
        train = FinetuneDataset(load_finetune_task(phase.task, "train"), tokenizer, phase.seq_len + 1)
        val = FinetuneDataset(load_finetune_task(phase.task, "validation"), tokenizer, phase.seq_len + 1)
    if len(train) < accelerator.num_processes or len(val) == 0:
        raise RecipeError(f"phase '{phase.name}': the data gave {len(train)} training and {len(val)} validation "
                          f"sequences of {phase.seq_len + 1} tokens; use more data or a shorter seq_len")
    return train, val


def prepare_recipe(recipe: Recipe) -> list[dict]:
    """Do a run's data work up front (`spdf prepare`): the tokenizer into the run directory, as `run_recipe` makes it,
    then the packed cache entry of every pre-training corpus (each named source once, however many phases mix it);
    return [{"phase", "source", "dir", "cache_hit", "splits"}] ("source": the source's name, None for `data`)."""
    run_dir = recipe.run_path
    check_run_dir(recipe)
    check_dir_target(data_cache_dir(), "the data cache (SPDF_CACHE_DIR)")
    make_run_dir(run_dir)
    lock = RunLock(run_dir).acquire()  # the tokenizer file is the run directory's: no run may write it meanwhile
    try:
        check_run_dir(recipe)  # again under the lock: another run may have claimed it meanwhile
        tokenizer = _tokenizer(recipe, run_dir, None)
        record_recipe(recipe)
        out, done = [], set()
        for phase in recipe.phases:
            if phase.kind != "pretrain":
                continue
            source_names = phase.mixture is not None
            for name, data in recipe.corpora(phase).items():
                if source_names and (name, phase.seq_len) in done:  # an earlier phase prepared it
                    continue
                _, _, meta = _packed(data, tokenizer, phase.seq_len, recipe.logging.progress)
                out.append({"phase": phase.name, "source": name if source_names else None, "dir": meta["dir"],
                            "cache_hit": meta["cache_hit"], "splits": meta["splits"]})
                if source_names:
                    done.add((name, phase.seq_len))
        return out
    finally:
        lock.release()


def run_recipe(recipe: Recipe, kinds=("pretrain", "finetune"), init_from: Path | None = None) -> dict:
    """Run the recipe's phases of the given kinds (resuming whatever a previous run left); return a summary."""
    from accelerate import Accelerator

    log_with = "tensorboard" if recipe.logging.tensorboard else None
    if log_with:
        try:
            import tensorboard  # noqa: F401  (accelerate's tracker needs it)
        except ImportError:
            raise RecipeError("logging.tensorboard is true but the tensorboard package is not installed "
                              "(pip install 'spdf[tensorboard]'), or set logging.tensorboard: false") from None
    if init_from is not None:  # a bad --from is refused before the run directory is made
        _verify_init_from(find_export(init_from), recipe, kinds)
    check_run_dir(recipe)
    # which weights a continued pre-training starts from (their sha256: hashed once, checked and then recorded)
    continued = _init_record(init_from) if init_from is not None and "pretrain" in kinds else None
    _check_continued_from(recipe, kinds, continued)
    check_dir_target(data_cache_dir(), "the data cache (SPDF_CACHE_DIR)")
    run_dir = recipe.run_path
    created = not run_dir.exists()
    # cpu=True on a machine without CUDA is what makes accelerate see a torchrun/accelerate-launch world of CPU
    # processes (gloo); without it every process would train alone.
    accelerator = Accelerator(mixed_precision=_mixed_precision(recipe.precision), log_with=log_with,
                              project_dir=str(run_dir), cpu=not torch.cuda.is_available())
    use_fsdp2_on_cpu(accelerator)
    lock = RunLock(run_dir)
    try:
        with StopRequest() as stop, RefusedStart(run_dir) as start:
            # One rank makes the run directory and takes its lock (the other ranks are the same run); it writes the
            # tokenizer, and the others then find everything complete.
            with accelerator.main_process_first():
                if accelerator.is_main_process:
                    make_run_dir(run_dir)
                    lock.acquire()
                    start.claim(created)  # removed again if this start made it and is refused
                    check_run_dir(recipe)  # again under the lock: another run may have claimed it meanwhile
                tokenizer = _tokenizer(recipe, run_dir, init_from)
            return _run_phases(accelerator, recipe, kinds, init_from, continued, tokenizer, log_with, stop, start)
    finally:
        lock.release()


def _verify_init_from(path: Path, recipe: Recipe, kinds) -> None:
    """A checkpoint given to --from is verified as a resume verifies it (a lost manifest is damage), an export
    against its manifest; and its model must have the recipe's shape (said as such, before anything is built).
    Pre-training continues from dense weights only: a sparse model's masks are its own run's to continue."""
    checkpoint = is_checkpoint(path) and not is_export(path)
    if checkpoint:
        check_checkpoint(path, lambda message: print(f"spdf: warning: {message}", file=sys.stderr, flush=True))
    else:
        verify_export(path)
    config = read_json(path / (CHECKPOINT_META if checkpoint else CONFIG_FILE), "--from")
    # a checkpoint names its sparsifier, an spdf export says "sparse", a Hugging Face directory has masks beside it
    sparse = config.get("sparsity") if checkpoint else config.get("sparse", (path / MASKS_FILE).is_file())
    if "pretrain" in kinds and sparse:
        raise CheckpointError(f"--from {path} holds a sparse model: continued pre-training starts from dense weights "
                              f"(the recipe's sparsity is applied to them); resume its own run to continue it sparse, "
                              f"or fine-tune it with `spdf finetune --from`")
    family = export_family(path)
    if family.name != recipe.model.family:
        raise CheckpointError(f"--from {path} holds a {family.name} model where the recipe asks "
                              f"model.family={recipe.model.family}; set model.family (and model.name) to match")
    theirs = config.get("model") if isinstance(config.get("model"), dict) else None
    if theirs is None:  # a Hugging Face directory: read_export maps (or refuses) its config
        return
    ours = model_config(recipe).to_dict()
    differ = [k for k in ours if k not in ("name", "vocab_size") and k in theirs and theirs[k] != ours[k]]
    if differ:
        raise CheckpointError(f"--from {path} holds a model with {', '.join(f'{k}={theirs[k]}' for k in differ)} "
                              f"where the recipe asks {', '.join(f'model.{k}={ours[k]}' for k in differ)}; set "
                              f"those model keys to match, or fine-tune a checkpoint of the recipe's shape")


def _run_phases(accelerator, recipe: Recipe, kinds, init_from, continued, tokenizer, log_with, stop, start) -> dict:
    from accelerate.utils import set_seed

    run_dir = recipe.run_path
    if log_with:
        accelerator.init_trackers(recipe.name)
    set_seed(recipe.seed)
    model, sparsifier = _initial_model(recipe, model_config(recipe, vocab_size=tokenizer.vocab_size), init_from,
                                       kinds)
    model.to(accelerator.device)
    metrics = MetricsLog(RunLayout(run_dir).metrics, accelerator, enabled=accelerator.is_main_process)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    phases = [p for p in recipe.phases if p.kind in kinds]
    if not phases:
        raise RecipeError(f"the recipe has no {' or '.join(kinds)} phase")
    check_parallelism(accelerator, recipe, phases, bool(sparse_layers(model)))
    shard_family_blocks(accelerator, model)
    for phase in phases:  # fail before any work, not after the first phase
        _micro_batch(phase, accelerator.num_processes)
        if phase.eval.generate is not None:
            check_metrics_available(phase)
    if accelerator.is_main_process:  # every check of the start passed: what this run trains is recorded
        record_recipe(recipe)
    summaries = []
    for i, phase in enumerate(recipe.phases):
        phase_paths = RunLayout(run_dir).phase(phase.name)
        if phase.kind not in kinds:
            if init_from is None and phase.kind == "pretrain" and "finetune" in kinds:
                if not phase_paths.done.exists():
                    raise RecipeError(f"phase '{phase.name}' of {run_dir} has not finished: run `spdf pretrain` "
                                      f"first, or fine-tune a checkpoint with --from")
                load_weights(model, phase_paths.export)
            continue
        if phase.kind == "finetune" and sparsifier is not None and phase.init == "densify":
            sparsifier.detach()
            densify(model)
            sparsifier = None
        if phase_paths.done.exists():
            load_weights(model, phase_paths.export)
            summaries.append(read_json(phase_paths.done, "phase summary"))
            accelerator.print(f"[{phase.name}] already finished; skipped")
            continue
        train, val = _datasets(recipe, phase, tokenizer, accelerator, recipe.logging.progress)
        start.began()  # from here on the phase writes state that a refused start must not take away
        if continued is not None and phase is _continued_phase(recipe) and accelerator.is_main_process \
                and not phase_paths.init_from.is_file():  # what a resume of it must start from again
            phase_paths.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(phase_paths.init_from, continued)
        source = BatchSource(train, val, seed=recipe.seed + i, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, pad_id=tokenizer.eos_id,
                             vocab_size=model.config.vocab_size)
        plan = _plan(recipe, phase, len(train), accelerator.num_processes)
        downstream = DownstreamEval(phase, tokenizer, metrics, accelerator) if phase.eval.generate else None
        inputs = PhaseInputs(model, sparsifier, source, TrainingFlops(model, phase.seq_len, sparsifier))
        records = PhaseRecords(phase_paths.root, metrics,
                               later_phases=[p.name for p in recipe.phases[i + 1:]],
                               meta_extra={"recipe": recipe.to_dict()})
        hooks = [downstream] if downstream is not None else []
        model, val_loss = PhaseRun(accelerator, plan, state, inputs, records, hooks, stop).run()
        if is_fsdp2(accelerator):  # exports and the next phase need whole weights: gathered on every rank
            model, sparsifier = gathered(accelerator, model, sparsifier)
        if downstream is not None:
            downstream(model, "final", state.step, state.tokens)
        if sparsifier is not None:
            sparsifier.detach()
        accelerator.free_memory()
        first_val = next((r["val_loss"] for r in metrics.read() if r.get("phase") == phase.name
                          and r.get("step") == 0 and "val_loss" in r), None)
        summary = {"phase": phase.name, "kind": phase.kind, "steps": state.step, "tokens": state.tokens,
                   "val_loss_before": first_val, "val_loss_after": val_loss,
                   "flops_dense_equivalent": state.flops_dense, "flops_spent": state.flops_spent,
                   "train_seconds": state.elapsed, "sparse": bool(sparse_layers(model)),
                   "export": str(phase_paths.export)}
        by_source = source.tokens_by_source()  # a mixture's: counted over all ranks
        if by_source is not None:
            summary["tokens_by_source"] = by_source
        if downstream is not None:
            summary.update(downstream_before=downstream.summary("before"),
                           downstream_after=downstream.summary("final"))
        summary[FINISHED_AT] = time.time()  # the order phases finished in, which a copy of the run keeps
        if accelerator.is_main_process:
            write_export(model, phase_paths.export, tokenizer_file=tokenizer.path,
                         extra={"phase": phase.name, "recipe": recipe.name,
                                "sparsity": sparsifier.config if sparsifier is not None else None})
            write_json_atomic(phase_paths.done, summary)
        accelerator.wait_for_everyone()
        summaries.append(summary)
    accelerator.end_training()
    return {"run_dir": str(run_dir), "metrics": str(RunLayout(run_dir).metrics), "phases": summaries,
            "main_process": accelerator.is_main_process}


def _initial_model(recipe: Recipe, config, init_from: Path | None, kinds):
    """A fresh model of the recipe's family sparsified as the recipe says; for continued pre-training (`pretrain
    --from`) the dense weights of the checkpoint, sparsified as the recipe says; or the weights (and masks) of the
    checkpoint to fine-tune."""
    model = family_of(config).build(config)
    if init_from is None or "pretrain" in kinds:
        if init_from is not None:  # checked dense by _verify_init_from; its masked weights become zeros here
            load_weights(model, find_export(init_from))
        sparsifier = sparsify_recipe(recipe, model)
        if init_from is None:  # SµPar: after the masks exist, since the std depends on each layer's density
            apply_supar_init(model)
        _check_finite(model, init_from)
        return model, sparsifier
    model, sparsifier = sparse_model(find_export(init_from), model)
    _check_finite(model, init_from)
    return model, sparsifier


def _check_finite(model, init_from: Path | None) -> None:
    if init_from is not None and not all_finite(state_tensors(model)):
        raise CheckpointError(f"--from {init_from} holds NaN or inf weights (saved after its training diverged); "
                              f"start from an earlier checkpoint")


def _continued_phase(recipe: Recipe) -> PhaseSpec | None:
    """The phase `pretrain --from` starts from the given weights: the recipe's first pre-training phase."""
    return next((p for p in recipe.phases if p.kind == "pretrain"), None)


def _check_continued_from(recipe: Recipe, kinds, given: dict | None) -> None:
    """A pre-training started from `--from` (`given`: its _init_record) resumes only from the same weights, and one
    started without it only without: a killed continued pre-training rerun without --from would otherwise go on
    from a fresh model (or a fresh one from another model's weights) without a word."""
    phase = _continued_phase(recipe)
    if "pretrain" in kinds and phase is not None:
        paths = RunLayout(recipe.run_path).phase(phase.name)
        if paths.finished or not paths.root.is_dir():
            return
        recorded = read_json(paths.init_from, "--from record") if paths.init_from.is_file() else None
        if recorded is not None and (given is None or given["fingerprint"] != recorded["fingerprint"]):
            raise CheckpointError(f"phase '{phase.name}' of {recipe.run_path} continues the pre-training of "
                                  f"{recorded['path']}: resume it with the same --from (those weights)")
        if recorded is None and given is not None and paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()):
            raise CheckpointError(f"phase '{phase.name}' of {recipe.run_path} was started without --from: resume it "
                                  f"without, or give another run_dir")


def _init_record(init_from: Path) -> dict:
    export = find_export(init_from)
    return {"path": str(Path(export).resolve()), "fingerprint": model_fingerprint(export)}
