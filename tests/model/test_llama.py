"""spdf.model.llama: named shapes, the forward's loss and decoding arguments, sparsify/densify, µP."""
import math

import pytest
import torch

import spdf
from spdf.model.llama import PROJECTIONS, SPARSE_FILTER, Llama, apply_rotary, rotary_cos_sin
from spdf.model.llama_config import LLAMA_CONFIGS, LlamaConfig
from spdf.sparsity import sparse_layers

HF_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # LlamaForCausalLM


def make_llama(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama.from_name("llama-tiny-test", **overrides)


def _idx(B, T, seed=0):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- shapes ------------------------------------------------------------------------------------------------------
# The parameter counts the public checkpoints hold (safetensors totals on the Hugging Face Hub).
@pytest.mark.parametrize("name,count", [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120),
                                        ("tinyllama-1.1b", 1_100_048_384), ("llama-3.2-1b", 1_235_814_400)])
def test_named_shapes_have_the_public_models_parameter_counts(name, count):
    with torch.device("meta"):
        model = Llama.from_name(name)
    assert model.num_parameters() == count
    c = model.config
    assert c.d_head == 64 and c.kv_heads < c.n_head  # all four use grouped-query attention
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    assert model.num_parameters(non_embedding=True) == count - embedding


def test_tiny_test_shape_uses_grouped_query_attention():
    c = LlamaConfig.from_name("llama-tiny-test")
    assert (c.n_layer, c.d_model, c.n_ctx, c.vocab_size, c.n_head, c.kv_heads, c.d_kv) == (2, 32, 64, 128, 4, 2, 16)
    assert LlamaConfig.from_name("llama-tiny").d_model == 128


def test_module_names_are_hugging_face_llamas():
    model = make_llama(tie_embeddings=False)
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"} <= names
    assert {f"model.layers.0.{p}.weight" for p in PROJECTIONS} <= names
    assert not any(n.endswith("bias") for n in names)


