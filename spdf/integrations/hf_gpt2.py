"""spdf.GPT -> a Hugging Face GPT-2 directory that `AutoModelForCausalLM` and `AutoTokenizer` load offline.

spdf's GPT is GPT-2's architecture under the same parameter names (pre-LN, learned positions, tanh GELU, tied head);
only GPT-2's Conv1D weights are stored transposed (`GPT.hf_gpt2_state_dict`). A model without biases or with a head
width other than d_model / n_head has no GPT-2 equivalent and is refused. A sparse export is written the way
`spdf.save_pretrained` writes any sparse model: dense weights, masks beside them. The reverse direction (a GPT-2
directory read as an spdf export, for `spdf finetune --from`) is `spdf.export.read_hf_gpt2`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..data.tokenizer import TextTokenizer
from ..export import CheckpointError, find_export, read_export
from ..fswrite import writing_dir
from ..sparsity import sparse_layers, sparsify
from .hf_save import save_pretrained


def export_hf(source, out_dir) -> Path:
    """Write the model of `source` (an spdf export, phase or run directory) as a transformers GPT-2 directory."""
    import transformers

    exported = read_export(find_export(source))
    model, out_dir = exported.model, Path(out_dir)
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
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_dir(tmp, "the Hugging Face export", sum(p.numel() * p.element_size() for p in hf.parameters())):
        save_pretrained(hf, tmp, sparsifier=sparsifier)  # a full disk: one line, the temporary directory removed
        if tokenizer is not None:
            transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.path), eos_token=tokenizer.eos_token,
                                                 bos_token=tokenizer.eos_token).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
