"""Execution on a real GPU (skipped without one): CuPy arrays (both backends), torch CUDA tensors, float16,
the clip-then-update path without host synchronisation, streams (a side stream whose producer is still
running), misaligned views, more than 2**31 elements, 20,000 tensors, and arrays on a second GPU."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import fastopt
from fastopt import reference



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
def test_update_matches_reference(cp, name, options, dtype, as_list, backend):
    if backend == "numba":
        pytest.importorskip("numba")
    _run(cp, name, options, dtype, as_list, backend)


@pytest.mark.gpu
def test_float16_params_with_float32_state(cp):
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
def test_torch_cuda_tensors_are_updated_in_place(cp):
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
def test_clip_then_update_never_syncs_with_the_host(cp, monkeypatch):
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
def test_clipping_on_the_device(cp, backend):
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
    # the bound in the data's dtype: float32(1e-3) is a little above the Python float 1e-3
    assert float(cp.abs(cp.concatenate([x.ravel() for x in d])).max()) <= float(np.float32(1e-3))


# A kernel that keeps the current stream busy for a while (%globaltimer: nanoseconds, whatever the clock).
_SPIN = r"""
extern "C" __global__ void fo_test_spin(long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < (unsigned long long)ns);
}
"""


def spin(cp, seconds):
    """Keep CuPy's current stream busy for `seconds`; returns an event recorded after the spin."""
    cp.RawKernel(_SPIN, "fo_test_spin")((1,), (1,), (np.int64(seconds * 1e9),))
    done = cp.cuda.Event()
    done.record()
    return done


@contextlib.contextmanager
def stream_stays_busy(cp, message, seconds=0.5):
    """Fails when the block waits for the device: a kernel spinning for `seconds` is queued on the
    current stream first, and must still be running when the block returns. Any host synchronisation
    (device or stream synchronize, a device-to-host copy, an event wait) would have waited for it. CuPy's
    Device.synchronize cannot be monkeypatched (an extension type), which is why the test asks the stream."""
    done = spin(cp, seconds)
    yield
    still_running = not done.done  # cudaEventQuery (CuPy's Event has no query())
    done.synchronize()
    assert still_running, message


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("name", __import__("device_class_check").OPTIMIZERS)
def test_optimizer_class_clips_and_skips_on_the_device_without_sync(cp, monkeypatch, name, backend):
    """tests/gpu/device_class_check.py on CuPy arrays: groups, dtypes, schedule, clip_grad_norm and
    skip_nonfinite with NaN/Inf gradients, no host synchronisation inside step(), checkpoint resume.
    A synchronisation is caught twice: Python-level device-to-host reads fail at once, and the stream
    must still be busy with a spinning kernel when step() returns. The first step is checked for reads
    only: it compiles the kernels and uploads the tensor tables and guard buffers (a one-time setup,
    which may wait for the device); every later step must not wait at all."""
    import device_class_check
    if backend == "numba":
        pytest.importorskip("numba")
    steps = []

    @contextlib.contextmanager
    def forbid_sync(message):
        def forbidden(*a, **k):
            raise AssertionError(message)
        with monkeypatch.context() as mp:
            for attr in ("get", "item", "__float__", "__int__", "__bool__", "tolist"):
                mp.setattr(cp.ndarray, attr, forbidden)
            mp.setattr(cp, "asnumpy", forbidden)
            steps.append(message)
            with (stream_stays_busy(cp, message) if len(steps) > 1 else contextlib.nullcontext()):
                yield

    tolerances = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
    device_class_check.run(name, cp.asarray, cp.asnumpy, forbid_sync, np.float64, tolerances, backend=backend)
    assert len(steps) > 2


# ---------------------------------------------------------------------------------------------------
# Streams: every launch ordered after the producer of its inputs
# ---------------------------------------------------------------------------------------------------

def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


def _sgd(api, p, g, backend):
    if api == "functional":
        fastopt.sgd_step(p, g, lr=1.0, backend=backend)
    else:
        fastopt.SGD([p], lr=1.0, backend=backend).step([g])