def test_tied_head_is_the_embedding_and_untied_is_its_own():
    tied, untied = make_llama(tie_embeddings=True), make_llama(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 128 * 32


@pytest.mark.parametrize("overrides,key", [(dict(n_kv_head=3), "n_kv_head"), (dict(n_layer=0), "n_layer"),
                                           (dict(d_model=30), "d_model"), (dict(head_dim=7), "head width"),
                                           (dict(rope_base=0.5), "rope_base"), (dict(norm_eps=0.0), "norm_eps"),
                                           (dict(dropout=1.0), "dropout"),
                                           (dict(parametrization="x"), "parametrization"),
                                           (dict(tie_embeddings="yes"), "tie_embeddings")])
def test_bad_config_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        LlamaConfig.from_name("llama-tiny-test", **overrides)


def test_unknown_name_suggests_the_closest_and_resizing_keeps_the_mlp_ratio():
    with pytest.raises(ValueError, match="did you mean 'llama-3.2-1b'"):
        LlamaConfig.from_name("llama-3.2-1")
    c = LlamaConfig.from_name("smollm2-135m", d_model=1152, n_head=18, n_kv_head=6)
    assert c.d_ff == 3072 and c.rope_base == 100000.0
    assert LlamaConfig(**c.to_dict()) == c


# ---- forward -----------------------------------------------------------------------------------------------------
def test_rope_rotates_each_channel_with_the_one_half_a_head_away():
    # position p turns the pair (i, i + D/2) by p · base^(-2i/D): each pair keeps its norm, position 0 is identity
    x = torch.randn(1, 1, 3, 8)
    cos, sin = rotary_cos_sin(torch.arange(3), 8, 10000.0, torch.float32)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    angle = torch.atan2(y[0, 0, 1, 4], y[0, 0, 1, 0]) - torch.atan2(x[0, 0, 1, 4], x[0, 0, 1, 0])
    assert math.remainder(angle.item(), 2 * math.pi) == pytest.approx(1.0, abs=1e-5)


def test_logits_are_causal():
    model = make_llama().eval()
    idx = _idx(1, 10)
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 128
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_loss_is_mean_cross_entropy_ignoring_minus_100():
    model = make_llama()
    idx, targets = _idx(2, 12), _idx(2, 12, seed=1)
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_prefill_then_one_token_at_a_time_equals_the_full_forward():
    model = make_llama().eval()
    idx = _idx(2, 12)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(12)
        first, _ = model(idx[:, :5], kv_cache=cache)
        steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.keys[0].shape == (2, 2, 12, 8)  # n_kv_head heads, not n_head


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
def test_greedy_decoding_of_left_padded_rows_with_the_cache_equals_full_forwards(parametrization):
    model = make_llama(parametrization=parametrization, base_width=16).eval()
    prompts = [_idx(1, 3, seed=1)[0], _idx(1, 8, seed=2)[0]]
    batch = torch.stack([torch.cat([torch.full((5,), 9), prompts[0]]), prompts[1]])  # left padding, any id
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        cache = model.new_kv_cache(14)
        logits, _ = model(batch, kv_cache=cache, attention_mask=mask, last_logits_only=True)
        decoded = [[], []]
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            for row in range(2):
                decoded[row].append(int(nxt[row]))
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits, _ = model(nxt, kv_cache=cache, attention_mask=mask)
        for row, prompt in enumerate(prompts):  # the same greedy continuation from full forwards of one row
            seq = prompt[None]
            for _ in range(6):
                seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
            assert seq[0, len(prompt):].tolist() == decoded[row]


def test_too_long_sequence_and_targets_with_a_cache_are_refused():
    model = make_llama()
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(_idx(1, 65))
    with pytest.raises(ValueError, match="either targets .* or kv_cache"):
        model(_idx(1, 4), _idx(1, 4), kv_cache=model.new_kv_cache())


def test_cache_keeps_the_autocast_dtype():
    model = make_llama().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_kv_cache()
        model(_idx(1, 3), kv_cache=cache)
    assert cache.keys[0].dtype == torch.bfloat16


# ---- sparsity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_default_filter_and_the_family_filter_sparsify_the_seven_projections_only(tie):
    assert {p.split(".")[-1] for p in PROJECTIONS} == HF_PROJECTIONS
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    for param_filter in (None, SPARSE_FILTER):
        model = make_llama(tie_embeddings=tie)
        spdf.sparsify(model, sparsity=0.75, seed=0, param_filter=param_filter)
        assert set(sparse_layers(model)) == expected


def test_sparsify_then_densify_keeps_the_logits_and_the_zeros():
    model = make_llama(tie_embeddings=False).eval()
    spdf.sparsify(model, sparsity=0.5, seed=3, backend="masked")
    idx = _idx(2, 10)
    with torch.no_grad():
        sparse_logits, _ = model(idx)
    spdf.densify(model)
    assert not sparse_layers(model)
    with torch.no_grad():
        dense_logits, _ = model(idx)
    assert torch.equal(sparse_logits, dense_logits)
    k = model.model.layers[0].self_attn.k_proj.weight
    assert (k == 0).sum().item() == k.numel() // 2


# ---- initialisation and µP ---------------------------------------------------------------------------------------
def _std(p):
    return p.detach().float().std().item()


def test_initialisation_scales_residual_projections_and_norms_are_one():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(n_layer=8, n_head=4, d_model=256, d_ff=512, n_kv_head=2, vocab_size=512))
    block = model.model.layers[0]
    trunc = 0.8796  # std of a unit normal truncated at ±2
    assert _std(block.self_attn.q_proj.weight) == pytest.approx(0.02 * trunc, rel=0.05)
    assert _std(block.mlp.down_proj.weight) == pytest.approx(0.02 * trunc / 4, rel=0.05)
    assert _std(block.self_attn.o_proj.weight) == pytest.approx(0.02 * trunc / 4, rel=0.05)
    assert torch.equal(block.input_layernorm.weight, torch.ones(256))


def test_mup_init_and_multipliers_follow_the_width():
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, n_head=4, d_model=512, d_ff=1024, n_kv_head=2, vocab_size=512,
                      parametrization="mup", base_width=128, tie_embeddings=False)
    model = Llama(cfg)
    assert (cfg.width_mult, cfg.embedding_mult, cfg.logits_mult, cfg.attn_scale) == (4.0, 10.0, 0.25, 1 / 128)
    trunc = 0.8796
    assert _std(model.model.layers[0].mlp.up_proj.weight) == pytest.approx(0.08 * trunc / 2, rel=0.05)
    assert _std(model.model.embed_tokens.weight) == pytest.approx(0.08 * trunc, rel=0.05)
    assert _std(model.lm_head.weight) == pytest.approx(0.08 * trunc, rel=0.05)
    # the logits are the sp forward's with the embedding x10 and the logits x1/width_mult (attention scale aside:
    # with one token, attention returns v whatever the scale)
    idx = torch.tensor([[3]])
    sp = Llama(cfg.replace(parametrization="sp"))
    sp.load_state_dict(model.state_dict())
    sp.model.embed_tokens.weight.data *= 10
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], sp(idx)[0] * 0.25, rtol=1e-5, atol=1e-6)
