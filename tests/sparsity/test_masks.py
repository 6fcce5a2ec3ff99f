"""Mask makers: exact counts, determinism from (seed, name, shape), structure, ERK allocation, input checks."""
import math

import pytest
import torch

from spdf.sparsity import block_mask, erk_sparsities, magnitude_mask, nm_mask, random_mask
from spdf.sparsity.methods import MASK_METHODS, Block, Magnitude, Random, Target, mask_method

SHAPES = [(1, 1), (1, 7), (3, 5), (7, 13), (31, 17), (96, 32), (64, 64), (257, 3)]
LEVELS = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 0.99]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", LEVELS)
def test_random_mask_has_exact_zero_count(shape, sparsity):
    mask = random_mask(shape, sparsity, seed=0, name="w")
    numel = math.prod(shape)
    zeros = int((~mask).sum())
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    assert zeros == round(sparsity * numel)
    assert abs(zeros - sparsity * numel) <= 0.5


def test_random_mask_zero_sparsity_keeps_everything():
    assert random_mask((17, 9), 0.0, seed=3, name="w").all()


def test_random_mask_is_a_pure_function_of_seed_name_shape():
    a = random_mask((48, 40), 0.75, seed=7, name="transformer.h.0.mlp.c_fc.weight")
    b = random_mask((48, 40), 0.75, seed=7, name="transformer.h.0.mlp.c_fc.weight")
    assert torch.equal(a, b)
    # The global RNG must not leak in.
    torch.manual_seed(999)
    torch.rand(10)
    c = random_mask((48, 40), 0.75, seed=7, name="transformer.h.0.mlp.c_fc.weight")
    assert torch.equal(a, c)
    assert not torch.equal(a, random_mask((48, 40), 0.75, seed=7, name="transformer.h.1.mlp.c_fc.weight"))
    assert not torch.equal(a, random_mask((48, 40), 0.75, seed=8, name="transformer.h.0.mlp.c_fc.weight"))


def test_random_mask_positions_look_uniform():
    # Over many masks every position is kept about (1 - s) of the time: no bias toward the front or rows.
    kept = torch.stack([random_mask((8, 8), 0.75, seed=s, name="w") for s in range(400)]).float().mean(0)
    assert kept.min() > 0.15 and kept.max() < 0.35


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_keeps_the_largest_entries_with_exact_count(sparsity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(23, 19, generator=g)
    mask = magnitude_mask(w, sparsity, name="w")
    assert int((~mask).sum()) == round(sparsity * w.numel())
    if 0 < sparsity:
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_magnitude_mask_exact_count_with_ties():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.0, 0.0]])
    mask = magnitude_mask(w, 0.5, name="w")
    assert int(mask.sum()) == 4
    assert mask[1, :2].all() and not mask[1, 2:].any()


def test_magnitude_mask_needs_a_weight():
    with pytest.raises(ValueError, match="my.weight"):
        magnitude_mask(None, 0.5, "my.weight")


@pytest.mark.parametrize("n,m,shape", [(2, 4, (6, 16)), (1, 4, (5, 8)), (1, 2, (3, 10)), (3, 8, (4, 24))])
def test_nm_mask_keeps_exactly_n_in_every_group_of_m(n, m, shape):
    mask = nm_mask(shape, n, m, seed=0, name="w")
    assert tuple(mask.shape) == shape
    groups = mask.view(shape[0], shape[1] // m, m)
    assert (groups.sum(-1) == n).all()


def test_nm_mask_groups_run_along_the_input_dim():
    # Groups along the output dim would also give the right total; the row sums pin the orientation.
    mask = nm_mask((8, 12), 1, 4, seed=0, name="w")
    assert (mask.sum(1) == 3).all()


def test_nm_mask_is_deterministic_and_seed_dependent():
    assert torch.equal(nm_mask((16, 32), 2, 4, 0, "a"), nm_mask((16, 32), 2, 4, 0, "a"))
    assert not torch.equal(nm_mask((16, 32), 2, 4, 0, "a"), nm_mask((16, 32), 2, 4, 1, "a"))


def test_nm_mask_indivisible_input_dim_names_the_parameter():
    with pytest.raises(ValueError, match=r"blocks\.3\.fc\.weight.*30.*m=4"):
        nm_mask((8, 30), 2, 4, seed=0, name="blocks.3.fc.weight")


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4), (2.0, 4)])
def test_nm_mask_rejects_bad_n_m(n, m):
    with pytest.raises(ValueError, match="fc.weight"):
        nm_mask((8, 8), n, m, seed=0, name="fc.weight")


