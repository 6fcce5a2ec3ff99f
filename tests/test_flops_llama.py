"""Analytic FLOPs of the Llama shape: hand-counted components and a measured count (torch's FLOP counter) of one
forward + backward of a real tiny grouped-query Llama, dense and sparse."""
import warnings

import pytest
import torch

import spdf
from spdf.flops import COMPONENTS, format_table, measure_training_flops, model_flops
from spdf.flops import analytic_flops as analytic_llama_flops  # the llama family's formula, through the seam
from spdf.model.families import FAMILIES
from spdf.model.families.llama import component_weights as llama_component_weights
from spdf.model.llama import Llama
from spdf.model.llama_config import LlamaConfig

LLAMA_FLOP_ROLES = FAMILIES["llama"].flop_roles


def test_components_count_swiglu_and_the_smaller_grouped_kv():
    cfg = LlamaConfig.from_name("llama-3.2-1b")  # 16 layers, d 2048, 32 query heads, 8 KV heads of 64, d_ff 8192
    fb = analytic_llama_flops(cfg, seq_len=2048)
    L, d = 16, 2048
    assert fb.dense_forward == {
        "qkv": L * 2 * d * (2048 + 2 * 512),  # K and V are a quarter of Q's width
        "attn_out": L * 2 * 2048 * d,
        "mlp_in": L * 2 * d * 2 * 8192,  # gate_proj and up_proj
        "mlp_out": L * 2 * 8192 * d,
        "attn_scores": L * 4 * 2048 * 2048,  # per query head, causal counted in full
        "logits": 2 * d * 128256,
    }
    assert list(fb.dense_forward) == list(COMPONENTS)
    # the weights of the components are the model's projection weights, all of them
    with torch.device("meta"):
        model = Llama(cfg)
    projections = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(tuple(LLAMA_FLOP_ROLES)))
    assert sum(llama_component_weights(cfg).values()) == projections


def test_reduction_at_75_percent_and_its_limits():
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    fb = analytic_llama_flops(cfg, 0.75, seq_len=2048)
    weights = sum(fb.dense_forward[c] for c in ("qkv", "attn_out", "mlp_in", "mlp_out"))
    dense_rest = fb.dense_forward["attn_scores"] + fb.dense_forward["logits"]
    assert fb.reduction == pytest.approx((weights + dense_rest) / (weights / 4 + dense_rest))
    assert fb.reduction == pytest.approx(2.140, abs=1e-3)  # its 128k-token vocabulary keeps a large dense head
    assert analytic_llama_flops(cfg).reduction == 1.0
    with pytest.raises(ValueError, match="sparsity must be in"):
        analytic_llama_flops(cfg, 1.0)
    assert "MLP up-projection" in format_table("llama-3.2-1b", fb, "75% sparse")


def _measure(model, seq=32):
    idx = torch.randint(0, 128, (2, seq + 1), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no optimizer attached: one step only
        return measure_training_flops(model, idx[:, :-1], idx[:, 1:])


@pytest.mark.parametrize("tie", [True, False])
def test_measured_dense_llama_matches_analytic(tie):
    torch.manual_seed(0)
    model = Llama.from_name("llama-tiny-test", tie_embeddings=tie)
    measured = _measure(model)
    fb = analytic_llama_flops(model.config, seq_len=32)
    assert measured["spent"] == measured["dense"]
    assert measured["dense_per_token"] == pytest.approx(fb.dense_train, rel=1e-6)


@pytest.mark.parametrize("kwargs,densities", [
    (dict(sparsity=0.5), None),
    (dict(sparsity=0.75), None),
    (dict(sparsity=0.5, param_filter="*mlp*"), {"mlp_in": 0.5, "mlp_out": 0.5}),
    (dict(sparsity=0.75, overrides={"*self_attn.[kv]_proj*": 0.5}), "read"),
], ids=["0.5", "0.75", "mlp-only", "kv-at-0.5"])
def test_measured_sparse_llama_matches_analytic(kwargs, densities):
    torch.manual_seed(0)
    model = Llama.from_name("llama-tiny-test")
    spdf.sparsify(model, seed=0, **kwargs)
    if densities == "read":  # per component, weighted by layer size, from the masks (the family's FLOP roles)
        fb = model_flops(model, seq_len=32)
        assert 0.25 < fb.sparse_forward["qkv"] / fb.dense_forward["qkv"] < 0.5
    elif densities:
        fb = analytic_llama_flops(model.config, seq_len=32, densities=densities)
    else:
        fb = analytic_llama_flops(model.config, kwargs["sparsity"], seq_len=32)
        assert model_flops(model, seq_len=32).sparse_train == pytest.approx(fb.sparse_train, rel=1e-12)
    measured = _measure(model)
    assert measured["dense_per_token"] == pytest.approx(fb.dense_train, rel=1e-6)
    assert measured["spent_per_token"] == pytest.approx(fb.sparse_train, rel=1e-6)
    assert fb.reduction > 1.05
