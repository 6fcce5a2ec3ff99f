"""spdf.save_pretrained / spdf.from_pretrained on tiny configs of five transformers architectures, both backends."""
import json

import pytest
import torch

import spdf
from spdf.export import CheckpointError
from spdf.sparsity import layer_stats, sparse_layers

transformers = pytest.importorskip("transformers")

ARCHS = {
    "gpt2": lambda t: (t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32)),
                       t.AutoModelForCausalLM),
    "gpt_neox": lambda t: (t.GPTNeoXForCausalLM(t.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=96,
        max_position_embeddings=32)), t.AutoModelForCausalLM),
    "llama": lambda t: (t.LlamaForCausalLM(t.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        vocab_size=96, max_position_embeddings=32)), t.AutoModelForCausalLM),
    "opt": lambda t: (t.OPTForCausalLM(t.OPTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
        vocab_size=96, max_position_embeddings=32)), t.AutoModelForCausalLM),
    "bert": lambda t: (t.BertForMaskedLM(t.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=96,
        max_position_embeddings=32)), t.AutoModelForMaskedLM),
}
IDS = torch.arange(2, 26).view(2, 12) % 96


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _sparse(arch, backend):
    torch.manual_seed(0)
    model, auto = ARCHS[arch](transformers)
    model.eval()
    sp = spdf.sparsify(model, sparsity=0.75, seed=3, backend=backend, tile=(8, 8))
    return model, auto, sp


@pytest.mark.parametrize("backend", ["masked", "compressed"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_round_trip(arch, backend, tmp_path, offline):
    model, auto, sp = _sparse(arch, backend)
    assert sp.layers, arch
    expected, masks = _logits(model), sp.masks()
    spdf.save_pretrained(model, tmp_path, sparsifier=sp)
    assert {"sparsity.json", "masks.safetensors", "config.json"} <= {p.name for p in tmp_path.iterdir()}

    # plain transformers: the dense model with the zeros in place, whatever the backend
    dense = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(dense), expected)
    for name, mask in masks.items():
        assert torch.equal(dense.get_parameter(name) != 0, mask), name

    loaded, sp2 = spdf.from_pretrained(auto, tmp_path)
    loaded.eval()
    assert torch.equal(_logits(loaded), expected)
    assert sp2.masks().keys() == masks.keys()
    assert all(torch.equal(sp2.masks()[n], masks[n]) for n in masks)
    assert sp2.config["backend"] == backend and sp2.config == sp.config
    for row in layer_stats(loaded)[:-1]:
        assert row["mask_sparsity"] == 0.75 and row["actual"] == 0.75 and row["target"] == 0.75, row
    kinds = {type(layer) for layer in sparse_layers(loaded).values()}
    assert kinds == {type(layer) for layer in sp.layers.values()}


def test_default_filter_leaves_opts_embedding_projections_dense():
    """OPT-350m's project_in/project_out map its 512-wide embeddings to the 1024-wide blocks: embedding and output
    path, not attention or MLP, so the paper's default filter leaves them dense."""
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=16,
        vocab_size=96, max_position_embeddings=32))
    assert model.model.decoder.project_in is not None
    layers = set(spdf.sparsify(model, sparsity=0.5).layers)
    assert layers == {f"model.decoder.layers.{i}.{n}" for i in range(2)
                      for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                "fc1", "fc2")}


def test_plain_save_pretrained_of_a_compressed_model_refuses(tmp_path):
    model, _, _ = _sparse("gpt2", "compressed")
    with pytest.raises(ValueError, match="spdf.save_pretrained"):
        model.save_pretrained(tmp_path)
    spdf.densify(model)  # a dense model saves as usual again
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


def test_save_pretrained_called_on_the_class_saves_a_compressed_model_dense_and_right(tmp_path, offline):
    """Called on the class, transformers' save_pretrained passes spdf's instance guard: it must still not write the
    compressed layers, which its from_pretrained would load as random layers."""
    model, auto, _ = _sparse("gpt2", "compressed")
    transformers.PreTrainedModel.save_pretrained(model, tmp_path)
    torch.testing.assert_close(_logits(auto.from_pretrained(tmp_path).eval()), _logits(model), rtol=0, atol=0)
    assert any(k.endswith(".values") for k in model.state_dict())  # outside save_pretrained: the compressed form


def test_plain_save_pretrained_of_a_masked_model_loads_dense_and_right(tmp_path, offline):
    model, auto, _ = _sparse("gpt2", "masked")
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(auto.from_pretrained(tmp_path).eval()), _logits(model), rtol=0, atol=0)


def test_masks_follow_transformers_prefix_renaming(tmp_path, offline):
    model, _, sp = _sparse("bert", "masked")
    spdf.save_pretrained(model, tmp_path, sparsifier=sp)
    base, sp2 = spdf.from_pretrained(transformers.BertModel, tmp_path)  # "bert." stripped from every key
    assert set(sp2.masks()) == {n[len("bert."):] for n in sp.masks()}
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(input_ids=IDS).last_hidden_state,
                                   model.bert(input_ids=IDS).last_hidden_state, rtol=0, atol=0)


def test_masks_that_do_not_belong_to_the_weights_are_refused(tmp_path, offline):
    model, auto, sp = _sparse("gpt2", "masked")
    spdf.save_pretrained(model, tmp_path, sparsifier=sp)
    dense = auto.from_pretrained(tmp_path)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.01)  # "fine-tuned densely" into the same directory, but the masks left behind by hand
    type(dense).save_pretrained(dense, tmp_path)
    with pytest.raises(CheckpointError, match="not zero outside its saved mask"):
        spdf.from_pretrained(auto, tmp_path)
    spdf.save_pretrained(dense, tmp_path)  # spdf's own save of a dense model removes the stale masks
    loaded, sp2 = spdf.from_pretrained(auto, tmp_path)
    assert sp2 is None and not sparse_layers(loaded)


def test_incomplete_sparsity_state_is_refused(tmp_path, offline):
    model, auto, sp = _sparse("gpt2", "masked")
    spdf.save_pretrained(model, tmp_path, sparsifier=sp)
    (tmp_path / "masks.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        spdf.from_pretrained(auto, tmp_path)
    assert json.loads((tmp_path / "sparsity.json").read_text())["layers"]


@pytest.mark.parametrize("algorithm", [
    lambda: spdf.sparsity.SET(drop_fraction=spdf.sparsity.Cosine(0.3, 0.0, begin=0, end=9), every=3),
    lambda: spdf.sparsity.GMP(initial=0.5, every=2, stop=8),
])
def test_a_dynamic_algorithm_comes_back_with_its_settings_and_step(algorithm, tmp_path, offline):
    torch.manual_seed(0)
    model, auto = ARCHS["gpt2"](transformers)
    sp = spdf.sparsify(model, sparsity=0.75, algorithm=algorithm())
    sp.step = 4
    spdf.save_pretrained(model, tmp_path, sparsifier=sp)
    _, sp2 = spdf.from_pretrained(auto, tmp_path)
    assert sp2.algorithm.settings() == sp.algorithm.settings() and sp2.step == 4
    assert [r["target"] for r in sp2.stats()] == [r["target"] for r in sp.stats()]
