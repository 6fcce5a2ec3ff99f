"""Mixtures of packed corpora: the deficit order, the mixed dataset, the resumable per-rank sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spdf.data import DataError, MixedDataset, MixtureSampler
from spdf.data.mixture import DeficitSchedule, normalised_weights


class Rows(torch.utils.data.Dataset):
    """`n` rows of seq_len + 1 tokens, each filled with its own id: rows of different sources never collide."""

    def __init__(self, n: int, base: int, seq_len: int = 4):
        self.n, self.base, self.seq_len = n, base, seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.full((self.seq_len + 1,), self.base + i)


def mixed(weights=None, sizes=(50, 13, 7)) -> MixedDataset:
    names = ("code", "text", "math")[:len(sizes)]
    weights = weights or dict(zip(names, (0.6, 0.3, 0.1)))
    return MixedDataset({name: Rows(n, 1000 * (k + 1)) for k, (name, n) in enumerate(zip(names, sizes))}, weights)


@pytest.mark.parametrize("weights", [{"code": 0.7, "text": 0.3}, {"a": 0.95, "b": 0.05}, {"a": 1, "b": 1, "c": 5},
                                     {"only": 2.0}])
def test_deficit_order_keeps_every_prefix_within_one_row_of_the_weights(weights):
    schedule = DeficitSchedule(weights)
    shares = normalised_weights(weights)
    for n in range(1, 2001):
        schedule.next()
        for name, share in shares.items():
            assert abs(schedule.rows[name] - share * n) < 1, (n, name, schedule.rows)


def test_deficit_order_is_a_pure_function_of_the_weights_and_resumes_from_the_counts():
    full = DeficitSchedule({"code": 0.7, "text": 0.3})
    order = [full.next() for _ in range(100)]
    again = DeficitSchedule({"code": 7, "text": 3})  # relative weights: the same shares
    assert [again.next() for _ in range(100)] == order
    head = DeficitSchedule({"code": 0.7, "text": 0.3})
    [head.next() for _ in range(37)]
    resumed = DeficitSchedule({"code": 0.7, "text": 0.3}, rows=head.rows)
    assert [resumed.next() for _ in range(63)] == order[37:]


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), True, "0.5"])
def test_weights_must_be_positive_finite_numbers(bad):
    with pytest.raises(DataError, match="mixture weight of source 'text' must be a positive number"):
        normalised_weights({"code": 1.0, "text": bad})


def test_mixed_dataset_reads_each_source_through_its_offset():
    data = mixed()
    assert len(data) == 70 and data.seq_len == 4
    assert data.locate(0) == ("code", 0) and data.locate(49) == ("code", 49)
    assert data.locate(50) == ("text", 0) and data.locate(69) == ("math", 6)
    assert int(data[55][0]) == 2005
    with pytest.raises(IndexError):
        data[70]


def test_mixed_dataset_refuses_mismatched_parts():
    with pytest.raises(DataError, match="different lengths"):
        MixedDataset({"a": Rows(5, 0, seq_len=4), "b": Rows(5, 0, seq_len=8)}, {"a": 1, "b": 1})
    with pytest.raises(DataError, match="'b' has no rows"):
        MixedDataset({"a": Rows(5, 0), "b": Rows(0, 0)}, {"a": 1, "b": 1})


def test_interleaved_validation_slice_follows_the_weights_until_a_source_runs_out():
    data = mixed(sizes=(50, 13, 7))
    first = [data.locate(i) for i in data.interleaved(20)]
    counts = {name: sum(1 for n, _ in first if n == name) for name in data.names}
    assert counts == {"code": 12, "text": 6, "math": 2}
    for name in data.names:  # each source's rows in their own order, from the first
        assert [row for n, row in first if n == name] == list(range(counts[name]))
    everything = data.interleaved(1000)
    assert sorted(everything) == list(range(len(data)))  # every row once, then it stops


def _drawn(sampler: MixtureSampler, n: int) -> list[int]:
    return [sampler.draw() for _ in range(n)]


def test_sampler_draws_token_shares_and_resumes_exactly_from_its_state():
    data = mixed()
    sampler = MixtureSampler(data, seed=3)
    head = _drawn(sampler, 123)
    state = sampler.state_dict()
    tail = _drawn(sampler, 300)  # crosses several epochs of the small sources
    resumed = MixtureSampler(data, seed=3)
    resumed.load_state_dict(state)
    assert _drawn(resumed, 300) == tail
    assert _drawn(MixtureSampler(data, seed=3), 423) == head + tail
    rows = sampler.rows_by_source()
    assert sum(rows.values()) == 423
    for name, share in data.weights.items():
        assert abs(rows[name] - share * 423) < 1
    assert _drawn(MixtureSampler(data, seed=4), 123) != head


def test_ranks_take_turns_in_the_global_order_of_one_process():
    data = mixed(sizes=(40, 10), weights={"code": 0.8, "text": 0.2})
    one = _drawn(MixtureSampler(data, seed=0), 100)
    ranks = [MixtureSampler(data, seed=0, rank=rank, world_size=2) for rank in range(2)]
    drawn = [_drawn(sampler, 50) for sampler in ranks]
    assert [row for pair in zip(*drawn) for row in pair] == one  # global row g is rank g % 2's
    for sampler in ranks:  # the counts are global, the same on every rank
        assert sampler.rows_by_source() == {"code": 80, "text": 20}
    for name, n in (("code", 40), ("text", 10)):  # an epoch of a source draws each of its rows once, whichever rank
        rows = [data.locate(i)[1] for i in one if data.locate(i)[0] == name]
        assert sorted(rows[:n]) == sorted(rows[n:2 * n]) == list(range(n))


def test_sampler_refuses_a_state_written_with_other_weights():
    state = MixtureSampler(mixed(), seed=0).state_dict()
    other = MixtureSampler(mixed(weights={"code": 0.5, "text": 0.3, "math": 0.2}), seed=0)
    with pytest.raises(DataError, match="resume with the same mixture"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="single-source phase"):
        other.load_state_dict({"epoch": 0, "offset": 3, "seed": 0, "world_size": 1, "shuffle": True})


def test_two_sources_never_share_a_permutation():
    data = MixedDataset({"a": Rows(100, 0), "b": Rows(100, 0)}, {"a": 1, "b": 1})
    drawn = [data.locate(i) for i in _drawn(MixtureSampler(data, seed=0), 200)]
    a, b = ([row for name, row in drawn if name == s] for s in "ab")
    assert sorted(a) == sorted(b) == list(range(100)) and a != b
    assert math.isclose(np.corrcoef(a, b)[0, 1], 0, abs_tol=0.4)
