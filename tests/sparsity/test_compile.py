"""torch.compile sees no graph break and no recompile from spdf's own layers, attached or not."""
import warnings

import pytest
import torch

import spdf


def _compiled_steps(model, batch, steps, attach_at=None, sp=None):
    """Train `model` compiled for `steps` steps; return (graphs compiled, graph breaks)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx, tgt = batch
    for step in range(steps):
        if step == attach_at:
            sp.attach(opt)
        compiled(idx, tgt)[1].backward()
        opt.step()
        opt.zero_grad()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return len(graphs), breaks


def test_compiled_sparse_model_compiles_like_the_dense_one(make_gpt, batch):
    dense_graphs, dense_breaks = _compiled_steps(make_gpt(), batch, steps=3)
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=0.5)
    with pytest.warns(UserWarning, match=r"attach\(optimizer\)") as record:
        # training unattached, then attached: the warning comes from the gradient hook, outside the trace
        graphs, breaks = _compiled_steps(model, batch, steps=4, attach_at=2, sp=sp)
    assert (graphs, breaks) == (dense_graphs, dense_breaks)
    assert 1 <= sum("attach" in str(w.message) for w in record) <= 8


@pytest.mark.parametrize("backend", ["masked", "compressed"])
def test_compiled_attached_training_keeps_the_zeros_and_does_not_warn(make_gpt, batch, backend):
    model = make_gpt()
    sp = spdf.sparsify(model, sparsity=0.5, backend=backend, tile=(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compiled_steps(model, batch, steps=2, attach_at=0, sp=sp) == (1, 0)  # one graph, no break
    for row in sp.stats()[:-1]:
        assert row["actual"] == row["mask_sparsity"] == 0.5, row


def test_compiled_block_backend_trains_in_one_graph_without_a_break():
    """The block backend's products go through the same custom op as the compressed backend's (its autograd, fake
    kernel and FLOP formula), so torch.compile traces it whole too."""
    torch.manual_seed(0)
    model = spdf.GPT(spdf.GPTConfig(name="block-compile", n_layer=2, n_head=2, d_model=128, d_ff=512, n_ctx=32,
                                    vocab_size=64))
    sp = spdf.sparsify(model, sparsity=0.5, init=spdf.sparsity.Block(64), backend="block")
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compiled_steps(model, (idx[:, :-1], idx[:, 1:]), steps=2, attach_at=0, sp=sp) == (1, 0)
    for row in sp.stats()[:-1]:
        assert row["actual"] == row["mask_sparsity"] == 0.5, row
