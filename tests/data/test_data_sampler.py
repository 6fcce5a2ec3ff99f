import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spdf.data import DataError, ResumableSampler

N, BATCH = 103, 4


def _loader(sampler):
    return DataLoader(TensorDataset(torch.arange(N)), batch_size=BATCH, sampler=sampler, drop_last=True)


def _batches(sampler, count):
    """`count` batches, crossing epoch boundaries the way a training loop does."""
    out = []
    while len(out) < count:
        for (batch,) in _loader(sampler):
            out.append(batch.tolist())
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("stop_after", [3, 25, 26, 40])  # mid-epoch, at / across the epoch boundary (25 per epoch)
def test_resumed_run_sees_exactly_the_uninterrupted_batches(stop_after):
    reference = _batches(ResumableSampler(N, seed=7), stop_after + 12)
    first = ResumableSampler(N, seed=7)
    consumed = _batches(first, stop_after)
    state = first.state_dict()
    resumed = ResumableSampler(N, seed=7)
    resumed.load_state_dict(state)
    assert consumed + _batches(resumed, 12) == reference


def test_epochs_are_permutations_that_differ_and_depend_only_on_seed():
    s = ResumableSampler(N, seed=1)
    e0, e1 = list(s), list(s)
    assert sorted(e0) == sorted(e1) == list(range(N)) and e0 != e1
    assert list(ResumableSampler(N, seed=1)) == e0 and list(ResumableSampler(N, seed=2)) != e0
    assert list(ResumableSampler(N, shuffle=False)) == list(range(N))
    s.set_epoch(0)
    assert list(s) == e0


def test_ranks_are_disjoint_equal_and_resume_per_rank():
    ranks = [ResumableSampler(N, seed=3, rank=r, world_size=2) for r in range(2)]
    epochs = [list(s) for s in ranks]
    assert len(epochs[0]) == len(epochs[1]) == N // 2 == len(ranks[0])
    assert not set(epochs[0]) & set(epochs[1])
    assert len(set(epochs[0]) | set(epochs[1])) == N - N % 2
    whole = ResumableSampler(N, seed=3).epoch_indices(0)
    assert epochs[0] == whole[:N - 1:2].tolist()  # same global permutation, sliced
    s = ResumableSampler(N, seed=3, rank=1, world_size=2)
    it = iter(s)
    head = [next(it) for _ in range(10)]
    t = ResumableSampler(N, seed=3, rank=1, world_size=2)
    t.load_state_dict(s.state_dict())
    assert head + list(t) == epochs[1]


def test_consumed_override_accounts_for_prefetch():
    s = ResumableSampler(N, seed=0)
    it = iter(s)
    drawn = [next(it) for _ in range(20)]  # a prefetching loader drew 20 but the model consumed 12
    t = ResumableSampler(N, seed=0)
    t.load_state_dict(s.state_dict(consumed=12))
    assert next(iter(t)) == drawn[12]


def test_draw_crosses_epochs_like_iteration_and_resumes_from_its_state():
    iterated = ResumableSampler(7, seed=2)
    expected = [i for _ in range(3) for i in iterated]  # three whole epochs, one iter() each
    drawing = ResumableSampler(7, seed=2)
    head = [drawing.draw() for _ in range(10)]
    state = drawing.state_dict()
    assert state["epoch"] == 1 and state["offset"] == 3
    resumed = ResumableSampler(7, seed=2)
    resumed.load_state_dict(state)
    assert head + [resumed.draw() for _ in range(11)] == expected


def test_sampler_errors():
    with pytest.raises(DataError, match=r"rank must be in \[0, world_size\)"):
        ResumableSampler(N, rank=2, world_size=2)
    with pytest.raises(DataError, match=r"too small for 4 data-parallel ranks"):
        ResumableSampler(3, world_size=4)
    state = ResumableSampler(N, world_size=1).state_dict()
    with pytest.raises(DataError, match=r"world_size=1 but this run has 2"):
        ResumableSampler(N, rank=0, world_size=2).load_state_dict(state)
