"""LoRA (Hugging Face peft) on a sparse base model: low-rank adapters beside spdf's sparse layers.

peft wraps only the layer types it knows (nn.Linear, GPT-2's Conv1D, ...); spdf's sparse layers are registered with
it through peft's custom-module mapping, so every LoRA setting works as peft documents it:

    sp = spdf.sparsify(model, sparsity=0.75)                          # spdf.GPT or a transformers model
    config = sparse_lora(LoraConfig(r=8, target_modules=["c_attn"]))  # the same LoraConfig, sparse layers added
    model = get_peft_model(model, config)                             # base frozen, adapters trainable
    model.save_pretrained("adapter")                                  # the adapter only, as peft saves it
    PeftModel.from_pretrained(sparse_base, "adapter", config=sparse_lora(LoraConfig.from_pretrained("adapter")))

The base layer keeps its mask and computes as it always does (masked or compressed); the adapter's update is added
beside it, dense. Merging the adapter into the base (`merge_and_unload`) would fill the masked zeros, so it is refused
while the base is sparse: `spdf.densify(model)` first (the dense fine-tuning of SPDF), then merge.
"""
from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from ..sparsity.protocol import SparseLayer


class SparseLoraLinear(LoraLinear):
    """peft's LoRA Linear around an spdf sparse layer (any backend, either weight orientation)."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        super().__init__(base_layer, adapter_name, config, **kwargs)
        # how a merge (after densify) lays the update out: as the dense module stores its weight (Conv1D: (in, out))
        self.fan_in_fan_out = bool(self.get_base_layer().transposed)

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if isinstance(self.get_base_layer(), SparseLayer):
            raise ValueError("merging a LoRA adapter into a sparse layer would fill its masked zeros: "
                             "spdf.densify(model) first, or keep the adapter unmerged")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def sparse_lora(config: LoraConfig) -> LoraConfig:
    """`config` with spdf's sparse layers registered, so get_peft_model / PeftModel.from_pretrained wrap them."""
    config._register_custom_module({SparseLayer: SparseLoraLinear})
    return config
