"""Unit tests of the training engine's parts: LR schedule, AdamW parameter groups, batch source, metrics log."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import spdf
from spdf.data import Example, FinetuneDataset, PackedDataset
from spdf.train.batches import BatchSource
from spdf.train.metrics import MetricsLog
from spdf.train.optim import build_adamw, param_groups
from spdf.train.schedule import lr_factor


# ---- spdf.train.schedule.lr_factor -------------------------------------------------------------------------------
def test_warmup_is_linear_from_one_step_up_to_the_peak():
    factors = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(10)]
    assert factors == pytest.approx([(s + 1) / 10 for s in range(10)], abs=1e-15)
    assert factors[0] == pytest.approx(0.1)  # small, not zero: step 0 already learns
    assert factors[-1] == 1.0  # the last warm-up step is at the peak
    assert lr_factor(10, 100, 10, "cosine", 0.1) == 1.0  # and decay starts from the peak


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_runs_from_the_peak_down_to_min_lr_ratio(decay):
    total, warmup, floor = 100, 10, 0.1
    f = [lr_factor(s, total, warmup, decay, floor) for s in range(total + 5)]
    after = f[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:])), "not monotone after warm-up"
    assert after[0] == 1.0
    assert f[total] == pytest.approx(floor, abs=1e-15)  # the floor is reached at total_steps ...
    assert f[total + 4] == pytest.approx(floor, abs=1e-15)  # ... and held after it
    assert f[total - 1] > floor  # the last optimizer step (0-based total-1) is just above it
    assert min(f) >= floor - 1e-15
    # half-way through the decay: the mean of peak and floor (cosine and linear agree there)
    assert lr_factor(warmup + 45, total, warmup, decay, floor) == pytest.approx((1 + floor) / 2, abs=1e-12)


def test_cosine_shape():
    total, warmup, floor = 50, 5, 0.2
    for s in range(warmup, total + 1):
        progress = (s - warmup) / (total - warmup)
        expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_factor(s, total, warmup, "cosine", floor) == pytest.approx(expected, abs=1e-12), s
    # a quarter of the way the cosine is still at (1 + cos(pi/4)) / 2 of the span, above the linear decay's 3/4
    assert lr_factor(15, 45, 5, "cosine", 0.0) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert lr_factor(15, 45, 5, "linear", 0.0) == pytest.approx(0.75)


def test_linear_decay_has_equal_steps():
    f = [lr_factor(s, 20, 4, "linear", 0.0) for s in range(4, 21)]
    diffs = np.diff(f)
    assert diffs == pytest.approx(np.full(16, -1 / 16), abs=1e-12)
    assert f[-1] == pytest.approx(0.0, abs=1e-15)


def test_constant_decay_stays_at_the_peak_after_warmup():
    assert [lr_factor(s, 10, 2, "constant", 0.1) for s in range(12)] == [0.5, 1.0] + [1.0] * 10


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, 10, 0, "cosine", 0.0) == 1.0
    assert lr_factor(0, 10, 0, "linear", 0.3) == 1.0
    assert lr_factor(10, 10, 0, "cosine", 0.3) == pytest.approx(0.3)


def test_warmup_as_long_as_the_phase_does_not_divide_by_zero():
    assert [lr_factor(s, 4, 4, "cosine", 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 4, "cosine", 0.1) == pytest.approx(1.0)  # progress 0 at the (unused) step after
    assert lr_factor(5, 4, 4, "cosine", 0.1) == pytest.approx(0.1)


def test_unknown_decay_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'exp'.*cosine, linear, constant"):
        lr_factor(50, 100, 10, "exp", 0.0)


# ---- spdf.train.optim --------------------------------------------------------------------------------------------
def _group_names(model, groups) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_param_groups_decay_matrices_only_and_hold_every_parameter_once():
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny-test")
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # the tied lm_head.weight counted once
    decay, no_decay = _group_names(model, groups)
    # matrices decay, the embeddings included (they are matrices too; nanoGPT's convention)
    assert "transformer.wte.weight" in decay and "transformer.wpe.weight" in decay
    for name in decay:
        assert name.endswith(".weight") and "ln_" not in name, name
    assert {n for n in decay if ".h.0." in n} == {f"transformer.h.0.{m}.weight" for m in
                                                  ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    # biases and norm gains do not
    assert all(n.endswith(".bias") or ".ln_" in n for n in no_decay), no_decay
    assert "transformer.ln_f.weight" in no_decay and "transformer.h.1.ln_2.bias" in no_decay
    assert "transformer.h.1.mlp.c_fc.bias" in no_decay
    assert len(decay) == 2 + 2 * 4 and len(no_decay) == 2 + 2 * 8


def test_param_groups_skip_frozen_parameters_and_mask_buffers():
    torch.manual_seed(0)
    model = spdf.GPT.from_name("tiny-test")
    spdf.sparsify(model, sparsity=0.75, seed=0)
    model.transformer.wpe.weight.requires_grad_(False)
    decay, no_decay = _group_names(model, param_groups(model, 0.1))
    assert "transformer.wpe.weight" not in decay | no_decay
    assert not any("mask" in n for n in decay | no_decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay


def test_build_adamw_settings():
    model = spdf.GPT.from_name("tiny-test")
    opt = build_adamw(model, lr=3e-4, betas=[0.9, 0.95], eps=1e-7, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-7
        assert g["fused"] is True  # CPU parameters: torch's fused kernel (see optim.py for why)


def test_a_non_contiguous_parameter_gets_the_foreach_path():
    model = spdf.GPT.from_name("tiny-test")
    layer = model.transformer.h[0].mlp.c_fc
    layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous().t())  # same values, column-major
    opt = build_adamw(model, lr=3e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    assert not any(g["fused"] for g in opt.param_groups)


def test_fused_adamw_keeps_a_sparse_model_exactly_sparse():
    model = spdf.GPT.from_name("tiny-test")
    sp = spdf.sparsify(model, sparsity=0.75, seed=0)
    opt = build_adamw(model, lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    sp.attach(opt)
    idx = torch.randint(0, model.config.vocab_size, (2, 17))
    for _ in range(3):
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for layer in sp.layers.values():
        dropped = ~layer.weight_mask
        assert torch.count_nonzero(layer.weight[dropped]) == 0
        assert all(torch.count_nonzero(v[dropped]) == 0 for v in opt.state[layer.weight].values()
                   if v.shape == layer.weight.shape)
        assert torch.count_nonzero(layer.weight[layer.weight_mask]) == layer.weight_mask.sum()


# ---- spdf.train.batches.BatchSource ------------------------------------------------------------------------------
SEQ = 8


@pytest.fixture
def packed(tmp_path):
    """A packed split of 23 rows whose tokens are 0, 1, 2, …: row i starts with token i·SEQ."""
    def make(name: str, rows: int) -> PackedDataset:
        path = tmp_path / f"{name}.bin"
        np.arange(rows * SEQ + 1, dtype=np.uint16).tofile(path)
        return PackedDataset(path, SEQ)
    return make("train", 23), make("val", 5)


def _rows(steps) -> list[list[int]]:
    """Row numbers of each step's micro-batches, from their first tokens."""
    return [[int(t) // SEQ for idx, _ in step for t in idx[:, 0]] for step in steps]


def _draw(source, n, accum=2, micro=3):
    return [source.next_step(accum, micro) for _ in range(n)]


def test_packed_batches_are_inputs_and_shifted_targets(packed):
    train, val = packed
    (step,) = _draw(BatchSource(train, val, seed=0, rank=0, world_size=1), 1)
    assert len(step) == 2
    for idx, targets in step:
        assert idx.shape == targets.shape == (3, SEQ) and idx.dtype == torch.long
        assert torch.equal(targets, idx + 1)  # the token stream is 0, 1, 2, …


def test_batch_order_is_deterministic_and_covers_each_epoch(packed):
    train, val = packed
    a = _rows(_draw(BatchSource(train, val, seed=7, rank=0, world_size=1), 8))  # 48 rows: two epochs and a bit
    b = _rows(_draw(BatchSource(train, val, seed=7, rank=0, world_size=1), 8))
    c = _rows(_draw(BatchSource(train, val, seed=8, rank=0, world_size=1), 8))
    assert a == b and a != c
    flat = [r for step in a for r in step]
    assert sorted(flat[:23]) == list(range(23)) and sorted(flat[23:46]) == list(range(23))
    assert flat[:23] != flat[23:46]  # a new permutation each epoch
    assert flat[:23] != list(range(23))  # shuffled


def test_ranks_get_disjoint_equal_shares(packed):
    train, val = packed
    shares = [[r for step in _rows(_draw(BatchSource(train, val, seed=3, rank=k, world_size=2), 1, 1, 11))
               for r in step] for k in range(2)]
    assert len(shares[0]) == len(shares[1]) == 11 and not set(shares[0]) & set(shares[1])
    assert len(set(shares[0]) | set(shares[1])) == 22  # 23 rows cut to a multiple of the world size


@pytest.mark.parametrize("drawn", [0, 1, 3, 4, 7])  # 4 steps · 6 rows = 24: just past the first epoch's end
def test_state_dict_resumes_to_the_same_next_batches(packed, drawn):
    train, val = packed
    source = BatchSource(train, val, seed=5, rank=0, world_size=1)
    _draw(source, drawn)
    state = json.loads(json.dumps(source.state_dict()))  # what a checkpoint keeps survives serialization
    expected = _draw(source, 6)
    resumed = BatchSource(train, val, seed=5, rank=0, world_size=1)
    _draw(resumed, 2)  # its own position is replaced by the loaded one
    resumed.load_state_dict(copy.deepcopy(state))
    got = _draw(resumed, 6)
    assert _rows(got) == _rows(expected)
    for s_got, s_exp in zip(got, expected):
        for (i1, t1), (i2, t2) in zip(s_got, s_exp):
            assert torch.equal(i1, i2) and torch.equal(t1, t2)


def test_state_at_an_exact_epoch_end_moves_to_the_next_epoch(packed):
    train, val = packed
    source = BatchSource(train, val, seed=1, rank=0, world_size=1)
    first_epoch = _rows(_draw(source, 1, 1, 23))[0]
    state = source.state_dict()
    assert state["epoch"] == 0 and state["offset"] == 23
    after = _rows(_draw(source, 1, 1, 23))[0]
    resumed = BatchSource(train, val, seed=1, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert _rows(_draw(resumed, 1, 1, 23))[0] == after
    assert sorted(after) == list(range(23)) and after != first_epoch


def test_val_batches_are_a_fixed_slice(packed):
    train, val = packed
    source = BatchSource(train, val, seed=0, rank=0, world_size=1)
    _draw(source, 3)  # training draws do not move validation
    batches = list(source.val_batches(2, batch_size=2))
    assert [int(t) // SEQ for idx, _ in batches for t in idx[:, 0]] == [0, 1, 2, 3]
    assert [x[0].shape[0] for x in source.val_batches(10, batch_size=2)] == [2, 2, 1]  # all 5, last one short
    rank1 = BatchSource(train, val, seed=0, rank=1, world_size=2)
    assert [int(t) // SEQ for idx, _ in rank1.val_batches(1, batch_size=8) for t in idx[:, 0]] == [1, 3]


class _CharTokenizer:
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_finetune_batches_pad_and_mask_the_prompt():
    nl, a, b, c, d, w, x, y, z = map(ord, "\nabcdwxyz")
    rows = FinetuneDataset([Example("ab\n", "cd"), Example("xyz\n", "w")], _CharTokenizer(), 16)
    (idx, targets), = BatchSource(rows, rows, seed=0, rank=0, world_size=1, pad_id=99).val_batches(1, batch_size=2)
    # row = prompt + completion + eos (0); inputs drop its last id, targets its first; the prompt is not a target
    assert idx.tolist() == [[a, b, nl, c, d], [x, y, z, nl, w]]
    assert targets.tolist() == [[-100, -100, c, d, 0], [-100, -100, -100, w, 0]]
    # a shorter row is padded with pad_id in the inputs and -100 in the targets
    rows = FinetuneDataset([Example("ab\n", "cd"), Example("a\n", "b")], _CharTokenizer(), 16)
    (idx, targets), = BatchSource(rows, rows, seed=0, rank=0, world_size=1, pad_id=99).val_batches(1, batch_size=2)
    assert idx.tolist() == [[a, b, nl, c, d], [a, nl, b, 0, 99]]
    assert targets.tolist() == [[-100, -100, c, d, 0], [-100, b, 0, -100, -100]]


def test_unsupported_dataset_type_is_refused():
    with pytest.raises(TypeError, match="list"):
        BatchSource([1, 2, 3], [1], seed=0, rank=0, world_size=1)


# ---- spdf.train.metrics.MetricsLog -------------------------------------------------------------------------------
def _records(phases_steps) -> list[dict]:
    return [{"phase": phase, "step": step, "loss": float(step)} for phase, steps in phases_steps for step in steps]


@pytest.fixture
def log(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    for r in _records([("pretrain", [0, 1, 2, 3, 4]), ("finetune", [0, 1, 2])]):
        log.write(r)
    return log


def _keys(log) -> list[tuple]:
    return [(r["phase"], r["step"]) for r in log.read()]


def test_write_appends_sorted_json_lines(log):
    lines = log.path.read_text().splitlines()
    assert len(lines) == 8 and lines[0] == '{"loss": 0.0, "phase": "pretrain", "step": 0}'
    assert _keys(log)[-1] == ("finetune", 2)


def test_rewind_drops_the_phase_after_step_and_later_phases(log):
    log.rewind("pretrain", 2, later_phases=["finetune"])
    assert _keys(log) == [("pretrain", 0), ("pretrain", 1), ("pretrain", 2)]


def test_rewind_keeps_earlier_phases_and_unlisted_ones(log):
    log.rewind("finetune", 1)
    assert _keys(log) == [("pretrain", s) for s in range(5)] + [("finetune", 0), ("finetune", 1)]


def test_rewind_to_minus_one_drops_the_whole_phase(log):
    log.rewind("finetune", -1)
    assert _keys(log) == [("pretrain", s) for s in range(5)]
    log.rewind("pretrain", -1, later_phases=["finetune"])
    assert _keys(log) == [] and log.path.read_text() == ""


def test_rewind_drops_a_line_cut_short_by_a_kill(log):
    with open(log.path, "a") as f:
        f.write('{"loss": 1.5, "phase": "fine')  # no newline: the process died mid-write
    assert len(log.read()) == 8  # read() already skips it
    log.rewind("finetune", 2)
    text = log.path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 8
    assert all(json.loads(line) for line in text.splitlines())
    log.write({"phase": "finetune", "step": 3})  # the next record starts on a line of its own
    assert _keys(log)[-1] == ("finetune", 3)


def test_rewind_replaces_the_file_atomically(log):
    before = log.path.read_text()
    with open(log.path) as reader:  # a reader holding the old file sees it whole: it was replaced, not rewritten
        log.rewind("pretrain", 0, later_phases=["finetune"])
        assert reader.read() == before
    assert _keys(log) == [("pretrain", 0)]
    assert [p.name for p in log.path.parent.iterdir()] == ["metrics.jsonl"]  # no temp file left


def test_rewind_without_a_file_or_disabled_does_nothing(tmp_path, log):
    missing = MetricsLog(tmp_path / "none" / "metrics.jsonl")
    missing.rewind("pretrain", 0)
    assert not missing.path.exists() and missing.read() == []
    before = log.path.read_bytes()
    MetricsLog(log.path, enabled=False).rewind("pretrain", -1, later_phases=["finetune"])
    MetricsLog(log.path, enabled=False).write({"phase": "x", "step": 1})
    assert log.path.read_bytes() == before


def test_data_identity_compares_content_only_where_both_sides_know_it():
    """A cache entry of an older spdf records no checksums: the same corpus rebuilt (with them) is the same data by
    its size, while two known contents must agree."""
    from spdf.train.batches import same_data

    old, new = {"tokens": 10, "content": None}, {"tokens": 10, "content": "a"}
    assert same_data(old, new) and same_data(new, old)
    assert not same_data({"tokens": 10, "content": "b"}, new) and not same_data({"tokens": 11, "content": None}, new)
    assert same_data({"parts": {"code": old}}, {"parts": {"code": new}})
    assert not same_data({"parts": {"code": old}}, {"parts": {"text": new}})
    assert same_data({"rows": "r"}, {"rows": "r"}) and not same_data({"rows": "r"}, {"rows": "s"})
