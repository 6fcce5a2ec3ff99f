"""µP on the model: Cerebras-GPT's named µP configs, the multipliers in the forward pass, 1/d_head attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from spdf import GPT, GPTConfig
from spdf.model import CONFIGS

MUP_SIZES = ("111m", "256m", "590m", "1.3b", "2.7b")


@pytest.mark.parametrize("size", MUP_SIZES)
def test_cerebras_mup_configs_are_the_sp_shapes_with_mup(size):
    mup, sp = CONFIGS[f"cerebras-gpt-{size}-mup"], CONFIGS[f"cerebras-gpt-{size}"]
    assert mup.replace(parametrization="sp", name=sp.name) == sp
    assert (mup.parametrization, mup.base_width, mup.output_mult) == ("mup", 256, 1.0)
    assert mup.width_mult == sp.d_model / 256 and mup.d_ff / mup.width_mult == 1024  # base d_ff 1024
    assert (mup.init_std, mup.embedding_mult) == (0.08, 10.0)
    assert mup.logits_mult == pytest.approx(256 / sp.d_model)
    assert mup.attn_scale == 1.0 / mup.d_head


def test_sp_has_no_multipliers():
    c = CONFIGS["cerebras-gpt-111m"]
    assert (c.width_mult, c.embedding_mult, c.logits_mult, c.attn_scale, c.init_std) == (1.0, 1.0, 1.0, None, 0.02)


def test_a_resized_mup_config_keeps_mup_relative_to_its_base():
    c = GPTConfig.from_name("cerebras-gpt-111m-mup", d_model=512, n_head=8)
    assert c.width_mult == 2.0 and c.logits_mult == 0.5 and c.d_ff == 2048


@pytest.mark.parametrize("bad, message", [({"parametrization": "mu"}, "parametrization must be one of"),
                                          ({"base_width": 0}, "base_width must be a positive integer"),
                                          ({"output_mult": 0.0}, "output_mult must be > 0")])
def test_bad_parametrization_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_name("tiny-test", **bad)


def _mup(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT.from_name("tiny-test", parametrization="mup", base_width=16, output_mult=2.0, **kw)  # width_mult 2


def test_forward_applies_embedding_and_logit_multipliers(batch):
    model = _mup()
    idx, _ = batch
    seen = {}
    model.transformer.drop.register_forward_hook(lambda m, a, out: seen.update(embedded=out))
    model.transformer.ln_f.register_forward_hook(lambda m, a, out: seen.update(final=out))
    logits, _ = model(idx)
    t = model.transformer
    positions = torch.arange(idx.size(1))
    torch.testing.assert_close(seen["embedded"], (t.wte(idx) + t.wpe(positions)) * 10.0)
    torch.testing.assert_close(logits, seen["final"] @ t.wte.weight.t() * (2.0 / 2))  # output_mult / width_mult


def test_attention_scores_are_scaled_by_one_over_d_head():
    model = _mup()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 5, 32)
    q, k, v = attn.c_attn(x).view(2, 5, 3, attn.n_head, attn.d_head).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / attn.d_head
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    y = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(attn(x), attn.c_proj(y))


def test_kv_cache_decoding_matches_the_full_forward_under_mup(batch):
    model = _mup().eval()
    idx, _ = batch
    full, _ = model(idx)
    cache = model.new_kv_cache()
    first, _ = model(idx[:, :10], kv_cache=cache)
    rest, _ = model(idx[:, 10:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_mup_model_does_not_export_to_gpt2():
    with pytest.raises(ValueError, match="only parametrization 'sp' exports to GPT-2"):
        _mup().hf_gpt2_config()


def test_mup_init_uses_the_width_multiplier():
    model = _mup(d_model=256, n_head=4)  # width_mult 16
    w = model.transformer.h[0].mlp.c_fc.weight
    assert w.abs().max() <= 2 * 0.08 / 4 + 1e-7  # truncated at 2 std of 0.08 / sqrt(16)
    assert w.std().item() == pytest.approx(0.08 / 4 * 0.8796, rel=0.03)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.08 * 0.8796, rel=0.03)
    assert math.isclose(model.config.logits_mult, 2.0 / 16)


def test_config_dicts_carry_parametrization_only_when_it_is_not_the_default():
    # a standard model's dict (checkpoint layout, export config.json) is what it was before µP existed
    assert set(CONFIGS["tiny"].to_dict()) == {"n_layer", "n_head", "d_model", "d_ff", "n_ctx", "vocab_size", "dropout",
                                              "bias", "name", "head_dim"}
    for config in (CONFIGS["tiny"], CONFIGS["cerebras-gpt-111m-mup"],
                   CONFIGS["tiny"].replace(parametrization="supar", base_width=64, output_mult=2.0)):
        assert GPTConfig(**config.to_dict()) == config
