"""The coordinate check as a test: after a few Adam steps at a fixed LR, every layer's activation scale is nearly
the same across widths under µP (8x wider) and across sparsity under SµPar (dense to 87.5% sparse), while the
standard parametrization -- and µP that ignores the density -- drift by several times.

Measured spreads (largest / smallest RMS across the runs, at step 4; benchmarks/results/coord_check.md):
widths 64..512 -- µP at most 1.38 (the logits, whose init scale shrinks as 1/sqrt(width) under µP), SP 5.1 to 121;
sparsity 0..87.5% at width 128 -- SµPar at most 1.58, SP 3.5 to 59, µP 2.8 to 7.9 on the sparse layers' outputs.
The same check runs on each model family's tiny shape (gpt's and llama's: µP and SµPar come from the family's hidden
weights, spdf.model.families)."""
from __future__ import annotations

import pytest

from spdf.model.families import FAMILIES, family_of_shape
from spdf.train.coord_check import small_model_rms, spread

STEP = 4  # the fifth forward pass: four Adam updates in
FACTOR = 2.0
SHAPES = tuple(f"{f.default_shape}-test" for f in FAMILIES.values())  # each family's test shape (tiny-test, ...)


@pytest.fixture(scope="module", params=SHAPES)
def shape(request):
    return request.param


@pytest.fixture(scope="module")
def across_widths(shape):
    return {p: spread([small_model_rms(p, width, shape=shape) for width in (64, 128, 256, 512)], STEP)
            for p in ("sp", "mup")}


@pytest.fixture(scope="module")
def across_sparsity(shape):
    return {p: spread([small_model_rms(p, 128, s, shape=shape) for s in (0.0, 0.5, 0.75, 0.875)], STEP)
            for p in ("sp", "mup", "supar")}


def test_mup_is_flat_across_widths(across_widths):
    assert max(across_widths["mup"].values()) < FACTOR, across_widths["mup"]


def test_sp_drifts_across_widths(across_widths):
    # every layer but the embedding, whose Adam update does not depend on the width under either parametrization
    drifting = {k: v for k, v in across_widths["sp"].items() if k != "embedding"}
    assert min(drifting.values()) > FACTOR, across_widths["sp"]


def test_supar_is_flat_across_sparsity(across_sparsity):
    assert max(across_sparsity["supar"].values()) < FACTOR, across_sparsity["supar"]


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
def test_density_blind_parametrizations_drift_across_sparsity(across_sparsity, parametrization, shape):
    family = family_of_shape(shape)  # the layers the masks act on: the family's default filter, 2 blocks
    sparse = {k: v for k, v in across_sparsity[parametrization].items() if k.endswith(family.hidden_weights)}
    assert len(sparse) == 2 * len(family.hidden_weights) and min(sparse.values()) > FACTOR, sparse
