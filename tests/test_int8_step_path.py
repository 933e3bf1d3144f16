"""The compiled step path of 8-bit state (cython_backend.Int8Fixed: an _cpu_fast.Int8Plan over the arrays that
backends/validate.py checked once). Each step it compares a snapshot of every param, compensation and
QuantizedState (its arrays and map) and checks the grads in C; anything it does not accept goes back to the
Python checks, which raise with their messages or accept (and the plan is rebuilt after a re-check).

Checked here: every optimizer that takes 8-bit state and every rounding, with two param groups, over many
steps, equals the same class on the NumPy backend bit for bit (params, codes, scales, compensation), and no
step of it runs the Python grads checks; each kind of bad input between steps raises the Python checks'
error with every array unchanged, and the next good step is right; arrays replaced or reshaped between steps
(a new QuantizedState, new codes, a param made read-only and writable again) are seen; grads the plan does
not take (an ndarray subclass, float32 grads of 16-bit params) take the Python path with the same result.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import dispatch, validate
from fastopt.precision import QuantizedState
from fastopt.specs import REGISTRY

from test_int8_state import CASES, SUPPORTED

ml_dtypes = pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.skipif(not dispatch.cython_available(), reason="compiled extension not built")

BF16 = np.dtype(ml_dtypes.bfloat16)
MODES = {  # (param dtype, grad dtype, class options)
    "float32": (np.float32, np.float32, {}),
    "bf16+kahan": (BF16, BF16, dict(kahan=True)),
    "bf16+f32 grads+stochastic": (BF16, np.float32, dict(stochastic_rounding=True, seed=11)),
    "f16": (np.float16, np.float16, {}),
}
SHAPES = [(0,), (1,), (257,), (7, 37), (70000,)]  # 70000: three chunks, several threads


def _class(name):
    return getattr(fastopt, REGISTRY[name].class_name)


def _groups(params, hp):
    """Two param groups (two kernel calls) with different learning rates."""
    return [dict(params=params[:2]), dict(params=params[2:], lr=hp["lr"] * 0.5)]


def _bytes(opt, params):
    out = [p.tobytes() for p in params]
    for i in range(len(params)):
        for k, a in sorted(opt.state_arrays(i).items()):
            out += [a.codes.tobytes(), a.absmax.tobytes()] if isinstance(a, QuantizedState) else [a.tobytes()]
    return out


class _CountPythonBinds:
    """Counts validate.bind_grads calls (the Python checks of a step's grads)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = validate.bind_grads

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(validate, "bind_grads", counted)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", SUPPORTED)
def test_class_step_path_equals_numpy_backend(name, mode, monkeypatch):
    rng = np.random.default_rng()
    pdt, gdt, options = MODES[mode]
    hp = CASES[name]
    params = [rng.standard_normal(s).astype(np.float32).astype(pdt) for s in SHAPES]
    ref_params = [p.copy() for p in params]
    fast = _class(name)(_groups(params, hp), state_dtype="int8", **hp, **options)
    ref = _class(name)(_groups(ref_params, hp), state_dtype="int8", backend="numpy", **hp, **options)
    binds = _CountPythonBinds(monkeypatch)
    for step, threads in enumerate((1, 2, 1, 2, 2, 1)):
        fastopt.set_num_threads(threads)
        grads = [rng.standard_normal(s).astype(np.float32).astype(gdt) for s in SHAPES]
        before = binds.calls
        fast.step(grads)
        assert binds.calls == before, "the compiled step path sent a valid step to the Python checks"
        ref.step([g.copy() for g in grads])
        assert _bytes(fast, params) == _bytes(ref, ref_params), (name, mode, step)
    assert any(p.tobytes() != q.tobytes() for p, q in zip(params, [np.zeros_like(p) for p in params]))


def _adam(rng, pdt=np.float32, **options):
    params = [rng.standard_normal(s).astype(np.float32).astype(pdt) for s in ((300,), (5,), (2, 3))]
    return params, fastopt.Adam(params, lr=0.01, state_dtype="int8", **options)


def _grads(rng, dtype=np.float32):
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in ((300,), (5,), (2, 3))]


