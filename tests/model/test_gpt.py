"""The GPT model: parameter counts of the named configs, tied head, causality, loss masking, GPT-3 init, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from spdf import GPT, GPTConfig
from spdf.model import CONFIGS

# Independently known totals (GPT-2 vocab 50257, context 2048, biases and LayerNorm biases on, tied head).
KNOWN = {"gpt3-small": 125_226_240, "gpt3-medium": 355_871_744, "gpt3-xl": 1_315_723_264,
         "cerebras-gpt-111m": 111_050_496}


def expected_params(cfg: GPTConfig) -> int:
    V, C, L, d, da, dff = cfg.vocab_size, cfg.n_ctx, cfg.n_layer, cfg.d_model, cfg.d_attn, cfg.d_ff
    per_block = (d * 3 * da + 3 * da) + (da * d + d) + (d * dff + dff) + (dff * d + d) + 4 * d
    if da == d and dff == 4 * d:
        assert per_block == 12 * d * d + 13 * d
    return V * d + C * d + L * per_block + 2 * d


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_of_named_config(name):
    with torch.device("meta"):
        model = GPT.from_name(name)
    assert model.num_parameters() == expected_params(model.config)
    if name in KNOWN:
        assert model.num_parameters() == KNOWN[name]
    cfg = model.config
    assert model.num_parameters(non_embedding=True) == model.num_parameters() - (cfg.vocab_size + cfg.n_ctx) * cfg.d_model


@pytest.mark.parametrize("name,millions", [("gpt3-small", 125.2), ("gpt3-xl", 1315.7), ("cerebras-gpt-111m", 111.05)])
def test_headline_sizes(name, millions):
    with torch.device("meta"):
        n = GPT.from_name(name).num_parameters()
    assert n / 1e6 == pytest.approx(millions, abs=0.05)


def test_gpt3_13b_has_wider_heads_than_d_model_divides():
    cfg = GPTConfig.from_name("gpt3-13b")
    assert (cfg.d_model, cfg.d_head, cfg.d_attn) == (5140, 128, 5120)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 5120, 5140)
    assert model.transformer.h[0].attn.c_proj.weight.shape == (5140, 5120)


def test_tiny_test_shape():
    cfg = GPTConfig.from_name("tiny-test")
    assert (cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.n_ctx) == (2, 32, 128, 64)


def test_lm_head_is_tied_to_the_token_embedding(make_gpt):
    model = make_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_logits_shape_and_causality(make_gpt):
    model = make_gpt().eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 128, (2, 20), generator=g)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 128
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert a.shape == (2, 20, 128)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_is_mean_cross_entropy_ignoring_minus_100(make_gpt):
    model = make_gpt().eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 128, (2, 10), generator=g)
    targets = torch.randint(0, 128, (2, 10), generator=g)
    targets[0, :6] = -100
    targets[1, :2] = -100
    with torch.no_grad():
        logits, loss = model(idx, targets)
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, manual)
    # The ignored positions really are ignored: any label there gives the same loss.
    other = targets.clone()
    other[~keep] = 5
    with torch.no_grad():
        _, unmasked = model(idx, other)
    assert not torch.allclose(unmasked, loss)
    other[~keep] = -100
    with torch.no_grad():
        assert torch.equal(model(idx, other)[1], loss)
    assert model(idx)[1] is None


def test_gpt3_initialisation():
    torch.manual_seed(0)
    L = 8
    model = GPT(GPTConfig(n_layer=L, n_head=4, d_model=128, d_ff=512, n_ctx=16, vocab_size=256))
    trunc = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))  # ≈ 0.880
    res_std = 0.02 / math.sqrt(2 * L)
    c_proj = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    others = torch.cat([p.flatten() for n, p in model.named_parameters()
                        if n.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight"))])
    assert c_proj.std().item() == pytest.approx(trunc * res_std, rel=0.03)
    assert c_proj.abs().max().item() <= 2 * res_std + 1e-9
    assert others.std().item() == pytest.approx(trunc * 0.02, rel=0.03)
    assert others.abs().max().item() <= 0.04 + 1e-9
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            assert (p == 0).all(), n
        if "ln_" in n and n.endswith("weight"):
            assert (p == 1).all(), n


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown model name 'gpt3-xll'.*did you mean 'gpt3-xl'.*known:.*tiny-test"):
        GPT.from_name("gpt3-xll")


def test_from_name_overrides_fields():
    cfg = GPTConfig.from_name("tiny-test", n_ctx=32, dropout=0.1)
    assert cfg.n_ctx == 32 and cfg.dropout == 0.1 and cfg.d_model == 32


@pytest.mark.parametrize("overrides,key", [(dict(n_layer=0), "n_layer"), (dict(d_model=33), "d_model"),
                                           (dict(vocab_size=True), "vocab_size"), (dict(dropout=1.0), "dropout")])
def test_bad_config_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        GPTConfig.from_name("tiny-test", **overrides)


def test_too_long_sequence_is_a_value_error(make_gpt):
    model = make_gpt()
    model(torch.zeros(1, 64, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match="65 tokens.*context \\(64\\)"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_dropout_is_off_in_eval_and_on_in_train(make_gpt):
    model = make_gpt(dropout=0.5)
    idx = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(idx)[0], model(idx)[0])


def test_a_resized_named_config_keeps_its_mlp_ratio():
    assert GPTConfig.from_name("gpt3-small", d_model=384).d_ff == 1536
    assert GPTConfig.from_name("tiny", d_model=32, d_ff=100).d_ff == 100  # an explicit d_ff wins
    assert GPTConfig.from_name("gpt3-xl", n_layer=2).d_ff == 8192
