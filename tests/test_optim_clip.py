"""Fused clipping (clip_grad_norm=) and non-finite skipping (skip_nonfinite=) of the optimizer classes."""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt
from fastopt.specs import REGISTRY

SPECS = list(REGISTRY.values())
LR = {"sgd": 0.05, "adagrad": 0.05, "rmsprop": 0.005, "lion": 1e-3}


def make_params(rng, dtype_mix=True):
    shapes = [(17,), (6, 5), (2, 3, 4), (300,)]
    dtypes = [np.float32, np.float64, np.float32, np.float64] if dtype_mix else [np.float64] * 4
    return [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]


def make_opt(spec, params, **options):
    cls = getattr(fastopt, spec.class_name)
    extra = {"momentum": 0.9} if spec.name in ("sgd", "rmsprop") else {}
    return cls([{"params": params[:2]}, {"params": params[2:], **extra}], lr=LR.get(spec.name, 1e-2), **options)


def grads_like(rng, params, scale=1.0):
    return [(scale * rng.standard_normal(p.shape)).astype(p.dtype) for p in params]


def total_norm(grads):
    return math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_fused_clipping_equals_clip_then_step(spec, rng):
    params = make_params(rng)
    fused = make_opt(spec, [p.copy() for p in params], clip_grad_norm=1.0)
    plain = make_opt(spec, [p.copy() for p in params])
    clipped_steps = 0
    for t in range(12):
        # every scale comes up (a random choice left all 12 steps clipped in ~1% of runs)
        grads = grads_like(rng, params, scale=(0.01, 1.0, 5.0)[t % 3])
        norm = total_norm(grads)
        clipped_steps += norm > 1.0
        fused.step(grads)
        # the unfused path: clip a copy of the gradients in place, then step (one call per dtype,
        # with the coefficient of the norm over all of them)
        coef = fastopt.clip.clip_coefficient(norm, 1.0)
        clipped = [g * np.asarray(coef, dtype=g.dtype) if coef != 1.0 else g.copy() for g in grads]
        plain.step(clipped)
    assert 0 < clipped_steps < 12
    for a, b in zip(fused.params, plain.params):
        tol = 2e-6 if a.dtype == np.float32 else 1e-13
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_fused_clipping_bitwise_against_functional_grad_scale(rng):
    """The class passes exactly min(1, max_norm / (norm + 1e-6)) as grad_scale."""
    params = make_params(rng, dtype_mix=False)
    opt = fastopt.Adam([p.copy() for p in params], lr=0.01, clip_grad_norm=0.5)
    want = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, 6):
        grads = grads_like(rng, params)
        opt.step(grads)
        total = float(fastopt.global_norm(grads))
        fastopt.adam_step(want, grads, m, v, step=t, lr=0.01, grad_scale=fastopt.clip.clip_coefficient(total, 0.5))
    for a, b in zip(opt.params, want):
        np.testing.assert_array_equal(a, b)


def test_clipping_does_not_modify_the_gradients(rng):
    params = make_params(rng)
    opt = fastopt.AdamW([p.copy() for p in params], clip_grad_norm=0.1)
    grads = grads_like(rng, params, scale=10.0)
    before = [g.copy() for g in grads]
    opt.step(grads)
    for g, b in zip(grads, before):
        assert g.tobytes() == b.tobytes()


def snapshot(opt):
    out = [p.copy() for p in opt.params]
    for i in range(len(opt.params)):
        out += [s.copy() for s in opt.state_arrays(i).values()]
    return out


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_skip_nonfinite_leaves_everything_byte_identical(spec, clip, rng):
    params = make_params(rng)
    opt = make_opt(spec, [p.copy() for p in params], skip_nonfinite=True, clip_grad_norm=clip)
    twin = make_opt(spec, [p.copy() for p in params], clip_grad_norm=clip)  # never sees the bad steps
    for _ in range(3):
        grads = grads_like(rng, params)
        opt.step(grads)
        twin.step(grads)
    for bad_value in (np.nan, np.inf, -np.inf):
        grads = grads_like(rng, params)
        i = int(rng.integers(len(grads)))
        grads[i].flat[int(rng.integers(grads[i].size))] = bad_value
        before = snapshot(opt)
        assert opt.step(grads) is False
        after = snapshot(opt)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(after, before))
    assert opt.skipped_steps == 3
    assert opt.steps(0) == opt.steps(1) == 3
    grads = grads_like(rng, params)
    assert opt.step(grads) is True
    twin.step(grads)
    for a, b in zip(opt.params, twin.params):
        np.testing.assert_array_equal(a, b)


def test_without_skip_nonfinite_nan_propagates_like_torch(rng):
    params = make_params(rng, dtype_mix=False)
    opt = fastopt.Adam([p.copy() for p in params], lr=0.01)
    grads = grads_like(rng, params)
    grads[0][3] = np.nan
    assert opt.step(grads) is True
    assert np.isnan(opt.params[0][3]) and np.isfinite(opt.params[0][4])
    clipped = fastopt.Adam([p.copy() for p in params], lr=0.01, clip_grad_norm=1.0)
    clipped.step(grads)  # a NaN norm gives a NaN coefficient (torch.clamp semantics): every param NaN
    assert all(np.isnan(p).all() for p in clipped.params)


def test_overflowing_squares_count_as_nonfinite(rng):
    p = rng.standard_normal(4)
    opt = fastopt.Adam([p], skip_nonfinite=True)
    assert opt.step([np.array([1e200, 0.0, 0.0, 0.0])]) is False
    assert opt.skipped_steps == 1


def test_clip_and_skip_read_the_gradients_once(monkeypatch, rng):
    """One sum-of-squares pass per kernel call (group x dtype) serves both options."""
    from fastopt.backends import cython_backend
    calls = []
    real = cython_backend.sumsq_per_tensor
    monkeypatch.setattr(cython_backend, "sumsq_per_tensor", lambda g: calls.append(len(g)) or real(g))
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params], skip_nonfinite=True, clip_grad_norm=1.0)
    opt.step(grads_like(rng, params))
    assert sorted(calls) == [1, 1, 1, 1]  # groups {f32, f64} x {f32, f64}: four kernel calls, four passes
    calls.clear()
    opt2 = fastopt.Adam([p.copy() for p in params if p.dtype == np.float64], clip_grad_norm=1.0,
                        skip_nonfinite=True)
    opt2.step(grads_like(rng, opt2.params))
    assert calls == [2]


def test_skip_state_survives_checkpoint(tmp_path, rng):
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params], skip_nonfinite=True)
    grads = grads_like(rng, params)
    grads[1][0, 0] = np.inf
    opt.step(grads)
    fastopt.save(tmp_path / "c.npz", opt)
    fresh = make_opt(REGISTRY["adam"], [p.copy() for p in params], skip_nonfinite=True)
    fastopt.load(tmp_path / "c.npz", fresh)
    assert fresh.skipped_steps == 1
