"""Bad input: a clear TypeError / ValueError naming the argument, and every array byte-for-byte
unchanged. Run for the compiled backend and the NumPy fallback (the same checks in two places)."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.specs import REGISTRY

from conftest import snapshot

BACKENDS = ["cython", "numpy"]


def adam_args(n=10, dtype=np.float32, k=None):
    rng = np.random.default_rng()
    if k is None:
        return [np.abs(rng.standard_normal(n)).astype(dtype) for _ in range(4)]
    return [[np.abs(rng.standard_normal(n)).astype(dtype) for _ in range(k)] for _ in range(4)]


def expect_unchanged(exc, match, fn, *arrays, **kwargs):
    before = snapshot(arrays)
    with pytest.raises(exc, match=match):
        fn(*arrays, **kwargs)
    assert snapshot(arrays) == before, "an error modified an array"


@pytest.mark.parametrize("backend", BACKENDS)
class TestArrayErrors:
    def test_integer_and_complex_params(self, backend):
        for dtype in (np.int64, np.complex64, np.bool_):
            p = np.zeros(4, dtype)
            with pytest.raises(TypeError, match=r"params has dtype .*float32, float64, float16 or bfloat16"):
                fastopt.sgd_step(p, p.copy(), lr=0.1, backend=backend)

    def test_grad_dtype_differs_from_param(self, backend):
        p, g, m, v = adam_args()
        expect_unchanged(TypeError, r"grads has dtype float64, expected float32 \(the dtype of params\)",
                         fastopt.adam_step, p, g.astype(np.float64), m, v, step=1, backend=backend)

    def test_state_dtype_differs(self, backend):
        p, g, m, v = adam_args(k=3)
        v[2] = v[2].astype(np.float64)
        expect_unchanged(TypeError, r"exp_avg_sq\[2\] has dtype float64, expected float32",
                         fastopt.adam_step, p, g, m, v, step=1, backend=backend)

    def test_mixed_param_dtypes_in_one_call(self, backend):
        p, g, m, v = adam_args(k=2)
        p[1], g[1], m[1], v[1] = (a.astype(np.float64) for a in (p[1], g[1], m[1], v[1]))
        expect_unchanged(TypeError, r"params\[1\] has dtype float64 but params\[0\] has float32",
                         fastopt.adam_step, p, g, m, v, step=1, backend=backend)

    def test_shape_mismatch(self, backend):
        p, g, m, v = adam_args(k=2)
        m[1] = m[1][:-1].copy()
        expect_unchanged(ValueError, r"exp_avg\[1\] has shape \(9,\), expected \(10,\)",
                         fastopt.adam_step, p, g, m, v, step=1, backend=backend)

    def test_list_lengths_differ(self, backend):
        p, g, m, v = adam_args(k=3)
        expect_unchanged(ValueError, "grads has 2 arrays but params has 3",
                         fastopt.adam_step, p, g[:2], m, v, step=1, backend=backend)

    def test_list_mixed_with_single_array(self, backend):
        p, g, m, v = adam_args(k=2)
        expect_unchanged(TypeError, "exp_avg must be a list of arrays",
                         fastopt.adam_step, p, g, m[0], v, step=1, backend=backend)

    def test_read_only_param_and_state(self, backend):
        p, g, m, v = adam_args(k=2)
        p[1].flags.writeable = False
        expect_unchanged(ValueError, r"params\[1\] is read-only", fastopt.adam_step, p, g, m, v, step=1,
                         backend=backend)
        p[1] = p[1].copy()
        v[0].flags.writeable = False
        expect_unchanged(ValueError, r"exp_avg_sq\[0\] is read-only", fastopt.adam_step, p, g, m, v, step=1,
                         backend=backend)

    def test_read_only_grads_are_fine(self, backend):
        p, g, m, v = adam_args()
        g.flags.writeable = False
        fastopt.adam_step(p, g, m, v, step=1, backend=backend)

    def test_non_contiguous(self, backend):
        p, g, m, v = adam_args(20)
        expect_unchanged(ValueError, "grads is not C-contiguous", fastopt.adam_step, p[::2].copy(), g[::2],
                         m[:10], v[:10], step=1, backend=backend)
        q = np.zeros((4, 5), np.float32)
        expect_unchanged(ValueError, "params is not C-contiguous", fastopt.sgd_step, q.T, q.T.copy(), lr=1.0,
                         backend=backend)

    def test_state_aliases_param(self, backend):
        p, g, m, v = adam_args()
        expect_unchanged(ValueError, "exp_avg shares memory with params|params shares memory with exp_avg",
                         fastopt.adam_step, p, g, p, v, step=1, backend=backend)

    def test_overlapping_views_across_tensors(self, backend):
        buf = np.zeros(30, np.float32)
        ps = [buf[0:10], buf[5:15]]
        gs = [np.ones(10, np.float32), np.ones(10, np.float32)]
        expect_unchanged(ValueError, r"shares memory", fastopt.sgd_step, ps, gs, lr=1.0, backend=backend)

    def test_grad_aliasing_a_written_array(self, backend):
        p, g, m, v = adam_args()
        expect_unchanged(ValueError, "shares memory", fastopt.adam_step, p, m, m, v, step=1, backend=backend)

    def test_shared_grads_are_fine(self, backend):
        g = np.ones(5)
        ps = [np.zeros(5), np.zeros(5)]
        fastopt.sgd_step(ps, [g, g], lr=1.0, backend=backend)
        np.testing.assert_array_equal(ps[1], -np.ones(5))

    def test_not_an_array(self, backend):
        with pytest.raises(TypeError, match="must be an array"):
            fastopt.sgd_step(np.zeros(3), "abc", lr=1.0, backend=backend)

    def test_gpu_array_with_host_arrays(self, backend):
        class FakeCuda:  # anything exposing __cuda_array_interface__ is a GPU array
            __cuda_array_interface__ = {"shape": (3,), "typestr": "<f4", "data": (0, False), "version": 3}
        p = np.zeros(3, np.float32)
        expect_unchanged(TypeError, "GPU array", fastopt.sgd_step, [p], [FakeCuda()], lr=1.0, backend=backend)

    def test_missing_required_state(self, backend):
        p, g, m, v = adam_args()
        expect_unchanged(ValueError, "needs the state 'max_exp_avg_sq'", fastopt.adam_step, p, g, m, v,
                         step=1, amsgrad=True, backend=backend)
        expect_unchanged(ValueError, "needs the state 'momentum_buffer'", fastopt.sgd_step, p, g, lr=0.1,
                         momentum=0.9, backend=backend)

    def test_grad_scale_must_be_a_scalar(self, backend):
        p, g, m, v = adam_args()
        expect_unchanged(ValueError, "grad_scale must be a scalar", fastopt.adam_step, p, g, m, v, step=1,
                         grad_scale=np.ones(2), backend=backend)
        expect_unchanged(TypeError, "grad_scale must be a real number", fastopt.adam_step, p, g, m, v, step=1,
                         grad_scale="2", backend=backend)
        expect_unchanged(TypeError, "grad_scale must be a real number", fastopt.adam_step, p, g, m, v, step=1,
                         grad_scale=np.array(2, np.int32), backend=backend)

    def test_grad_scale_of_any_host_float_dtype(self, backend):
        """A 0-d grad_scale in any dtype a param may have (bfloat16 too) or as a torch CPU tensor (the
        functional API takes torch CPU params) is read as the float it holds."""
        ml_dtypes = pytest.importorskip("ml_dtypes")
        scale = float(np.random.default_rng().choice([0.5, 0.25, 2.0, 8.0]))  # exact in every float dtype
        scales = [np.array(scale, d) for d in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)]
        scales += [ml_dtypes.bfloat16(scale), np.float16(scale)]  # NumPy scalars of the 16-bit dtypes too
        try:
            import torch
            scales += [torch.tensor(scale, dtype=torch.bfloat16), torch.tensor(scale, dtype=torch.float64)]
        except ImportError:
            pass
        p, g, m, v = adam_args(11)
        expected = [a.copy() for a in (p, m, v)]
        fastopt.adam_step(*expected[:1], g, *expected[1:], step=3, grad_scale=scale, backend=backend)
        for s in scales:
            got = [a.copy() for a in (p, m, v)]
            fastopt.adam_step(got[0], g, got[1], got[2], step=3, grad_scale=s, backend=backend)
            for a, b in zip(got, expected):
                assert np.array_equal(a, b), s


# ---- hyperparameters (validated in the registry, before dispatch) ----

BAD_VALUES = {  # name -> (bad value, message)
    "lr": (-0.1, "Invalid learning rate: -0.1"),
    "beta1": (1.0, "Invalid beta1 value: 1.0"),
    "beta2": (-0.5, "Invalid beta2 value: -0.5"),
    "eps": (-1e-8, "Invalid epsilon value: -1e-08"),
    "weight_decay": (-0.01, "Invalid weight_decay value: -0.01"),
    "momentum": (-0.9, "Invalid momentum value: -0.9"),
    "alpha": (-0.9, "Invalid alpha value: -0.9"),
    "lr_decay": (-1.0, "Invalid lr_decay value: -1.0"),
    "momentum_decay": (-1.0, "Invalid momentum_decay value: -1.0"),
    "initial_accumulator_value": (-0.5, "Invalid initial_accumulator_value value: -0.5"),
    "dampening": (float("inf"), "Invalid dampening value: inf"),
    "rho": (1.5, "Invalid rho value: 1.5"),
    "etaminus": (1.0, "Invalid eta values: 1.0, 1.2 (etaminus must be in (0, 1) and etaplus > 1)"),
    "etaplus": (0.9, "Invalid eta values: 0.5, 0.9 (etaminus must be in (0, 1) and etaplus > 1)"),
    "step_size_min": (float("inf"), "Invalid step_size_min value: inf"),
    "step_size_max": (float("-inf"), "Invalid step_size_max value: -inf"),
    "lambd": (-1e-4, "Invalid lambd value: -0.0001"),
    "t0": (float("nan"), "Invalid t0 value: nan"),
    "initial_accumulator": (-0.5, "Invalid initial_accumulator value: -0.5"),
}


def _hyper_cases():
    for spec in REGISTRY.values():
        for h in spec.hypers:
            yield pytest.param(spec, h, id=f"{spec.name}-{h.name}")


def _call(spec, hp, exc, match, step=1):
    """Call spec's step function with hyperparameters hp; expect exc and no array modified."""
    p = np.ones(4)
    states = [np.zeros(4) for used in spec.active_states(dict(spec.defaults, lr=0.1)) if used]
    kw = dict(hp)
    if spec.uses_step:
        kw["step"] = step
    if spec.name == "sgd":
        kw.setdefault("lr", 0.1)
    expect_unchanged(exc, match, getattr(fastopt, spec.function_name), p, np.ones(4), *states, **kw)