@pytest.mark.gpu
@pytest.mark.parametrize("api", ["functional", "class"])
@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_torch_side_stream_orders_the_update_after_the_gradient(cp, backend, api):
    """Issue 11: under torch.cuda.stream(s), sleep then g.fill_(1), then the step: it must read g after
    the fill (p == -1), i.e. run on torch's current stream s, not CuPy's or Numba's default stream."""
    torch = _torch_cuda()
    if backend == "numba":
        pytest.importorskip("numba")
    n = 1 << 20
    warm_p, warm_g = torch.zeros(n, device="cuda"), torch.ones(n, device="cuda")
    _sgd(api, warm_p, warm_g, backend)  # compile first: the race window must not close on the host
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        p = torch.zeros(n, device="cuda")
        g = torch.zeros(n, device="cuda")
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of spinning on `side` before the gradient is written
        g.fill_(1)
        _sgd(api, p, g, backend)
    torch.cuda.synchronize()
    assert bool((p == -1).all()), f"{backend} {api}: the update read the gradient before it was written " \
                                  f"({int((p == 0).sum())} of {n} elements not updated)"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_cupy_current_stream_orders_the_update_after_the_gradient(cp, backend):
    if backend == "numba":
        pytest.importorskip("numba")
    n = 1 << 20
    fastopt.sgd_step(cp.zeros(n, cp.float32), cp.ones(n, cp.float32), lr=1.0, backend=backend)  # compile
    cp.cuda.Device().synchronize()
    with cp.cuda.Stream(non_blocking=True):
        p, g = cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
        spin(cp, 0.5)
        g.fill(1)
        fastopt.sgd_step(p, g, lr=1.0, backend=backend)
        total = fastopt.global_norm(g, backend=backend)
    cp.cuda.Device().synchronize()
    assert bool((p == -1).all()), f"{backend}: the update ran before the gradient was written"
    assert float(cp.asarray(total)) == np.sqrt(n)


# ---------------------------------------------------------------------------------------------------
# Layouts and sizes the kernels must get right
# ---------------------------------------------------------------------------------------------------

