"""The compiled Triton kernels and both backends on a CUDA GPU (skipped elsewhere).

Run on a GPU machine with the interpreter off, e.g. `TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_cuda.py`
(benchmarks/gpu_check.sh does). The CPU suite checks the same kernels through Triton's interpreter; this file checks
what only a GPU can: compiled code, tensor-core dots in bf16/fp16/tf32, GPT-3-sized layers, and a training step.
"""
import copy

import pytest
import torch

import spdf
from spdf.kernels import pack, reference, sddmm, spmm, spmm_t
from spdf.kernels.ops import HAS_TRITON, triton_interpreted

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON and not triton_interpreted()),
    reason="needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset or 0)")

DEVICE = "cuda"


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max error relative to the largest expected magnitude: long fp32 accumulations of rounded inputs differ
    from the reference only by accumulation order and the output's rounding."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:  # an all-empty layer: no stored values, so an empty gradient is the right answer
        return
    scale = expected.float().abs().max().clamp(min=1.0)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"max error {err.item():.3g} > {rel} x {scale.item():.3g}"


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 2e-3)])
@pytest.mark.parametrize("pattern", ["unstructured", "block"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("tokens", [1, 64, 1000])
@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072), (200, 136)])
def test_compiled_products_match_reference(shape, tokens, sparsity, pattern, dtype, rel, make_mask):
    tile = (64, 64)
    g = torch.Generator().manual_seed(0)
    mask = make_mask(shape, sparsity, pattern, block=tile[0])
    layout, values = pack(torch.randn(shape, generator=g).to(dtype), mask, tile)
    layout, values = layout.to(DEVICE), values.to(DEVICE)
    x = torch.randn(tokens, shape[1], generator=g).to(DEVICE, dtype)
    dy = torch.randn(tokens, shape[0], generator=g).to(DEVICE, dtype)
    bias = torch.randn(shape[0], generator=g).to(DEVICE, dtype)
    vf = values.float()
    _close(spmm(x, values, layout, bias, impl="triton"), reference.spmm(x.float(), vf, layout, bias.float()), rel)
    _close(spmm_t(dy, values, layout, impl="triton"), reference.spmm_t(dy.float(), vf, layout), rel)
    dv = sddmm(dy, x, layout, impl="triton")
    assert dv.shape == values.shape and dv.dtype == dtype
    _close(dv, reference.sddmm(dy.float(), x.float(), layout), rel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_empty_layer_gives_bias_and_zeros(dtype):
    """Sparsity 1.0 (no stored tile): Y is the bias alone, dX zeros, dW an empty values gradient -- as on CPU."""
    layout, values = pack(torch.randn(200, 136).to(dtype), torch.zeros(200, 136, dtype=torch.bool), (64, 64))
    layout, values = layout.to(DEVICE), values.to(DEVICE)
    x, dy = torch.randn(5, 136, device=DEVICE, dtype=dtype), torch.randn(5, 200, device=DEVICE, dtype=dtype)
    bias = torch.randn(200, device=DEVICE, dtype=dtype)
    assert torch.equal(spmm(x, values, layout, bias, impl="triton"), bias.expand(5, 200))
    assert torch.equal(spmm(x, values, layout, None, impl="triton"), torch.zeros(5, 200, device=DEVICE, dtype=dtype))
    assert torch.equal(spmm_t(dy, values, layout, impl="triton"), torch.zeros(5, 136, device=DEVICE, dtype=dtype))
    dv = sddmm(dy, x, layout, impl="triton")
    assert dv.shape == (0,) and dv.dtype == dtype and dv.device.type == "cuda"


def _train(backend: str, steps: int = 10) -> list[float]:
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny").to(DEVICE)
    sp = spdf.sparsify(model, sparsity=0.75, seed=0, backend=backend, tile=(64, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    sp.attach(opt)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (8, 129), generator=g).to(DEVICE)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if backend == "masked":
        for layer in sp.layers.values():
            assert torch.count_nonzero(layer.weight[~layer.weight_mask]) == 0
    return losses


def test_compressed_backend_trains_like_masked_on_gpu_in_bf16():
    masked, compressed = _train("masked"), _train("compressed")
    assert masked[-1] < masked[0]
    # bf16 autocast: the two backends round at different places, so agreement is looser than on CPU in fp32
    for a, b in zip(masked, compressed):
        assert abs(a - b) <= 2e-2 * abs(a), (masked, compressed)


def test_densify_after_gpu_training_is_bit_identical():
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny").to(DEVICE).eval()
    spdf.sparsify(model, sparsity=0.75, seed=0)
    idx = torch.randint(0, model.config.vocab_size, (2, 64), device=DEVICE)
    before = model(idx)[0]
    dense = spdf.densify(copy.deepcopy(model))
    assert torch.equal(dense(idx)[0], before)
