"""An spdf export -> a Hugging Face directory that `AutoModelForCausalLM` and `AutoTokenizer` load offline.

The model's family says which transformers architecture it maps onto and how (its `HFAdapter`: the gpt family
writes GPT-2, whose parameter names are spdf.GPT's and whose Conv1D weights are stored transposed). What the
architecture cannot hold (a GPT without biases, say) is refused. A sparse export is written the way
`spdf.save_pretrained` writes any sparse model: dense weights, masks beside them. The reverse direction (a Hugging
Face directory read as an spdf export, for `spdf finetune --from`) is `spdf.export.read_hf`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.tokenizer import TextTokenizer
from ..fswrite import writing_dir
from ..export import CheckpointError, export_family, find_export, read_export
from ..layout import CONFIG_FILE, MASKS_FILE, TOKENIZER_FILE, WEIGHTS_FILE, temporary_dir
from ..model.families import FAMILIES, family_of
from ..sparsity import sparse_layers, sparsify
from .hf_save import SPARSITY_FILE, save_pretrained
from .target_dir import check_target, reading_run, remove_abandoned_writes, replace_dir, run_dir_of

# what export_hf writes: a directory holding anything else is not one of its exports and is never replaced
HF_EXPORT_FILES = {CONFIG_FILE, WEIGHTS_FILE, MASKS_FILE, SPARSITY_FILE, TOKENIZER_FILE, "generation_config.json",
                   "tokenizer_config.json", "special_tokens_map.json"}


def is_hf_export(path: Path) -> bool:
    """Whether `path` is a directory as export_hf writes it (only its files, a config.json of an architecture some
    model family writes)."""
    names = {p.name for p in Path(path).iterdir()}
    if not names <= HF_EXPORT_FILES or WEIGHTS_FILE not in names or CONFIG_FILE not in names:
        return False
    try:
        model_type = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in {f.hf.model_type for f in FAMILIES.values() if f.hf is not None}


def export_hf(source, out_dir, force: bool = False) -> Path:
    """Write the model of `source` (an spdf export, phase or run directory) as a transformers directory of its
    family's architecture.

    out_dir must be new or empty, or an earlier export_hf directory with force=True; it may not overlap `source`
    or its run directory (spdf.integrations.target_dir)."""
    source, out_dir = Path(source), Path(out_dir)
    found = find_export(source)
    protected = [p for p in (source, found, run_dir_of(source)) if p is not None]
    family = export_family(found)
    if family.hf is None:
        raise CheckpointError(f"{found}: model family '{family.name}' has no Hugging Face architecture")
    check_target(out_dir, protected, is_hf_export, f"Hugging Face {family.hf.label}", force)
    with reading_run(source):
        return _write_hf(read_export(found), out_dir)


def _write_hf(exported, out_dir: Path) -> Path:
    import transformers

    model = exported.model
    adapter = family_of(model).hf  # export_hf checked that it has one
    try:
        hf_config = adapter.config_to_hf(model)
    except ValueError as e:
        raise CheckpointError(f"{exported.path}: this model does not map onto Hugging Face {adapter.label} "
                              f"({e})") from None
    tokenizer = TextTokenizer(exported.tokenizer_path) if exported.tokenizer_path is not None else None
    eos = tokenizer.eos_id if tokenizer is not None else None
    config = transformers.AutoConfig.for_model(adapter.model_type, **hf_config, bos_token_id=eos, eos_token_id=eos)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(adapter.state_to_hf(model))
    sparsifier = None
    if exported.masks:  # sparse again on exactly the exported layers, so the masks are written beside the weights
        masks = {adapter.module_to_hf(n): mask for n, mask in exported.masks.items()}
        targets = {adapter.module_to_hf(n): t for n, t in exported.config.get("targets", {}).items()}
        sparsifier = sparsify(hf, init=masks, param_filter=[f"{n}.weight" for n in masks])
        for name, layer in sparse_layers(hf).items():
            layer.target_sparsity = float(targets.get(name, layer.target_sparsity))
    tmp = temporary_dir(out_dir, os.getpid())  # its own: nothing of a live writer's removed
    remove_abandoned_writes(out_dir, keep=tmp)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with writing_dir(tmp, "the Hugging Face export", weights_bytes):
        save_pretrained(hf, tmp, sparsifier=sparsifier)
        if tokenizer is not None:  # padding with the end-of-text token (as GPT-2 pads); inputs up to the context
            transformers.PreTrainedTokenizerFast(
                tokenizer_file=str(tokenizer.path), eos_token=tokenizer.eos_token, bos_token=tokenizer.eos_token,
                pad_token=tokenizer.eos_token, model_max_length=model.config.n_ctx).save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    return out_dir