def _adam_reference(ps, steps_grads):
    """Adam (lr 1e-2) in float64 over steps_grads[t][i] from params ps."""
    ref = [p.astype(np.float64) for p in ps]
    m = [np.zeros(p.shape) for p in ps]
    v = [np.zeros(p.shape) for p in ps]
    for t, grads in enumerate(steps_grads, start=1):
        for i in range(len(ps)):
            reference.adam_step(ref[i], grads[i].astype(np.float64), m[i], v[i], step=t, lr=1e-2)
    return ref


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_misaligned_views(cp, backend):
    """Views that start 1, 2 or 3 float32 elements into a buffer (4-byte but not 16-byte aligned): the
    CuPy kernels take the scalar path for them, the Numba table indexes them from the slot's lowest view."""
    if backend == "numba":
        pytest.importorskip("numba")
    rng = np.random.default_rng(21)
    layout = [(1, 1000), (1003, 77), (1082, 70_001)]  # (first element, size) in each buffer
    total = 1082 + 70_001 + 3
    host_p = rng.standard_normal(total).astype(np.float32)
    buffers = {name: cp.zeros(total, cp.float32) for name in ("g", "m", "v")}
    d_p = cp.asarray(host_p)
    views = {name: [b[start:start + n] for start, n in layout] for name, b in {"p": d_p, **buffers}.items()}
    grads = []
    for t in range(1, 4):
        g = [rng.standard_normal(n).astype(np.float32) for _, n in layout]
        grads.append(g)
        for view, x in zip(views["g"], g):
            view[...] = cp.asarray(x)
        fastopt.adam_step(views["p"], views["g"], views["m"], views["v"], step=t, lr=1e-2, backend=backend)
    ref = _adam_reference([host_p[s:s + n] for s, n in layout], grads)
    out = cp.asnumpy(d_p)
    for (start, n), r in zip(layout, ref):
        np.testing.assert_allclose(out[start:start + n], r, rtol=1e-4, atol=1e-5)
    untouched = np.ones(total, bool)
    for start, n in layout:
        untouched[start:start + n] = False
    np.testing.assert_array_equal(out[untouched], host_p[untouched])  # the gaps between views: not written
    # one misaligned array alone (the CuPy single-array kernel's scalar path)
    base_p, base_g = cp.asarray(host_p), cp.asarray(rng.standard_normal(total).astype(np.float32))
    p1, g1 = base_p[3:], base_g[3:]
    m1, v1 = cp.zeros(p1.shape, cp.float32), cp.zeros(p1.shape, cp.float32)
    assert p1.data.ptr % 16 != 0
    fastopt.adam_step(p1, g1, m1, v1, step=1, lr=1e-2, backend=backend)
    ref = _adam_reference([host_p[3:]], [[cp.asnumpy(g1)]])[0]
    np.testing.assert_allclose(cp.asnumpy(p1), ref, rtol=1e-4, atol=1e-5)
    assert cp.asnumpy(base_p)[:3].tobytes() == host_p[:3].tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_more_than_2_31_elements(cp, backend):
    """float32 arrays of 2**31 + 7 elements (8 GiB each): every element updated (64-bit indexing in
    every kernel), one array and in a list, and the norm over all of them."""
    if backend == "numba":
        pytest.importorskip("numba")
    n = (1 << 31) + 7
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 3 * 4 * n + (1 << 30):
        pytest.skip(f"needs {3 * 4 * n / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    p = cp.zeros(n, cp.float32)
    g = cp.ones(n, cp.float32)
    fastopt.sgd_step(p, g, lr=0.5, backend=backend)
    assert bool((p == -0.5).all()), f"{int((p != -0.5).sum())} elements not updated"
    small_p, small_g = cp.zeros(3, cp.float32), cp.ones(3, cp.float32)
    fastopt.sgd_step([small_p, p], [small_g, g], lr=0.25, backend=backend)
    assert bool((p == -0.75).all()) and bool((small_p == -0.25).all())
    total = float(cp.asarray(fastopt.global_norm([g, small_g], backend=backend)))
    assert total == np.sqrt(float(n + 3)), total
    del p, g
    cp.get_default_memory_pool().free_all_blocks()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_twenty_thousand_tensors(cp, backend):
    if backend == "numba":
        pytest.importorskip("numba")
    rng = np.random.default_rng(22)
    sizes = rng.integers(0, 300, 20_000)
    ps = [rng.standard_normal(int(k)).astype(np.float32) for k in sizes]
    d_p = [cp.asarray(p) for p in ps]
    state = fastopt.init_state("adam", d_p)
    grads = []
    for t in range(1, 3):
        gs = [rng.standard_normal(int(k)).astype(np.float32) for k in sizes]
        grads.append(gs)
        fastopt.adam_step(d_p, [cp.asarray(g) for g in gs], **state, step=t, lr=1e-2, backend=backend)
    # elementwise: the reference on the concatenation is the reference of each tensor
    ref = _adam_reference([np.concatenate(ps)], [[np.concatenate(gs)] for gs in grads])[0]
    np.testing.assert_allclose(cp.asnumpy(cp.concatenate(d_p)), ref, rtol=1e-4, atol=1e-5)
    sq = fastopt.global_norm([cp.asarray(g) for g in grads[-1]], backend=backend)
    np.testing.assert_allclose(float(cp.asarray(sq)), reference.global_norm(grads[-1]), rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba"])
def test_arrays_on_the_second_gpu(cp, backend):
    """Arrays on device 1 while device 0 is current: kernels, scratch, tables, norms and the optimizer's
    guard buffers on device 1 (skipped with one GPU)."""
    if backend == "numba":
        pytest.importorskip("numba")
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU")
    rng = np.random.default_rng(23)
    shapes = [(1000,), (33, 7), (70_001,)]
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    with cp.cuda.Device(1):
        d_p, d_g = [cp.asarray(p) for p in ps], [cp.asarray(g) for g in gs]
        m, v = [cp.zeros(s, cp.float32) for s in shapes], [cp.zeros(s, cp.float32) for s in shapes]
        opt_p = [x.copy() for x in d_p]
    with cp.cuda.Device(0):
        total = fastopt.clip_by_global_norm(d_g, 1.0, backend=backend)
        fastopt.adam_step(d_p, d_g, m, v, step=1, lr=1e-2, backend=backend)
        # the optimizer's state (functional.init_state) and guard buffers must land on device 1 too
        opt = fastopt.Adam(opt_p, lr=1e-2, clip_grad_norm=1.0, skip_nonfinite=True, backend=backend)
        opt.step(d_g)
        assert opt.skipped_steps == 0
    assert cp.asarray(total).device.id == 1
    ref_total = reference.global_norm(gs)
    np.testing.assert_allclose(float(cp.asarray(total)), ref_total, rtol=1e-10)
    coef = min(1.0, 1.0 / (ref_total + 1e-6))
    clipped = [g * np.float32(coef) for g in gs]
    ref = _adam_reference(ps, [clipped])
    for d, r in zip(d_p, ref):
        np.testing.assert_allclose(cp.asnumpy(d), r, rtol=1e-4, atol=1e-5)
    for x in opt.state_arrays(0).values():
        assert cp.asarray(x).device.id == 1
