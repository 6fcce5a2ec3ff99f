"""peft's LoRA on a sparse base (GPT-2 from transformers, both backends; spdf's own GPT): the base stays frozen and
exactly sparse, the adapter trains, saves and loads as peft's; merging waits for densify and is then exact."""
import warnings

import pytest
import torch

import spdf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from spdf.integrations.lora import SparseLoraLinear, sparse_lora  # noqa: E402

IDS = torch.arange(3, 27).view(2, 12) % 96


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


def _is_hf(model):
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    return isinstance(base, transformers.PreTrainedModel)  # else spdf.GPT: (logits, loss) = model(ids, targets)


def _logits(model):
    with torch.no_grad():
        out = model(input_ids=IDS) if _is_hf(model) else model(IDS)
    return out.logits if hasattr(out, "logits") else out[0]


def _train(model, steps=3):
    """A few AdamW steps on the trainable parameters only (what peft leaves trainable: the adapters)."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        out = model(input_ids=IDS, labels=IDS) if _is_hf(model) else model(IDS, IDS)
        loss = out.loss if hasattr(out, "loss") else out[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _lora(model, modules):
    config = sparse_lora(peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0))
    return peft.get_peft_model(model, config)


def _check_base_frozen_and_sparse(sp, before):
    layers = list(sp.layers.values())  # peft has renamed them (.base_layer): compared in order
    assert len(layers) == len(before)
    for layer, weight in zip(layers, before.values()):
        assert not any(p.requires_grad for p in layer.weight_parameters())
        assert torch.equal(layer.dense_weight(), weight)  # frozen: not one value moved
        assert not (layer.dense_weight()[~layer.mask] != 0).any()


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_lora_on_a_sparse_gpt2_trains_saves_and_loads(backend, tmp_path, offline):
    base = _gpt2()
    sp = spdf.sparsify(base, sparsity=0.75, seed=1, backend=backend, tile=(8, 8))
    before = {n: layer.dense_weight().clone() for n, layer in sp.layers.items()}
    spdf.save_pretrained(base, tmp_path / "base", sparsifier=sp)
    model = _lora(base, ["c_attn", "c_fc"])
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SparseLoraLinear)]
    assert len(wrapped) == 4  # c_attn and c_fc of two blocks
    untrained = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a frozen sparse base needs no attached optimizer: no warning
        _train(model)
    trained = _logits(model)
    assert not torch.allclose(trained, untrained)
    _check_base_frozen_and_sparse(sp, before)
    assert all(row["actual"] == 0.75 for row in sp.stats())

    model.save_pretrained(tmp_path / "adapter")
    base2, _ = spdf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "base")
    config = sparse_lora(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(base2, tmp_path / "adapter", config=config).eval()
    torch.testing.assert_close(_logits(loaded), trained, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_merging_waits_for_densify_then_is_exact(backend):
    base = _gpt2()
    spdf.sparsify(base, sparsity=0.75, seed=1, backend=backend, tile=(8, 8))
    model = _train(_lora(base, ["c_attn", "c_proj"]))
    with pytest.raises(ValueError, match="densify"):
        model.merge_and_unload()
    expected = _logits(model)
    spdf.densify(model)
    merged = model.merge_and_unload().eval()
    assert not any(isinstance(m, spdf.sparsity.SparseLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_lora_on_spdfs_own_gpt(make_gpt):
    base = make_gpt().eval()
    sp = spdf.sparsify(base, sparsity=0.5, seed=2)
    before = {n: layer.dense_weight().clone() for n, layer in sp.layers.items()}
    model = _lora(base, ["c_attn", "c_fc", "c_proj"])
    assert sum(isinstance(m, SparseLoraLinear) for m in model.modules()) == 8  # per block: attn c_attn, c_proj; mlp c_fc, c_proj
    untrained = _logits(model)
    trained = _logits(_train(model))
    assert not torch.allclose(trained, untrained)
    _check_base_frozen_and_sparse(sp, before)
    spdf.densify(model)
    torch.testing.assert_close(_logits(model.merge_and_unload().eval()), trained, rtol=1e-5, atol=1e-5)
