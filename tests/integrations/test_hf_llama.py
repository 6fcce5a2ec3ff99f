"""spdf.Llama <-> transformers LlamaForCausalLM: the same logits both ways, the same greedy decoding, config.json read
back, and what Hugging Face Llama cannot express refused."""
import json

import pytest
import torch

from spdf.integrations.hf_llama import (from_hf_llama, hf_llama_config, llama_config_from_hf, llama_from_hf,
                                        llama_state_dict_from_hf, to_hf_llama)
from spdf.model.llama import Llama
from spdf.model.llama_config import LLAMA_CONFIGS

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def make_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return Llama.from_name("llama-tiny-test", **overrides).eval()


def _idx(B, T, seed=0):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False])
def test_spdf_to_hf_gives_equal_logits(tie):
    # rope_base 500 and 60 positions: a different rotation convention or base would show in the later positions
    model = make_llama(tie_embeddings=tie, rope_base=500.0)
    hf = to_hf_llama(model).eval()
    assert hf.config.tie_word_embeddings is tie and hf.config.num_key_value_heads == 2
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    idx = _idx(2, 60)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_spdf_gives_equal_logits_and_copies_the_weights(tie):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=40,
                                      rope_theta=1000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm weight left out would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = from_hf_llama(hf).eval()
    c = model.config
    assert (c.d_model, c.n_head, c.kv_heads, c.d_ff, c.rope_base, c.norm_eps, c.tie_embeddings, c.n_ctx) == \
        (48, 6, 2, 80, 1000.0, 1e-6, tie, 40)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    idx = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)
        model.model.embed_tokens.weight.zero_()  # copied, not shared
    assert hf.model.embed_tokens.weight.abs().sum() > 0


def test_greedy_generation_with_left_padding_matches_transformers_generate():
    model = make_llama()
    hf = to_hf_llama(model).eval()
    ids = _idx(2, 7, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cache = model.new_kv_cache(13)
        logits, _ = model(ids, kv_cache=cache, attention_mask=mask, last_logits_only=True)
        seq = ids
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            logits, _ = model(nxt, kv_cache=cache, attention_mask=mask)
    assert torch.equal(out, seq)


def test_a_saved_hf_directory_reads_back(tmp_path):
    model = make_llama(tie_embeddings=False, rope_base=2500.0)
    to_hf_llama(model).save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    state = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    back = llama_from_hf(hf_config, state)
    assert back.config.replace(name="x") == model.config.replace(name="x")
    idx = _idx(1, 20)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


@pytest.mark.parametrize("name", ["smollm2-135m", "tinyllama-1.1b", "llama-3.2-1b"])
def test_named_shapes_build_the_same_model_in_transformers(name):
    cfg = LLAMA_CONFIGS[name]
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(cfg)))
        ours = Llama(cfg)
    assert hf.num_parameters() == ours.num_parameters()
    assert {k: tuple(v.shape) for k, v in hf.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.state_dict().items()}


# ---- refused -----------------------------------------------------------------------------------------------------
def test_mup_does_not_export_to_hf_llama():
    with pytest.raises(ValueError, match="no µP multipliers .* only parametrization 'sp'"):
        hf_llama_config(make_llama(parametrization="mup", base_width=16).config)


def _hf_dict(**changes):
    d = transformers.LlamaConfig(**hf_llama_config(LLAMA_CONFIGS["llama-tiny-test"])).to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="mistral"), "'mistral' model; spdf.Llama maps onto model_type 'llama' only"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}), "RoPE scaling 'llama3'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling 'linear'"),
    (dict(num_key_value_heads=3), "n_head .* must be a multiple of model.n_kv_head"),
])
def test_configs_spdf_cannot_compute_the_same_way_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        llama_config_from_hf(_hf_dict(**changes))


def test_old_style_rope_theta_is_read():
    d = _hf_dict(rope_parameters=None, rope_scaling=None, rope_theta=12345.0)
    assert llama_config_from_hf(d).rope_base == 12345.0


def test_weights_that_do_not_fit_are_refused():
    hf_config = _hf_dict()
    state = dict(make_llama().state_dict())
    with pytest.raises(ValueError, match="missing .*model.norm.weight"):
        llama_from_hf(hf_config, {k: v for k, v in state.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(31,\\)"):
        llama_from_hf(hf_config, {**state, "model.norm.weight": torch.ones(31)})
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        llama_state_dict_from_hf({**state, "lm_head.weight": torch.zeros(128, 32)}, make_llama().config)


def test_a_bare_llama_model_state_dict_reads_with_its_tied_head():
    model = make_llama()
    bare = {k[len("model."):]: v for k, v in model.state_dict().items() if k.startswith("model.")}
    back = llama_from_hf(_hf_dict(), bare)
    idx = _idx(1, 8)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


@pytest.mark.parametrize("num_beams", [1, 4])
def test_spdf_generate_gives_transformers_tokens_on_a_left_padded_batch(num_beams):
    # spdf.eval.generate drives a Llama as it drives a GPT: its cache (selected rows for beams) holds n_kv_head heads
    from spdf.eval.generate import DecodingConfig, generate

    model = make_llama(seed=4)
    hf = to_hf_llama(model).eval()
    eos = 3
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20, 21]]
    ours = generate(model, prompts, DecodingConfig(max_new_tokens=12, num_beams=num_beams, length_penalty=0.8),
                    eos_id=eos)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=num_beams, length_penalty=0.8,
                      do_sample=False, eos_token_id=eos, pad_token_id=0)
    theirs = [row[width:].tolist() for row in out]
    assert ours == [row[:row.index(eos)] if eos in row else row for row in theirs]
