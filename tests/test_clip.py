"""Clipping ops against the reference and torch.nn.utils.clip_grad_norm_."""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt
from fastopt import reference

from conftest import DTYPES, SHAPES, snapshot

BACKENDS = ["cython", "numpy"]


def _grads(rng, dtype, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_global_norm(dtype, backend, rng):
    gs = _grads(rng, dtype)
    want = reference.global_norm(gs)
    got = fastopt.global_norm(gs, backend=backend)
    assert isinstance(got, np.float64)
    assert got == pytest.approx(want, rel=1e-13)  # float64 sums, different order
    assert fastopt.global_norm(gs[3], backend=backend) == pytest.approx(math.sqrt(reference.sumsq(gs[3])), rel=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_by_global_norm(dtype, backend, max_norm, rng):
    gs = _grads(rng, dtype)
    ref = [g.copy() for g in gs]
    total = fastopt.clip_by_global_norm(gs, max_norm, backend=backend)
    ref_total = reference.clip_by_global_norm(ref, max_norm)
    assert total == pytest.approx(ref_total, rel=1e-13)
    # the norm is summed in another order than the reference's, so the coefficient can differ in its
    # last bits; with the rounding of g * coef the scaled gradients can differ by a few ulp (2 was flaky)
    for a, b in zip(gs, ref):
        np.testing.assert_allclose(a, b, rtol=4 * np.finfo(dtype).eps, atol=0)
    if max_norm > 1e6:  # nothing to clip: untouched
        assert all(np.array_equal(a, b) for a, b in zip(gs, ref))
    else:
        assert fastopt.global_norm(gs) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_by_norm_per_array(backend, rng):
    gs = [rng.standard_normal(100), 0.01 * rng.standard_normal(50)]
    norms = fastopt.clip_by_norm(gs, 1.0, backend=backend)
    assert len(norms) == 2 and norms[0] > 1.0 > norms[1]
    assert np.linalg.norm(gs[0]) == pytest.approx(1.0, rel=1e-5)
    assert np.linalg.norm(gs[1]) == pytest.approx(norms[1], rel=1e-14)
    g = 3 * rng.standard_normal(10)
    n = fastopt.clip_by_norm(g, 2.0, backend=backend)
    assert isinstance(n, np.float64) and np.linalg.norm(g) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_clip_by_value(dtype, backend, rng):
    gs = _grads(rng, dtype, scale=3.0)
    gs[2][0] = np.nan
    ref = [g.copy() for g in gs]
    fastopt.clip_by_value(gs, 1.5, backend=backend)
    for g in ref:
        reference.clamp_(g, 1.5)
    for a, b in zip(gs, ref):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(gs[2][0])
    assert max(float(np.nanmax(np.abs(g))) for g in gs if g.size) == pytest.approx(1.5)


def test_nonfinite_norm_propagates_like_torch(rng):
    gs = [rng.standard_normal(10), rng.standard_normal(5)]
    gs[1][2] = np.inf
    total = fastopt.clip_by_global_norm(gs, 1.0)
    assert math.isinf(total)
    assert np.all(gs[0] == 0.0) and np.isnan(gs[1][2])  # max_norm / inf = 0; inf * 0 = nan
    gs = [rng.standard_normal(10)]
    gs[0][0] = np.nan
    assert math.isnan(fastopt.clip_by_global_norm(gs, 1.0))
    assert np.all(np.isnan(gs[0]))


def test_matches_torch_clip_grad_norm(rng):
    torch = pytest.importorskip("torch")
    shapes = [(7,), (30, 3), (1,)]
    gs = [rng.standard_normal(s) for s in shapes]
    params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    for p, g in zip(params, gs):
        p.grad = torch.tensor(g)
    want = torch.nn.utils.clip_grad_norm_(params, 0.7)
    got = fastopt.clip_by_global_norm(gs, 0.7)
    assert got == pytest.approx(float(want), rel=1e-12)
    for p, g in zip(params, gs):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    g = np.ones(4)
    before = snapshot(g)
    with pytest.raises(ValueError, match="Invalid max_norm: -1.0"):
        fastopt.clip_by_global_norm([g], -1.0, backend=backend)
    with pytest.raises(ValueError, match="Invalid clip_value: nan"):
        fastopt.clip_by_value(g, float("nan"), backend=backend)
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        fastopt.clip_by_norm(g, None, backend=backend)
    with pytest.raises(TypeError, match="grads has dtype int64"):
        fastopt.clip_by_value(np.ones(3, np.int64), 1.0, backend=backend)
    ro = np.ones(3)
    ro.flags.writeable = False
    assert fastopt.global_norm(ro, backend=backend) == pytest.approx(math.sqrt(3))  # reading is fine
    with pytest.raises(ValueError, match=r"grads\[1\] is read-only"):
        fastopt.clip_by_global_norm([g, ro], 0.1, backend=backend)
    buf = np.ones(10)
    with pytest.raises(ValueError, match="shares memory"):
        fastopt.clip_by_value([buf[:6], buf[4:]], 0.5, backend=backend)
    assert snapshot(g) == before and np.all(buf == 1.0)
