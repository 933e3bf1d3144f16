"""Execution on a real GPU (skipped without one): CuPy arrays (both backends), torch CUDA tensors, float16,
and the clip-then-update path without host synchronisation."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import reference


def _gpu():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as e:
        pytest.skip(f"no CUDA GPU ({type(e).__name__})")
    return cp


OPTIMIZERS = [("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)), ("adagrad", {}),
              ("rmsprop", dict(centered=True, momentum=0.9)), ("adam", dict(amsgrad=True)), ("adamw", {}),
              ("nadam", {}), ("radam", dict(beta2=0.9)), ("adabelief", {}), ("lamb", dict(weight_decay=0.01)),
              ("lion", {})]
SHAPES = [(1,), (1023,), (64, 33), (1 << 17) + 5]


def _run(cp, name, options, dtype, as_list, backend, steps=7):
    spec = fastopt.specs.get_spec(name)
    rng = np.random.default_rng(0)
    shapes = SHAPES if as_list else [SHAPES[2]]
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref_p = [p.astype(np.float64) for p in ps]
    d_p = [cp.asarray(p) for p in ps]
    state = fastopt.init_state(name, d_p, **{k: v for k, v in options.items() if k in spec.state_options})
    ref_state = {k: [np.zeros(p.shape) for p in ps] for k in state}
    fn = getattr(fastopt, spec.function_name)
    for t in range(1, steps + 1):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        d_g = [cp.asarray(g) for g in gs]
        kw = dict(options, backend=backend)
        if spec.uses_step:
            kw["step"] = t
        pick = (lambda x: x) if as_list else (lambda x: x[0])
        fn(pick(d_p), pick(d_g), **{k: pick(v) for k, v in state.items()}, **kw)
        kw.pop("backend")
        for i in range(len(shapes)):
            reference.STEPS[name](ref_p[i], gs[i].astype(np.float64), **{k: v[i] for k, v in ref_state.items()}, **kw)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for d, r in zip(d_p, ref_p):
        np.testing.assert_allclose(cp.asnumpy(d), r, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,options", OPTIMIZERS)
def test_update_matches_reference(name, options, dtype, as_list, backend):
    cp = _gpu()
    if backend == "numba":
        pytest.importorskip("numba")
    _run(cp, name, options, dtype, as_list, backend)


@pytest.mark.gpu
def test_float16_params_with_float32_state():
    cp = _gpu()
    rng = np.random.default_rng(1)
    p = rng.standard_normal(4099).astype(np.float16)
    g = rng.standard_normal(4099).astype(np.float16)
    dp, dg = cp.asarray(p), cp.asarray(g)
    m, v = cp.zeros(p.shape, cp.float32), cp.zeros(p.shape, cp.float32)
    fastopt.adam_step(dp, dg, m, v, step=1, lr=1e-2)
    rp, rm, rv = p.astype(np.float64), np.zeros(p.shape), np.zeros(p.shape)
    reference.adam_step(rp, g.astype(np.float64), rm, rv, step=1, lr=1e-2)
    np.testing.assert_allclose(cp.asnumpy(dp).astype(np.float64), rp, rtol=2e-3, atol=2e-3)
    with pytest.raises(TypeError, match="float32"):
        fastopt.adam_step(dp, dg, cp.zeros_like(dp), cp.zeros_like(dp), step=1)


@pytest.mark.gpu
def test_torch_cuda_tensors_are_updated_in_place():
    _gpu()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    p = torch.randn(1000, device="cuda")
    g = torch.randn(1000, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref = p.clone()
    opt = torch.optim.Adam([ref], lr=1e-2)
    ref.grad = g.clone()
    opt.step()
    fastopt.adam_step(p, g, m, v, step=1, lr=1e-2)
    torch.cuda.synchronize()
    assert torch.allclose(p, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_clip_then_update_never_syncs_with_the_host(monkeypatch):
    cp = _gpu()
    rng = np.random.default_rng(2)
    shapes = [(300,), (17, 5), (1 << 16) + 1]
    gs = [rng.standard_normal(s).astype(np.float32) * 10 for s in shapes]
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    d_p, d_g = [cp.asarray(p) for p in ps], [cp.asarray(g) for g in gs]
    state = fastopt.init_state("adam", d_p)
    cp.cuda.Device().synchronize()

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation in the clip-then-update path")

    with monkeypatch.context() as mp:  # any device-to-host read fails the test
        mp.setattr(cp.ndarray, "get", forbidden)
        mp.setattr(cp.ndarray, "item", forbidden)
        mp.setattr(cp.ndarray, "__float__", forbidden)
        mp.setattr(cp.ndarray, "__bool__", forbidden)
        mp.setattr(cp, "asnumpy", forbidden)
        total = fastopt.global_norm(d_g)
        coef = fastopt.clip.clip_coefficient(total, 1.0)
        fastopt.adam_step(d_p, d_g, **state, step=1, grad_scale=coef)
        assert isinstance(total, cp.ndarray) and total.shape == ()
    ref_total = reference.global_norm(gs)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-10)
    ref_coef = min(1.0, 1.0 / (ref_total + 1e-6))
    for p, g, d in zip(ps, gs, d_p):
        rp, m, v = p.astype(np.float64), np.zeros(p.shape), np.zeros(p.shape)
        reference.adam_step(rp, g.astype(np.float64), m, v, step=1, grad_scale=ref_coef)
        np.testing.assert_allclose(cp.asnumpy(d), rp, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_clipping_on_the_device(backend):
    cp = _gpu()
    if backend == "numba":
        pytest.importorskip("numba")
    rng = np.random.default_rng(3)
    gs = [rng.standard_normal(s).astype(np.float32) * 5 for s in [(7,), (1 << 17,), (0,)]]
    d = [cp.asarray(g) for g in gs]
    total = fastopt.clip_by_global_norm(d, 1.0, backend=backend)
    ref = reference.global_norm(gs)
    np.testing.assert_allclose(float(cp.asarray(total)), ref, rtol=1e-10)
    for g, x in zip(gs, d):
        np.testing.assert_allclose(cp.asnumpy(x), g * np.float32(1.0 / (ref + 1e-6)), rtol=1e-6)
    again = fastopt.global_norm([cp.asarray(g) for g in gs], backend=backend)
    assert float(cp.asarray(again)) == float(cp.asarray(fastopt.global_norm([cp.asarray(g) for g in gs],
                                                                                backend=backend)))  # deterministic
    fastopt.clip_by_value(d, 1e-3, backend=backend)
    assert float(cp.abs(cp.concatenate([x.ravel() for x in d])).max()) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("name", __import__("device_class_check").OPTIMIZERS)
def test_optimizer_class_clips_and_skips_on_the_device_without_sync(monkeypatch, name, backend):
    """tests/gpu/device_class_check.py on CuPy arrays: groups, dtypes, schedule, clip_grad_norm and
    skip_nonfinite with NaN/Inf gradients, no device-to-host read inside step(), checkpoint resume."""
    import contextlib

    import device_class_check
    cp = _gpu()
    if backend == "numba":
        pytest.importorskip("numba")

    @contextlib.contextmanager
    def forbid_sync(message):
        def forbidden(*a, **k):
            raise AssertionError(message)
        with monkeypatch.context() as mp:
            for attr in ("get", "item", "__float__", "__int__", "__bool__", "tolist"):
                mp.setattr(cp.ndarray, attr, forbidden)
            mp.setattr(cp, "asnumpy", forbidden)
            mp.setattr(cp.cuda.Stream, "synchronize", forbidden)
            mp.setattr(cp.cuda.Device, "synchronize", forbidden)
            yield

    tolerances = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
    device_class_check.run(name, cp.asarray, cp.asnumpy, forbid_sync, np.float64, tolerances, backend=backend)
