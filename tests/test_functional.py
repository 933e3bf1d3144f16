"""Every optimizer x every option combination x float32/float64 x single- and multi-tensor calls,
25 steps, against fastopt.reference.

Tolerances:
- Same dtype as the reference: the kernels do the reference's operations in the same order with the
  same host-side scalars and no FMA contraction (-ffp-contract=off), so results are bit-identical.
  Exception: LAMB's trust ratio comes from per-tensor norms that the kernel sums in fixed chunks
  (deterministic, but a different order than np.dot): a few ulp of the parameters.
- float32 data against a float64 reference: float32 rounds each operation to 2^-24 relative (6e-8);
  an update does ~10 operations and 25 steps accumulate, so we allow 2e-5 relative to the size of the
  values (observed maxima are around 1e-6), except on rare ill-conditioned elements (an input within
  float32 rounding of a sign change or of eps, see _assert_close_f32): at most 3 + 1e-4 of them.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import reference
from fastopt.specs import REGISTRY

from conftest import DTYPES, SHAPES, all_cases, make_problem

STEPS = 25


def _run_steps(spec, hp, params, states, grads_per_step, mode, backend="cython"):
    """mode 'multi': one call per step for the whole list; 'single': one call per array;
    'reference': fastopt.reference per array."""
    fn = getattr(fastopt, spec.function_name)
    ref = reference.STEPS[spec.name]
    for t, grads in enumerate(grads_per_step, start=1):
        kw = dict(hp)
        if spec.uses_step:
            kw["step"] = t
        if mode == "multi":
            fn(params, grads, **states, **kw, backend=backend)
        else:
            for i in range(len(params)):
                per_array = {k: v[i] for k, v in states.items()}
                if mode == "single":
                    fn(params[i], grads[i], **per_array, **kw, backend=backend)
                else:
                    ref(params[i], grads[i], **per_array, **kw)


def _copy(params, states, dtype=None):
    conv = (lambda a: a.astype(dtype)) if dtype else (lambda a: a.copy())
    return [conv(p) for p in params], {k: [conv(a) for a in v] for k, v in states.items()}


def _assert_close_f32(spec, hp, got, want, what):
    """float32 kernel vs float64 reference: close, except for rare ill-conditioned elements, where the
    float32 rounding of an input is large relative to the result (Lion's sign of a value within rounding
    of 0; RMSprop/Adam-type g / (sqrt(v) + eps) when g lies within rounding of 0 and v is tiny, so eps
    decides). Those may differ by up to a step per occurrence; the bit-exact comparison with the float32
    reference above covers every element."""
    got64 = got.astype(np.float64)
    bad = ~np.isclose(got64, want, rtol=2e-5, atol=2e-5)
    assert bad.sum() <= 3 + 1e-4 * bad.size, f"{what}: {bad.sum()} of {bad.size} elements differ"
    if spec.name == "lion":
        assert np.all(np.abs(got64 - want) <= 2 * hp["lr"] * STEPS * 1.01 + 2e-5), what


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec,hp", list(all_cases()))
def test_matches_reference(spec, hp, dtype, rng):
    params, states = make_problem(spec, hp, SHAPES, dtype, rng)
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params] for _ in range(STEPS)]

    multi_p, multi_s = _copy(params, states)
    single_p, single_s = _copy(params, states)
    ref_p, ref_s = _copy(params, states)
    _run_steps(spec, hp, multi_p, multi_s, grads, "multi")
    _run_steps(spec, hp, single_p, single_s, grads, "single")
    _run_steps(spec, hp, ref_p, ref_s, grads, "reference")

    # one multi-tensor call == one call per array, bit for bit
    for a, b in zip(multi_p + sum(multi_s.values(), []), single_p + sum(single_s.values(), [])):
        np.testing.assert_array_equal(a, b)

    # == the NumPy reference in the same dtype
    for name, got, want in [("params", multi_p, ref_p)] + [(k, multi_s[k], ref_s[k]) for k in states]:
        for i, (a, b) in enumerate(zip(got, want)):
            if spec.norms_per_tensor:
                # the trust ratio differs by a few ulp, so the update (~lr per step) does
                eps = np.finfo(dtype).eps
                np.testing.assert_allclose(a, b, rtol=4 * eps, atol=64 * eps * hp["lr"] * STEPS,
                                           err_msg=f"{name}[{i}]")
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}[{i}]")

    # float32 data: close to a float64 reference run on the same inputs
    if dtype == np.float32:
        ref64_p, ref64_s = _copy(params, states, np.float64)
        grads64 = [[g.astype(np.float64) for g in step] for step in grads]
        _run_steps(spec, hp, ref64_p, ref64_s, grads64, "reference")
        for i, (a, b) in enumerate(zip(multi_p, ref64_p)):
            _assert_close_f32(spec, hp, a, b, f"params[{i}]")


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_numpy_backend_matches_cython(spec, rng):
    """The fallback backend (the reference behind the same validation) gives the compiled results."""
    hp = dict(spec.defaults, lr=0.01)
    params, states = make_problem(spec, hp, [(5,), (3, 4)], np.float64, rng)
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(5)]
    a_p, a_s = _copy(params, states)
    b_p, b_s = _copy(params, states)
    _run_steps(spec, hp, a_p, a_s, grads, "multi", backend="cython")
    _run_steps(spec, hp, b_p, b_s, grads, "multi", backend="numpy")
    for a, b in zip(a_p, b_p):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_grad_scale_and_maximize(spec, rng):
    """grad_scale multiplies the gradient inside the kernel; maximize flips its sign; a 0-d array works
    like a float."""
    hp = dict(spec.defaults, lr=0.01)
    params, states = make_problem(spec, hp, [(9,), (4, 4)], np.float64, rng)
    grads = [rng.standard_normal(p.shape) for p in params]
    step = {"step": 3} if spec.uses_step else {}
    fn = getattr(fastopt, spec.function_name)

    a_p, a_s = _copy(params, states)
    fn(a_p, grads, **a_s, **hp, **step, grad_scale=np.array(-0.25))
    b_p, b_s = _copy(params, states)
    fn(b_p, [0.25 * g for g in grads], **b_s, **dict(hp, maximize=True), **step)
    for a, b in zip(a_p, b_p):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    c_p, c_s = _copy(params, states)
    fn(c_p, grads, **c_s, **hp, **step)
    assert not all(np.array_equal(a, c) for a, c in zip(a_p, c_p) if a.size)


def test_sgd_momentum_first_step_ignores_buffer_contents(rng):
    """On step 1 the momentum buffer is set to the gradient whatever it held (even NaN), like torch."""
    p = rng.standard_normal(100)
    g = rng.standard_normal(100)
    buf = np.full(100, np.nan)
    fastopt.sgd_step(p, g, buf, lr=0.1, momentum=0.9, step=1)
    np.testing.assert_array_equal(buf, g)
    assert np.all(np.isfinite(p))


def test_nonfinite_gradient_propagates_like_torch(rng):
    p = rng.standard_normal(10)
    m, v = np.zeros(10), np.zeros(10)
    g = rng.standard_normal(10)
    g[3] = np.nan
    fastopt.adam_step(p, g, m, v, step=1)
    assert np.isnan(p[3]) and np.isnan(m[3]) and np.isnan(v[3])
    assert np.all(np.isfinite(np.delete(p, 3)))


def test_amsgrad_max_propagates_nan():
    p, m = np.zeros(2), np.zeros(2)
    v, vmax = np.zeros(2), np.array([np.nan, 1.0])
    fastopt.adam_step(p, np.ones(2), m, v, vmax, step=1, amsgrad=True)
    assert np.isnan(vmax[0]) and vmax[1] == 1.0


def test_lamb_trust_ratio_is_per_tensor(rng):
    """Two tensors in one call get their own trust ratios: the same result as two separate calls, and not
    the result of one ratio over the concatenation."""
    ps = [rng.standard_normal(50), 100 * rng.standard_normal(70)]
    gs = [rng.standard_normal(50), rng.standard_normal(70)]
    kw = dict(step=1, lr=0.1, weight_decay=0.01)
    together = [p.copy() for p in ps]
    fastopt.lamb_step(together, gs, **fastopt.init_state("lamb", together), **kw)
    for p, g, want in zip(ps, gs, together):
        alone = p.copy()
        fastopt.lamb_step(alone, g, **fastopt.init_state("lamb", alone), **kw)
        np.testing.assert_array_equal(alone, want)
    flat = np.concatenate(ps)
    fastopt.lamb_step(flat, np.concatenate(gs), **fastopt.init_state("lamb", flat), **kw)
    assert not np.allclose(flat, np.concatenate(together), rtol=1e-6)
    # zero params: trust ratio 1 (the update is applied unscaled)
    z = np.zeros(8)
    fastopt.lamb_step(z, np.ones(8), np.zeros(8), np.zeros(8), step=1, lr=0.5)
    np.testing.assert_allclose(z, -0.5 * np.ones(8) / (1 + 1e-6), rtol=1e-12)


def test_results_do_not_depend_on_thread_count(rng):
    p = rng.standard_normal(300_001).astype(np.float32)
    g = rng.standard_normal(p.shape).astype(np.float32)
    out = []
    for threads in (1, 2):
        fastopt.set_num_threads(threads)
        q = p.copy()
        st = fastopt.init_state("lamb", q)
        fastopt.lamb_step(q, g, **st, step=1, lr=0.01, weight_decay=0.1)
        out.append((q, fastopt.global_norm(g)))
    fastopt.set_num_threads(2)
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]


def test_init_state_names_and_options():
    p = np.ones((3, 2), np.float32)
    assert set(fastopt.init_state("adam", p)) == {"exp_avg", "exp_avg_sq"}
    assert set(fastopt.init_state("adam", p, amsgrad=True)) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert fastopt.init_state("sgd", p) == {}
    st = fastopt.init_state("rmsprop", [p, p[0]], centered=True, momentum=0.9)
    assert set(st) == {"square_avg", "grad_avg", "momentum_buffer"}
    assert [a.shape for a in st["grad_avg"]] == [(3, 2), (2,)]
    assert all(a.dtype == np.float32 and not a.any() for a in st["square_avg"])
    with pytest.raises(ValueError, match="Unknown optimizer"):
        fastopt.init_state("adamx", p)
    with pytest.raises(TypeError, match="unknown option"):
        fastopt.init_state("adam", p, nesterov=True)
    with pytest.raises(ValueError, match="Invalid momentum value: -1"):
        fastopt.init_state("sgd", p, momentum=-1.0)


def test_empty_list_is_a_no_op():
    assert fastopt.adam_step([], [], [], [], step=1) is None


def test_docstrings_and_signatures_come_from_the_registry():
    import inspect
    for spec in REGISTRY.values():
        fn = getattr(fastopt, spec.function_name)
        sig = inspect.signature(fn)
        assert list(sig.parameters)[:2] == ["params", "grads"]
        for h in spec.hypers:
            assert sig.parameters[h.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert spec.rule.splitlines()[0].strip() in fn.__doc__
        assert f"{spec.function_name}(" in spec.signature_text()
        # the NumPy class shows the rule too (it said only "Stateful form of ...")
        assert all(line.strip() in getattr(fastopt, spec.class_name).__doc__ for line in spec.rule.splitlines())
