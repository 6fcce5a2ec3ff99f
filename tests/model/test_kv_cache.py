"""The KV cache and padding arguments of GPT.forward give the logits of the plain full-sequence forward."""
import pytest
import torch

from spdf.model.gpt import KVCache


def _idx(B, T, seed=0):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def test_prefill_then_one_token_at_a_time_equals_the_full_forward(make_gpt):
    model = make_gpt().eval()
    idx = _idx(2, 12)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(12)
        first, returned = model(idx[:, :5], kv_cache=cache)
        assert returned is cache and cache.length == 5
        steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12 and cache.keys[0].shape == (2, 2, 12, 16)


def test_left_padded_rows_give_the_logits_of_the_unpadded_sequences(make_gpt):
    model = make_gpt().eval()
    short, long = _idx(1, 4, seed=1), _idx(1, 9, seed=2)
    batch = torch.cat([torch.cat([torch.full((1, 5), 7), short], 1), long])  # pad id 7: any id must do
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        padded, _ = model(batch, attention_mask=mask)
        alone_short, _ = model(short)
        alone_long, _ = model(long)
        # and through the cache: prefill the padded prompts, then one more token per row
        cache = model.new_kv_cache(10)
        model(batch, kv_cache=cache, attention_mask=mask)
        nxt = torch.tensor([[3], [4]])
        step, _ = model(nxt, kv_cache=cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        ref_short, _ = model(torch.cat([short, nxt[:1]], 1))
        ref_long, _ = model(torch.cat([long, nxt[1:]], 1))
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0, 5:], alone_short[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1], alone_long[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[0, 0], ref_short[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_long[0, -1], rtol=1e-5, atol=1e-5)


def test_select_reorders_and_repeats_cache_rows(make_gpt):
    model = make_gpt().eval()
    idx = _idx(2, 6)
    with torch.no_grad():
        cache = model.new_kv_cache(7)
        model(idx, kv_cache=cache)
        cache.select(torch.tensor([1, 1, 0]))
        step, _ = model(torch.tensor([[5], [6], [5]]), kv_cache=cache)
        ref, _ = model(torch.cat([idx[[1, 1, 0]], torch.tensor([[5], [6], [5]])], 1))
    torch.testing.assert_close(step[:, 0], ref[:, -1], rtol=1e-5, atol=1e-5)


def test_last_logits_only_and_cache_limits(make_gpt):
    model = make_gpt().eval()
    idx = _idx(2, 6)
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_logits_only=True)
        torch.testing.assert_close(last, full[:, -1:])
        cache = KVCache(model.config.n_layer, 6)
        model(idx, kv_cache=cache)
        with pytest.raises(ValueError, match="holds 6 positions; 7 were asked for"):
            model(idx[:, :1], kv_cache=cache)
    with pytest.raises(ValueError, match="either targets .* or kv_cache"):
        model(idx, idx, kv_cache=model.new_kv_cache())


def test_cache_keeps_the_autocast_dtype(make_gpt):
    model = make_gpt().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_kv_cache()
        model(_idx(1, 3), kv_cache=cache)
    assert cache.keys[0].dtype == torch.bfloat16 and cache.max_len == model.config.n_ctx


def test_training_calls_run_the_plain_causal_attention(make_gpt, batch, monkeypatch):
    """No cache, no mask: the training forward is the causal SDPA call it was before the cache existed."""
    import torch.nn.functional as F

    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = make_gpt()
    idx, targets = batch
    model(idx, targets)[1].backward()
    model.eval()
    model(idx)
    assert len(calls) == 2 * model.config.n_layer
    assert all(c.get("is_causal") is True and c.get("attn_mask") is None for c in calls)


def test_hf_gpt2_config_refuses_shapes_gpt2_cannot_hold(make_gpt):
    cfg = make_gpt().hf_gpt2_config()
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"]) == (32, 2, 2, 64)
    with pytest.raises(ValueError, match="GPT-2 needs biases"):
        make_gpt(bias=False).hf_gpt2_config()
