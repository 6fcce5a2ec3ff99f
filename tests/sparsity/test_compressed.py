"""The compressed backend (CompressedSparseLinear) against the masked one (SparseLinear)."""
import copy

import pytest
import torch
import torch.nn as nn

import spdf
from spdf.kernels import pack
from spdf.sparsity import SparseLinear
from spdf.sparsity.compressed import CompressedSparseLinear, dense_state_dict
from tiny_training import train_tiny_gpt

TILE = (16, 16)  # shape 40 x 56 is not a multiple: partial edge tiles


class Conv1D(nn.Module):
    """Hugging Face GPT-2's layout: weight (in, out), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)


def _masked(sparsity=0.75, seed=0, transposed=False):
    torch.manual_seed(seed)
    dense = Conv1D(40, 56) if transposed else nn.Linear(56, 40)
    mask = torch.rand(40, 56) >= sparsity
    layer = SparseLinear(dense, mask.t().contiguous() if transposed else mask, transposed, sparsity)
    layer.optimizer_attached = True  # the masked layer's own zeroing is not under test here
    return layer


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_pack_is_exact(sparsity, transposed):
    masked = _masked(sparsity, transposed=transposed)
    comp = CompressedSparseLinear.from_masked(masked, tile=TILE)
    weight = masked.weight.t() if transposed else masked.weight
    assert torch.equal(comp.dense_weight(), weight.detach())
    assert torch.equal(comp.mask, masked.mask)
    assert comp.nnz == int(masked.mask.sum()) and comp.density == pytest.approx(masked.density)
    assert comp.bias is masked.bias and comp.target_sparsity == masked.target_sparsity


@pytest.mark.parametrize("transposed", [False, True])
def test_forward_backward_match_masked(transposed):
    masked = _masked(0.75, transposed=transposed)
    comp = CompressedSparseLinear.from_masked(masked, tile=TILE)
    x = torch.randn(3, 7, 56)
    gy = torch.randn(3, 7, 40)

    masked(x).backward(gy)
    dense_grad = (masked.weight.grad.t() if transposed else masked.weight.grad).clone()
    bias_grad = masked.bias.grad.clone()
    masked.bias.grad = None

    y = comp(x)
    y.backward(gy)
    torch.testing.assert_close(y, masked(x), atol=1e-5, rtol=1e-5)
    assert comp.values.grad.shape == (comp.nnz,)
    torch.testing.assert_close(comp.values.grad, pack(dense_grad, comp.mask, TILE)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp.bias.grad, bias_grad, atol=1e-5, rtol=1e-5)


def test_adamw_state_is_nnz_sized_and_steps_match_masked():
    masked = _masked(0.75)
    comp = CompressedSparseLinear.from_masked(copy.deepcopy(masked), tile=TILE)
    opt_m = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    opt_c = torch.optim.AdamW(comp.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        x = torch.randn(8, 56)
        for layer, opt in ((masked, opt_m), (comp, opt_c)):
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
        masked.apply_mask_()  # what Sparsifier.attach() does after each step
    state = opt_c.state[comp.values]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (comp.nnz,)
    assert comp.nnz < 0.3 * masked.weight.numel()
    torch.testing.assert_close(comp.dense_weight(), masked.weight.detach(), atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip_resizes_for_another_mask():
    comp = CompressedSparseLinear.from_masked(_masked(0.75, seed=0), tile=TILE)
    other = CompressedSparseLinear.from_masked(_masked(0.5, seed=1), tile=TILE)
    sd = comp.state_dict()
    assert "values" in sd and "tile_bitmap" in sd and "bias" in sd and "weight" not in sd
    other.load_state_dict(sd)
    x = torch.randn(5, 56)
    assert torch.equal(other(x), comp(x))
    assert other.nnz == comp.nnz and torch.equal(other.mask, comp.mask)


@pytest.mark.parametrize("transposed", [False, True])
def test_to_dense_and_dense_state_dict(transposed):
    masked = _masked(0.75, transposed=transposed)
    comp = CompressedSparseLinear.from_masked(masked, tile=TILE)
    expected_weight = masked.weight.detach().clone()
    x = torch.randn(4, 56)
    y = comp(x)
    dense = comp.to_dense()
    assert type(dense) is (Conv1D if transposed else nn.Linear)
    assert torch.equal(dense.weight, expected_weight) and dense.weight.requires_grad
    assert dense_state_dict(comp.state_dict())["weight"].shape == expected_weight.shape
    assert torch.equal(dense_state_dict(comp.state_dict())["weight"], expected_weight)
    if not transposed:
        torch.testing.assert_close(dense(x), y, atol=1e-5, rtol=1e-5)
        dense(x).sum().backward()
        assert (dense.weight.grad[~comp.mask] != 0).any()  # formerly masked weights learn


def test_sparsify_with_compressed_backend_trains_a_gpt():
    if not hasattr(spdf, "GPT"):
        pytest.skip("spdf.GPT not available")
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny-test")
    reference = copy.deepcopy(model)
    spdf.sparsify(model, sparsity=0.75, seed=0, backend="compressed", tile=TILE)
    spdf.sparsify(reference, sparsity=0.75, seed=0)
    for m in reference.modules():
        if isinstance(m, SparseLinear):
            m.optimizer_attached = True
    layers = [m for m in model.modules() if isinstance(m, CompressedSparseLinear)]
    assert layers, "sparsify(backend='compressed') made no compressed layer"
    idx = torch.randint(0, 128, (2, 16))
    out, ref = model(idx), reference(idx)
    logits = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(logits, ref[0] if isinstance(ref, tuple) else ref, atol=1e-4, rtol=1e-4)
    logits.float().square().mean().backward()
    assert all(layer.values.grad is not None for layer in layers)


def test_twenty_steps_train_like_the_masked_backend():
    masked_losses, masked = train_tiny_gpt("masked")
    comp_losses, comp = train_tiny_gpt("compressed")
    assert masked_losses[-1] < masked_losses[0] - 0.5
    torch.testing.assert_close(comp_losses, masked_losses, atol=1e-4, rtol=1e-4)
    # the same weights too: masked's dense weights against the compressed layers expanded
    dense_masked = spdf.sparsity.to_dense_state_dict(masked.state_dict())
    dense_comp = spdf.sparsity.to_dense_state_dict(comp.state_dict())
    assert dense_masked.keys() == dense_comp.keys()
    for key in dense_masked:
        torch.testing.assert_close(dense_comp[key], dense_masked[key], atol=1e-4, rtol=1e-3, msg=key)
    # and AdamW's state of a compressed layer holds only its non-zeros
    layer = next(m for m in comp.modules() if isinstance(m, CompressedSparseLinear))
    assert layer.nnz == round(0.25 * layer.in_features * layer.out_features)


def test_compressed_state_dict_saves_as_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = spdf.GPT.from_name("tiny-test")
    spdf.sparsify(model, sparsity=0.75, seed=0, backend="compressed", tile=TILE)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "m.safetensors"))  # accelerate checkpoints save this way: no dicts allowed
    fresh = spdf.GPT.from_name("tiny-test")
    spdf.sparsify(fresh, sparsity=0.75, seed=1, backend="compressed", tile=TILE)  # another mask: resized on load
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=False)
    idx = torch.randint(0, 128, (2, 16))
    assert torch.equal(fresh(idx)[0], model(idx)[0])


def test_densified_weights_are_contiguous_and_own_their_storage():
    # 96 x 32 weights with 64 x 64 tiles: a cropped view of the padded tiles would be non-contiguous
    model = spdf.GPT.from_name("tiny-test")
    spdf.sparsify(model, sparsity=0.75, seed=0, backend="compressed", tile=(64, 64))
    spdf.densify(model)
    for name, p in model.named_parameters():
        assert p.is_contiguous(), name
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name


def test_sparsify_refuses_a_layer_whose_mask_keeps_nothing():
    """A layer with no non-zero has nothing to train, and its empty tensors would be missing from a run's checkpoint
    (its resume would fail): refused when the model is sparsified, the model left untouched."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 4))
    masks = {"0": torch.ones(4, 8, dtype=torch.bool), "1": torch.zeros(4, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"1\.weight: the mask keeps none of the weight's 16 entries"):
        spdf.sparsify(model, 0.5, init=masks, param_filter=["0.weight", "1.weight"], backend="compressed")
    assert all(type(m) is torch.nn.Linear for m in model)