@pytest.mark.parametrize("shape,block,sparsity", [((32, 48), 16, 0.5), ((12, 20), 4, 0.75), ((9, 6), 3, 1 / 3),
                                                  ((8, 8), 1, 0.5)])
def test_block_mask_drops_whole_blocks_with_exact_count(shape, block, sparsity):
    mask = block_mask(shape, sparsity, block, seed=0, name="w")
    rows, cols = shape[0] // block, shape[1] // block
    tiles = mask.view(rows, block, cols, block).permute(0, 2, 1, 3).reshape(rows, cols, -1)
    kept_tile = tiles.all(-1)
    assert (kept_tile | ~tiles.any(-1)).all(), "a block is partly kept"
    assert int((~kept_tile).sum()) == round(sparsity * rows * cols)


@pytest.mark.parametrize("shape,block", [((32, 40), 16), ((30, 32), 16), ((8, 8), 0), ((8, 8), 3)])
def test_block_mask_block_must_divide_shape(shape, block):
    with pytest.raises(ValueError, match="attn.c_proj.weight"):
        block_mask(shape, 0.5, block, seed=0, name="attn.c_proj.weight")


GPT_LIKE = {f"h.{i}.{k}": s for i in range(3) for k, s in
            {"c_attn": (192, 64), "attn_proj": (64, 64), "c_fc": (256, 64), "mlp_proj": (64, 256)}.items()}


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_erk_total_kept_matches_global_sparsity(sparsity):
    levels = erk_sparsities(GPT_LIKE, sparsity)
    assert set(levels) == set(GPT_LIKE)
    total = sum(math.prod(s) for s in GPT_LIKE.values())
    kept = sum(math.prod(s) - round(levels[k] * math.prod(s)) for k, s in GPT_LIKE.items())
    assert abs(kept - (1 - sparsity) * total) <= len(GPT_LIKE)  # at most half an entry of rounding per layer
    assert all(0.0 <= v < 1.0 for v in levels.values())


def test_erk_gives_small_layers_higher_density():
    levels = erk_sparsities(GPT_LIKE, 0.75)
    # density ∝ (in + out) / (in · out): the 64×64 projection is densest, the 4x-wide MLP layers sparsest.
    assert levels["h.0.attn_proj"] < levels["h.0.c_attn"] < levels["h.0.c_fc"]
    assert levels["h.0.c_fc"] == pytest.approx(levels["h.0.mlp_proj"])
    ratio = (1 - levels["h.0.attn_proj"]) / (1 - levels["h.0.c_fc"])
    assert ratio == pytest.approx((128 / 64**2) / (320 / (256 * 64)))


def test_erk_layers_over_density_one_become_dense_and_budget_is_kept():
    shapes = {"tiny": (4, 4), "big": (512, 512), "mid": (128, 256)}
    levels = erk_sparsities(shapes, 0.8)
    assert levels["tiny"] == 0.0
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(math.prod(s) * (1 - levels[k]) for k, s in shapes.items())
    assert kept == pytest.approx(0.2 * total, rel=1e-9)
    assert levels["big"] > levels["mid"] > 0


def test_erk_cascades_when_rebalancing_pushes_more_layers_over_one():
    shapes = {"tiny": (4, 4), "big": (512, 512), "mid": (128, 256)}
    levels = erk_sparsities(shapes, 0.5)  # tiny is dense at once; the rebalanced scale then pushes mid over 1 too
    assert levels["tiny"] == 0.0 and levels["mid"] == 0.0
    total = sum(math.prod(s) for s in shapes.values())
    assert 512 * 512 * (1 - levels["big"]) + 16 + 128 * 256 == pytest.approx(0.5 * total, rel=1e-9)


@pytest.mark.parametrize("sparsity", [0.0, 1e-3])
def test_erk_near_zero_sparsity_is_dense(sparsity):
    levels = erk_sparsities(GPT_LIKE, sparsity)
    assert max(levels.values()) < 0.01


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "a", True, None, float("nan")])
@pytest.mark.parametrize("method", [Random(), Magnitude(), Block(4)], ids=["random", "magnitude", "block"])
def test_bad_sparsity_is_a_value_error_naming_the_parameter(bad, method):
    with pytest.raises(ValueError, match=r"'blocks\.1\.fc\.weight'"):
        method.masks({"blocks.1.fc.weight": Target((16, 16), bad, torch.randn(16, 16))}, seed=0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "a", True])
def test_erk_rejects_bad_global_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        erk_sparsities(GPT_LIKE, bad)


def test_unknown_method_lists_the_allowed():
    with pytest.raises(ValueError, match="lottery") as err:
        mask_method("lottery")
    for method in MASK_METHODS:
        assert method in str(err.value)