def _stepped_adam(rng, steps=2):
    """_adam after `steps` steps: (params, optimizer, history for _replay)."""
    params, opt = _adam(rng)
    history = [[p.copy() for p in params]]
    for _ in range(steps):
        history.append(_grads(rng))
        opt.step(history[-1])
    return params, opt, history


def _replay(history, pdt=np.float32, **options):
    """The NumPy backend's Adam over the same params and grads: the oracle of the step after a bad one."""
    params = [p.copy() for p in history[0]]
    opt = fastopt.Adam(params, lr=0.01, state_dtype="int8", backend="numpy", **options)
    for grads in history[1:]:
        opt.step([g.copy() for g in grads])
    return params, opt


def _bad_grads(rng, params):
    g = _grads(rng)
    non_contiguous = np.zeros((5, 2), np.float32)[:, 0]
    return {
        "shape": ([g[0], g[1][:4], g[2]], ValueError, r"grads\[1\] has shape \(4,\), expected \(5,\)"),
        "dtype": ([g[0], g[1].astype(np.float64), g[2]], TypeError, r"grads\[1\] has dtype float64"),
        "None": ([g[0], None, g[2]], TypeError, r"grads\[1\] must be an array, got None"),
        "count": (g[:2], ValueError, r"3 params"),
        "non-contiguous": ([g[0], non_contiguous, g[2]], ValueError, r"grads\[1\] is not C-contiguous"),
        "shares a param": ([params[0], g[1], g[2]], ValueError, r"shares memory"),
        "mixed dtypes": ([g[0], g[1].astype(np.float16), g[2]], TypeError, r"grads\[1\]"),
    }


@pytest.mark.parametrize("case", ["shape", "dtype", "None", "count", "non-contiguous", "shares a param",
                                  "mixed dtypes"])
def test_bad_grads_between_steps_raise_and_write_nothing(case):
    rng = np.random.default_rng()
    params, opt, history = _stepped_adam(rng)
    grads, error, words = _bad_grads(rng, params)[case]
    before = _bytes(opt, params)
    with pytest.raises(error, match=words):
        opt.step(grads)
    assert _bytes(opt, params) == before
    history.append(_grads(rng))
    opt.step(history[-1])
    ref_params, ref = _replay(history)
    assert _bytes(opt, params) == _bytes(ref, ref_params)


def test_state_arrays_replaced_between_steps_are_seen(monkeypatch):
    """New codes or scales inside a QuantizedState, a param reshaped in place, a param made read-only, a state
    given the other map, an absmax of the wrong length: each is checked again; a bad one raises with nothing
    written; after a good one the writes go to the new arrays and the next step is the compiled path again
    (the plan rebuilt)."""
    rng = np.random.default_rng()
    params, opt, history = _stepped_adam(rng)
    ref_params, ref = _replay(history)
    binds = _CountPythonBinds(monkeypatch)

    def good_step():
        """A step of both; whether the compiled one went through the Python checks."""
        grads = _grads(rng)
        calls = binds.calls
        opt.step(grads)
        python_checks = binds.calls > calls
        ref.step([g.copy() for g in grads])
        assert _bytes(opt, params) == _bytes(ref, ref_params)
        return python_checks

    def new_codes(o):
        q = o.state_arrays(1)["exp_avg_sq"]
        q.codes = q.codes.copy()

    def new_absmax(o):
        q = o.state_arrays(0)["exp_avg"]
        q.absmax = q.absmax.copy()

    for edit in (new_codes, new_absmax):
        edit(opt)
        edit(ref)
        assert good_step(), edit.__name__  # checked again (the Python checks), written to the new arrays
        assert not good_step(), edit.__name__  # the compiled path again

    def bad(words, error=ValueError):
        before = _bytes(opt, params)
        with pytest.raises(error, match=words):
            opt.step(_grads(rng))
        assert _bytes(opt, params) == before

    params[2].shape = (3, 2)
    bad(r"grads\[2\] has shape \(2, 3\), expected \(3, 2\)|codes has shape \(2, 3\), expected \(3, 2\)")
    params[2].shape = (2, 3)
    params[2].flags.writeable = False
    bad(r"params\[2\] is read-only")
    params[2].flags.writeable = True
    q = opt.state_arrays(1)["exp_avg"]
    q.signed = False
    bad(r"exp_avg\[1\] is quantized with the unsigned map, expected the signed one")
    q.signed = True
    good = q.absmax
    q.absmax = np.zeros(2, np.float32)
    bad(r"exp_avg\[1\]\.absmax has shape \(2,\), expected \(1,\)")
    q.absmax = good
    good_step()  # all restored: the arrays the plan holds
    assert not good_step()


