"""The `block` backend on CPU: the registry's refusals, exact training against the masked backend with the same block
masks, densify and resume exact, the product choice; its Triton block kernels through the interpreter."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_training import autocast_steps

import spdf
from spdf.kernels import pack
from spdf.kernels.block import block_linear, product
from spdf.sparsity import Block
from spdf.sparsity.block import BlockSparseLinear, block_problem, set_block_products

SHAPE = dict(n_layer=2, n_head=2, d_model=128, d_ff=256, n_ctx=16, vocab_size=64)


def gpt(seed=0, block=64):
    """Width 2 blocks (so even attn.c_proj keeps one of its 4 blocks at 75%)."""
    torch.manual_seed(seed)
    return spdf.GPT(spdf.GPTConfig(name="block-test", **{**SHAPE, "d_model": 2 * block, "d_ff": 4 * block}))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["n_ctx"] + 1), generator=g) for _ in range(n)]


def train(model, opt, data):
    losses = []
    for idx in data:
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def sparse_gpt(backend, block=64, seed=0):
    model = gpt(seed, block)
    sp = spdf.sparsify(model, 0.75, init=Block(block), backend=backend, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp.attach(opt)
    return model, sp, opt


@pytest.mark.parametrize("block", [64, 128])
def test_trains_exactly_like_the_masked_backend_with_the_same_blocks(block):
    data = batches(4)
    masked, _, opt_m = sparse_gpt("masked", block)
    blocked, sp, opt_b = sparse_gpt("block", block)
    assert all(isinstance(layer, BlockSparseLinear) and layer.tile == (block, block) for layer in sp.layers.values())
    torch.testing.assert_close(train(blocked, opt_b, data), train(masked, opt_m, data), rtol=1e-5, atol=1e-5)
    dense_m = spdf.sparsity.to_dense_state_dict(masked.state_dict())
    dense_b = spdf.sparsity.to_dense_state_dict(blocked.state_dict())
    for key in dense_m:
        torch.testing.assert_close(dense_b[key], dense_m[key], rtol=1e-4, atol=1e-5, msg=key)
    for name, layer in sp.layers.items():  # only the kept blocks are stored: round(25%) of the blocks, exactly
        blocks = layer.mask.numel() // block**2
        assert layer.nnz == (blocks - round(0.75 * blocks)) * block**2 == int(layer.mask.sum()), name
        assert block_problem(layer.mask, (block, block)) is None, name


def test_densify_is_exact():
    model, sp, opt = sparse_gpt("block")
    train(model, opt, batches(2))
    idx = batches(1, seed=5)[0][:, :-1]
    model.eval()
    sparse_out = model(idx)[0]
    weights = {n: layer.dense_weight().clone() for n, layer in sp.layers.items()}
    spdf.densify(model)
    assert torch.equal(model(idx)[0], sparse_out)
    for name, weight in weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight)


def test_checkpoint_and_resume_are_exact(tmp_path):
    data = batches(6)
    whole, _, opt = sparse_gpt("block")
    expected = train(whole, opt, data)
    first, _, opt1 = sparse_gpt("block")
    train(first, opt1, data[:3])
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "ckpt.pt")
    resumed, _, opt2 = sparse_gpt("block", seed=7)  # other initial weights: everything must come from the file
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert train(resumed, opt2, data[3:]) == expected[3:]
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_measured_flops_are_the_kept_blocks_only():
    from spdf.flops import measure_training_flops

    idx = batches(1)[0]
    measured = {backend: measure_training_flops(sparse_gpt(backend)[0], idx[:, :-1], idx[:, 1:])
                for backend in ("masked", "block")}
    assert measured["block"]["spent"] == pytest.approx(measured["masked"]["spent"], rel=1e-9)
    assert measured["block"]["spent"] < 0.6 * measure_training_flops(gpt(), idx[:, :-1], idx[:, 1:])["dense"]


def test_masks_of_other_patterns_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="backend 'block' computes masks of sparsity.method 'block' with "
                                         "block_size 64 or 128 only, not 'random'"):
        spdf.sparsify(gpt(), 0.75, init="random", backend="block")
    with pytest.raises(ValueError, match="not 'block' with block_size 16"):
        spdf.sparsify(gpt(), 0.75, init=Block(16), backend="block")
    with pytest.raises(ValueError, match="keeps static masks only"):
        spdf.sparsify(gpt(), 0.75, init=Block(64), backend="block", algorithm=spdf.sparsity.SET(every=1))
    model = gpt()
    masks = {n: torch.rand(out, inp) > 0.5 for n, (out, inp) in
             [(name, tuple(m.weight.shape)) for name, m in model.named_modules() if name.endswith("mlp.c_fc")]}
    with pytest.raises(ValueError, match="not made of whole 64x64 blocks"):
        spdf.sparsify(model, 0.75, init=masks, param_filter=[f"{n}.weight" for n in masks], backend="block")
    assert isinstance(model.get_submodule(next(iter(masks))), torch.nn.Linear)  # refused: the model is untouched
    small = spdf.GPT(spdf.GPTConfig(name="small", **{**SHAPE, "d_model": 64}))  # attn.c_proj: one 64x64 block
    with pytest.raises(ValueError, match="c_proj.weight: .*keeps none of the weight's 1 blocks"):
        spdf.sparsify(small, 0.75, init=Block(64), backend="block")


def test_a_recipe_asks_the_registry():
    from spdf.recipe import RecipeError, apply_overrides, recipe_from_dict

    base = {"version": 1, "name": "t", "model": {"name": "tiny-test"},
            "phases": [{"name": "p", "kind": "pretrain", "steps": 1, "seq_len": 8, "batch_size": 1,
                        "optimizer": {"lr": 1e-3}, "data": {"source": "stdlib"}}]}
    ok = recipe_from_dict(apply_overrides(base, ["sparsity.method=block", "sparsity.block_size=128",
                                                 "sparsity.backend=block"]))
    assert ok.sparsity.backend == "block"
    with pytest.raises(RecipeError, match=r"sparsity\.backend: backend 'block' .* not 'random'"):
        recipe_from_dict(apply_overrides(base, ["sparsity.backend=block"]))
    with pytest.raises(RecipeError, match="not 'block' with block_size 16"):
        recipe_from_dict(apply_overrides(base, ["sparsity.method=block", "sparsity.backend=block"]))


def test_the_saved_tile_rebuilds_block_layers_from_user_masks():
    model, sp, _ = sparse_gpt("block", 128)
    masks = {n: layer.mask for n, layer in sp.layers.items()}
    again = gpt(block=128)
    sp2 = spdf.sparsify(again, 0.75, init=masks, param_filter=[f"{n}.weight" for n in masks], backend="block",
                        tile=(128, 128))
    assert all(layer.tile == (128, 128) for layer in sp2.layers.values())
    assert all(torch.equal(sp2.layers[n].mask, m) for n, m in masks.items())


def test_product_choice_is_checked_and_restored(monkeypatch):
    previous = set_block_products(fwd="reference")
    try:
        with pytest.raises(ValueError, match="fwd=nope is not one of"):
            set_block_products(fwd="nope")
    finally:
        set_block_products(**previous)
    assert BlockSparseLinear.products == previous
    from spdf.sparsity import block

    monkeypatch.setenv("SPDF_BLOCK_PRODUCTS", "fwd=bsr,dw=block")
    assert block._products_from_env() == {"fwd": "bsr", "dx": "auto", "dw": "block"}
    monkeypatch.setenv("SPDF_BLOCK_PRODUCTS", "fwd=cublas")
    with pytest.raises(ValueError, match="fwd=cublas"):
        block._products_from_env()


# ---- spdf's Triton block kernels against the reference (the interpreter on CPU) ---------------------------------
def _interpreted() -> bool:
    from spdf.kernels.ops import triton_interpreted

    return triton_interpreted()


@pytest.mark.skipif(not _interpreted(), reason="needs triton imported with TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block,shape", [(64, (128, 192)), (128, (256, 128))])
def test_block_kernels_match_the_reference(dtype, block, shape):
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(shape[0] // block, shape[1] // block, generator=g) >= 0.5
    blocks[0, 0], blocks[-1, -1] = True, False  # some kept, an empty block-row or column possible
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    weight = torch.randn(shape, generator=g).to(dtype)
    layout, values = pack(weight, mask, (block, block))
    x = torch.randn(5, shape[1], generator=g).to(dtype)  # 5 tokens: not a multiple of any token block
    dy = torch.randn(5, shape[0], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for which, args in (("fwd", (x, values, layout, bias)), ("dx", (dy, values, layout)), ("dw", (dy, x, layout))):
        got, want = product(which, "block")(*args), product(which, "reference")(*args)
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=which)


@pytest.mark.skipif(not _interpreted(), reason="needs triton imported with TRITON_INTERPRET=1")
def test_block_linear_autograd_with_the_block_kernels_matches_the_reference():
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(2, 2, generator=g) >= 0.5).repeat_interleave(64, 0).repeat_interleave(64, 1)
    mask[:64, :64] = True
    layout, values = pack(torch.randn(128, 128, generator=g), mask, (64, 64))
    x = torch.randn(3, 4, 128, generator=g)
    grads = {}
    for impl in ("reference", "block"):
        v, xi = values.clone().requires_grad_(), x.clone().requires_grad_()
        block_linear(xi, v, layout, None, dict(fwd=impl, dx=impl, dw=impl)).square().sum().backward()
        grads[impl] = (xi.grad, v.grad)
    for a, b in zip(grads["block"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---- on a GPU: a training step with each product implementation (skipped without CUDA) --------------------------
CUDA_IMPLS = ["block", "tiles", "bsr",
              pytest.param("stk", marks=pytest.mark.skipif(importlib.util.find_spec("stk") is None,
                                                           reason="stanford-stk is not installed"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_a_block_backend_training_step_matches_the_masked_backend(impl):
    losses = {}
    previous = set_block_products(fwd=impl, dx=impl, dw=impl)
    try:
        for backend in ("masked", "block"):
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = spdf.GPT(spdf.GPTConfig(name="t", n_layer=2, n_head=4, d_model=256, d_ff=1024, n_ctx=64,
                                                vocab_size=128))
            sp = spdf.sparsify(model, 0.75, init=Block(128), backend=backend)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            sp.attach(opt)
            idx = torch.randint(0, 128, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            losses[backend] = autocast_steps(model, opt, idx)
    finally:
        set_block_products(**previous)
    torch.testing.assert_close(losses["block"], losses["masked"], rtol=2e-2, atol=2e-2)