@pytest.mark.parametrize("spec,h", list(_hyper_cases()))
def test_invalid_hyperparameter_named_in_message(spec, h):
    if h.kind == "bool":
        _call(spec, {h.name: 1}, TypeError, f"{h.name} must be a bool, got 1")
        return
    if h.name in BAD_VALUES:
        value, message = BAD_VALUES[h.name]
    else:  # a hyperparameter the table does not know: a value its own check refuses, named torch-style
        # (none when only finiteness is checked, or the range is a relation checked by the spec: Rprop's etas)
        value = next((v for v in (-1.0, 2.0, 1e300, -1e-300) if h.check is not None and not h.check(v)), None)
        message = f"Invalid {h.label or h.name}: {value}"
    if value is not None:
        _call(spec, {h.name: value}, ValueError, message.replace("(", r"\(").replace(")", r"\)"))
    for bad in (float("nan"), float("-inf")) if h.inf_ok else (float("nan"), float("inf")):
        _call(spec, {h.name: bad}, ValueError, f"Invalid .*: {bad}")
    _call(spec, {h.name: "x"}, TypeError, f"{h.name} must be a real number, got 'x'")


@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if s.uses_step], ids=lambda s: s.name)
def test_invalid_step(spec):
    for step, exc, msg in [(0, ValueError, "Invalid step: 0"), (-3, ValueError, "Invalid step: -3"),
                           (1.5, TypeError, "step must be an integer"), (True, TypeError, "step must be an integer")]:
        _call(spec, {}, exc, msg, step=step)


def test_nesterov_needs_momentum_and_zero_dampening():
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        fastopt.sgd_step(np.ones(2), np.ones(2), np.zeros(2), lr=0.1, nesterov=True, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        fastopt.sgd_step(np.ones(2), np.ones(2), lr=0.1, nesterov=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match="Invalid backend: 'fortran'"):
        fastopt.sgd_step(np.ones(2), np.ones(2), lr=0.1, backend="fortran")
    with pytest.raises(ValueError, match="backend 'cupy' cannot update numpy.ndarray"):
        fastopt.sgd_step(np.ones(2), np.ones(2), lr=0.1, backend="cupy")
    with pytest.raises(ValueError, match="Invalid backend"):
        with fastopt.use_backend("gpu"):
            pass