class _Sub(np.ndarray):
    pass


@pytest.mark.parametrize("kind", ["ndarray subclass", "float32 grads of bf16 params"])
def test_grads_the_plan_leaves_to_the_python_checks(kind, monkeypatch):
    rng = np.random.default_rng()
    pdt = BF16 if kind.endswith("bf16 params") else np.float32
    params, opt = _adam(rng, pdt, kahan=pdt == BF16)
    history = [[p.copy() for p in params]]
    binds = _CountPythonBinds(monkeypatch)
    for _ in range(3):
        history.append(_grads(rng))
        opt.step([g.view(_Sub) for g in history[-1]] if kind == "ndarray subclass" else history[-1])
    # a subclass is the Python checks' to accept; float32 grads of 16-bit params the plan takes itself
    assert (binds.calls > 0) == (kind == "ndarray subclass")
    ref_params, ref = _replay(history, pdt, kahan=pdt == BF16)
    assert _bytes(opt, params) == _bytes(ref, ref_params)


def test_an_edit_to_another_optimizers_state_keeps_this_plan(monkeypatch):
    """The plan reads its QuantizedStates' arrays again only after some QuantizedState was assigned to
    (precision.quantized_state_assignments): an edit to another optimizer's state makes this one look once,
    find its own states as checked and stay on the compiled path; the edited one goes through the Python
    checks once, then back to its rebuilt plan; both equal the NumPy backend."""
    rng = np.random.default_rng()
    params_a, opt_a, history_a = _stepped_adam(rng)
    params_b, opt_b, history_b = _stepped_adam(rng)
    binds = _CountPythonBinds(monkeypatch)
    q = opt_a.state_arrays(0)["exp_avg"]
    q.codes = q.codes.copy()
    for expect_a in (1, 0, 0):
        history_b.append(_grads(rng))
        before = binds.calls
        opt_b.step(history_b[-1])
        assert binds.calls == before, "an edit to another optimizer's state sent this one to the Python checks"
        history_a.append(_grads(rng))
        opt_a.step(history_a[-1])
        assert binds.calls == before + expect_a
    for params, opt, history in ((params_a, opt_a, history_a), (params_b, opt_b, history_b)):
        ref_params, ref = _replay(history)
        assert _bytes(opt, params) == _bytes(ref, ref_params)


def test_a_grad_sharing_memory_with_another_groups_array_raises():
    """The plan compares every grad with every array any call of the step writes (the other param group's
    params and codes included): such a step raises with nothing written, and the next good step is right."""
    rng = np.random.default_rng()
    shapes = ((300,), (6,), (257,), (2, 3))
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    history = [[p.copy() for p in params]]

    def groups(ps, lr=0.01):
        return [dict(params=ps[:2]), dict(params=ps[2:], lr=lr / 2)]

    opt = fastopt.Adam(groups(params), lr=0.01, state_dtype="int8")
    history.append([rng.standard_normal(s).astype(np.float32) for s in shapes])
    opt.step(history[-1])
    other_codes = opt.state_arrays(0)["exp_avg_sq"].codes  # group 0's, uint8 (300,)
    for shared in (params[1].reshape(2, 3), other_codes.view(np.float32)[:6].reshape(2, 3)):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes[:3]] + [shared]
        before = _bytes(opt, params)
        with pytest.raises(ValueError, match="shares memory"):
            opt.step(grads)
        assert _bytes(opt, params) == before
    history.append([rng.standard_normal(s).astype(np.float32) for s in shapes])
    opt.step(history[-1])
    ref_params = [p.copy() for p in history[0]]
    ref = fastopt.Adam(groups(ref_params), lr=0.01, state_dtype="int8", backend="numpy")
    for grads in history[1:]:
        ref.step([g.copy() for g in grads])
    assert _bytes(opt, params) == _bytes(ref, ref_params)
