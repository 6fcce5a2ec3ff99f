"""The model-family seam (spdf.model.families): every family answers what the runner, FSDP2, export, FLOPs, µP,
generation and evaluation ask it, for its own tiny shape; exports record their family and older ones read as gpt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import spdf
from spdf.export import read_export, write_export
from spdf.model.families import FAMILIES, config_by_name, family_of, family_of_shape, get_family
from spdf.sparsity import sparse_layers
from spdf.sparsity.selection import select
from spdf.train.parametrization import hidden_layers

# Each family's unit-test shape: its default (demo) shape's `-test` twin, 2 layers of width 32 (tiny-test,
# llama-tiny-test), so that a new family is tested here without an edit.
TEST_SHAPES = {name: f"{family.default_shape}-test" for name, family in FAMILIES.items()}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def _model(family, seed=0, **overrides):
    torch.manual_seed(seed)
    return family.build(family.config(TEST_SHAPES[family.name], **overrides))


def test_every_family_has_a_tiny_test_shape_and_its_default_shape():
    for name, family in FAMILIES.items():
        test_config = family.configs[TEST_SHAPES[name]]
        assert (test_config.n_layer, test_config.d_model) == (2, 32)
        assert family.default_shape in family.configs and TEST_SHAPES[name] in family.configs
        assert family_of_shape(TEST_SHAPES[name]) is family and get_family(name) is family
    with pytest.raises(ValueError, match="unknown model family 'lama'.*did you mean 'llama'"):
        get_family("lama")
    with pytest.raises(ValueError, match="unknown model name 'llama-tinyy'.*did you mean 'llama-tiny'"):
        config_by_name("llama-tinyy")


def test_the_default_filter_is_the_papers_layers_and_what_the_library_default_picks(family):
    model = _model(family)
    chosen = set(select(model, 0.5, list(family.default_filter)))
    assert chosen == set(select(model, 0.5))  # spdf.sparsify's own default: every linear weight but the head
    assert {family.role(name.removesuffix(".weight")) for name in chosen} == {"qkv", "attn_out", "mlp_in", "mlp_out"}
    assert not any("embed" in n or "wte" in n or "lm_head" in n or "norm" in n or "ln_" in n for n in chosen)


def test_flop_roles_and_formula_cover_the_models_own_weight_matmuls(family):
    model = _model(family, tie_embeddings=False) if family.name == "llama" else _model(family)
    roles = {name: family.role(name) for name, _ in model.named_modules() if family.role(name) is not None}
    weights = {}
    for name, role in roles.items():
        weights[role] = weights.get(role, 0) + model.get_submodule(name).weight.numel()
    per_token = family.forward_flops(model.config, 16)
    assert {c: per_token[c] / 2 for c in weights} == weights  # one MAC (2 FLOPs) per weight per token
    assert set(per_token) == set(spdf.flops.COMPONENTS)


def test_mup_hidden_weights_are_the_block_matmuls_and_not_the_head(family):
    model = _model(family, parametrization="mup")
    hidden = hidden_layers(model)
    assert set(hidden) == {n for n, _ in model.named_modules() if family.role(n) is not None}
    assert not any("lm_head" in n for n in hidden)


def test_fsdp2_wraps_each_block_of_the_family(family):
    """What `spdf run` hands accelerate under FSDP2 (spdf.train.fsdp.shard_family_blocks): accelerate's own
    transformer policy then shards exactly the family's blocks, whatever the launch config named."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from spdf.train.fsdp import shard_family_blocks

    model = _model(family)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"])  # the shipped config's name
    accelerator = SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin))
    shard_family_blocks(accelerator, model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [m for m in model.modules() if policy(m)]
    assert len(wrapped) == model.config.n_layer and all(type(m) is family.block_class for m in wrapped)


def test_generation_with_the_kv_cache_equals_recomputing_every_step(family):
    from spdf.eval.generate import DecodingConfig, generate

    model = _model(family).eval()
    prompts = [[3, 5, 7, 9, 11], [4, 6]]
    config = DecodingConfig(max_new_tokens=6)
    assert generate(model, prompts, config, eos_id=None) == generate(model, prompts, config, eos_id=None,
                                                                      use_cache=False)


def test_exports_record_the_family_and_read_back_as_it(family, tmp_path):
    model = _model(family)
    spdf.sparsify(model, sparsity=0.5, seed=0, param_filter=list(family.default_filter))
    write_export(model, tmp_path / "export")
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["family"] == family.name
    exported = read_export(tmp_path / "export")
    assert family_of(exported.model) is family and set(exported.masks) == set(sparse_layers(model))
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported.model.eval()(ids)[0], model.eval()(ids)[0], rtol=0, atol=0)


def test_an_export_without_a_family_reads_as_gpt(tmp_path):
    """Exports written before families existed have no "family" key: they are GPTs."""
    model = _model(FAMILIES["gpt"])
    write_export(model, tmp_path / "export")
    config_file = tmp_path / "export/config.json"
    config = json.loads(config_file.read_text())
    del config["family"]
    config_file.write_text(json.dumps(config))
    (tmp_path / "export/manifest.json").unlink()  # as an older spdf wrote it (no manifest either)
    assert isinstance(read_export(tmp_path / "export").model, spdf.GPT)
    config["family"] = "mamba"
    config_file.write_text(json.dumps(config))
    with pytest.raises(spdf.export.CheckpointError, match="unknown model family 'mamba'"):
        read_export(tmp_path / "export")


def test_a_recipe_naming_another_familys_shape_is_told_which_family_it_is():
    from spdf.recipe import RecipeError, load_recipe

    demo = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    with pytest.raises(RecipeError, match="'tiny' is a shape of model family 'gpt', and model.family is 'llama'"):
        load_recipe(demo, ["model.family=llama", "model.name=tiny"])
    with pytest.raises(RecipeError, match="'llama-tiny' is a shape of model family 'llama'.*set model.family: llama"):
        load_recipe(demo, ["model.name=llama-tiny"])
    assert load_recipe(demo, ["model.family=llama", "model.name=smollm2-135m"]).model.name == "smollm2-135m"


def test_flops_list_names_every_familys_shapes_and_flops_takes_any_of_them(capsys):
    from spdf.cli import main

    assert main(["flops", "--list"]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()}
    for family, name, _ in spdf.model.families.named_shapes():
        assert rows[name] == family.name, name
    assert main(["flops", "llama-3.2-1b", "--sparsity", "0.75", "--seq-len", "2048"]) == 0
    assert "2.14x" in capsys.readouterr().out
