"""spdf.GPT -> a Hugging Face GPT-2 directory that `AutoModelForCausalLM` and `AutoTokenizer` load offline.

spdf's GPT is GPT-2's architecture under the same parameter names (pre-LN, learned positions, tanh GELU, tied head);
only GPT-2's Conv1D weights are stored transposed (`GPT.hf_gpt2_state_dict`). A model without biases or with a head
width other than d_model / n_head has no GPT-2 equivalent and is refused. A sparse export is written the way
`spdf.save_pretrained` writes any sparse model: dense weights, masks beside them. The reverse direction (a GPT-2
directory read as an spdf export, for `spdf finetune --from`) is `spdf.export.read_hf_gpt2`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.tokenizer import TextTokenizer
from ..fswrite import writing_dir
from ..export import CheckpointError, find_export, read_export
from ..layout import CONFIG_FILE, MASKS_FILE, TOKENIZER_FILE, WEIGHTS_FILE, temporary_dir
from ..sparsity import sparse_layers, sparsify
from .hf_save import SPARSITY_FILE, save_pretrained
from .target_dir import check_target, reading_run, replace_dir, run_dir_of

# what export_hf writes: a directory holding anything else is not one of its exports and is never replaced
HF_EXPORT_FILES = {CONFIG_FILE, WEIGHTS_FILE, MASKS_FILE, SPARSITY_FILE, TOKENIZER_FILE, "generation_config.json",
                   "tokenizer_config.json", "special_tokens_map.json"}


def is_hf_export(path: Path) -> bool:
    """Whether `path` is a GPT-2 directory as export_hf writes it (only its files, a GPT-2 config.json)."""
    names = {p.name for p in Path(path).iterdir()}
    if not names <= HF_EXPORT_FILES or WEIGHTS_FILE not in names or CONFIG_FILE not in names:
        return False
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type") == "gpt2"
    except (OSError, ValueError, AttributeError):
        return False


def export_hf(source, out_dir, force: bool = False) -> Path:
    """Write the model of `source` (an spdf export, phase or run directory) as a transformers GPT-2 directory.

    out_dir must be new or empty, or an earlier export_hf directory with force=True; it may not overlap `source`
    or its run directory (spdf.integrations.target_dir)."""
    source, out_dir = Path(source), Path(out_dir)
    found = find_export(source)
    protected = [p for p in (source, found, run_dir_of(source)) if p is not None]
    check_target(out_dir, protected, is_hf_export, "Hugging Face GPT-2", force)
    with reading_run(source):
        return _write_hf(read_export(found), out_dir)


def _write_hf(exported, out_dir: Path) -> Path:
    import transformers

    model = exported.model
    try:
        hf_config = model.hf_gpt2_config()
    except ValueError as e:
        raise CheckpointError(f"{exported.path}: this model does not map onto Hugging Face GPT-2 ({e})") from None
    tokenizer = TextTokenizer(exported.tokenizer_path) if exported.tokenizer_path is not None else None
    eos = tokenizer.eos_id if tokenizer is not None else None
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config, bos_token_id=eos, eos_token_id=eos))
    hf.load_state_dict(model.hf_gpt2_state_dict())
    sparsifier = None
    if exported.masks:  # sparse again on exactly the exported layers, so the masks are written beside the weights
        sparsifier = sparsify(hf, init=exported.masks, param_filter=[f"{n}.weight" for n in exported.masks])
        for name, layer in sparse_layers(hf).items():
            layer.target_sparsity = float(exported.config.get("targets", {}).get(name, layer.target_sparsity))
    tmp = temporary_dir(out_dir, os.getpid())  # its own: nothing of anyone else's removed
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with writing_dir(tmp, "the Hugging Face export", weights_bytes):
        save_pretrained(hf, tmp, sparsifier=sparsifier)
        if tokenizer is not None:  # padding as GPT-2 pads (with its end-of-text token); inputs up to the positions
            transformers.PreTrainedTokenizerFast(
                tokenizer_file=str(tokenizer.path), eos_token=tokenizer.eos_token, bos_token=tokenizer.eos_token,
                pad_token=tokenizer.eos_token, model_max_length=model.config.n_ctx).save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    return out_dir
