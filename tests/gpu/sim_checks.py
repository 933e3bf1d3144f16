"""Runs every Numba kernel on the CUDA simulator against fastopt.reference. Executed as a script in its
own process by test_gpu_compile.py: NUMBA_ENABLE_CUDASIM must be set before numba is first imported.
Prints one line per failure and `SIM CHECKS: <n> passed, <m> failed` at the end; exits 1 on a failure."""
from __future__ import annotations

import contextlib
import os
import sys
import traceback

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import fastopt  # noqa: E402
from fastopt import reference, specs  # noqa: E402
from fastopt.backends import numba_backend as nb  # noqa: E402

import device_class_check  # noqa: E402  (tests/gpu, next to this script)

assert nb.simulating()

# (optimizer, hyperparameters, steps): every variant of every kernel family
CONFIGS = [
    ("sgd", dict(lr=0.1), 2),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01), 3),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True), 3),
    ("adagrad", dict(lr_decay=0.01, weight_decay=0.1), 3),
    ("rmsprop", dict(), 3),
    ("rmsprop", dict(centered=True, momentum=0.9, weight_decay=0.01), 3),
    ("rmsprop", dict(momentum=0.5), 2),
    ("adam", dict(weight_decay=0.1), 3),
    ("adam", dict(amsgrad=True, maximize=True), 3),
    ("adamw", dict(), 3),
    ("nadam", dict(decoupled_weight_decay=True, weight_decay=0.1), 3),
    ("radam", dict(beta2=0.9, weight_decay=0.1), 7),  # rectified from step 6 on
    ("adabelief", dict(), 3),
    ("lamb", dict(weight_decay=0.01), 3),
    ("lion", dict(weight_decay=0.1), 3),
    ("lars", dict(lr=1.0, weight_decay=0.01, nesterov=True), 3),  # a trust ratio per tensor (tensor_coefs)
    ("lars", dict(lr=0.5, momentum=0.0, exclude_1d=False), 2),
]
# every registry optimizer runs at least with its defaults (a new one needs no row here to be checked)
CONFIGS += [(name, {h.name: 0.01 for h in spec.hypers if h.default is specs.REQUIRED}, 3)
            for name, spec in specs.REGISTRY.items() if name not in {c[0] for c in CONFIGS}]
SINGLE_SHAPES = [(0,), (1,), (37,), (3, 5)]
LIST_SHAPES = [(5,), (0,), (70,), (2, 3)]
TOL = {np.float32: dict(rtol=3e-5, atol=3e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}

passed, failed = 0, []


ONLY = os.environ.get("SIM_CHECKS_ONLY")  # run only the checks whose label contains it (development)
# "k/n": only every n-th check from the k-th (test_gpu_compile runs n shards, on pytest-xdist workers in parallel)
SHARD, SHARDS = (int(x) for x in os.environ.get("SIM_CHECKS_SHARD", "0/1").split("/"))
_seen = 0


def check(label, fn):
    global passed, _seen
    _seen += 1
    if (ONLY and ONLY not in label) or (_seen - 1) % SHARDS != SHARD:
        return
    try:
        fn()
        passed += 1
    except Exception:
        failed.append(label)
        print(f"FAIL {label}\n{traceback.format_exc()}", flush=True)


def host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def run_update(name, options, steps, dtype, shapes, as_list, grad_scale=None):
    spec = specs.get_spec(name)
    hp = dict(spec.defaults, **options)
    active = spec.active_states(hp)
    rng = np.random.default_rng(len(shapes) + steps)
    n_used = max([k + 1 for k, a in enumerate(active) if a], default=0)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads_per_step = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    states = [[np.zeros(s, dtype) if active[k] else None for s in shapes] for k in range(n_used)]
    ref_p = [p.astype(np.float64) for p in params]
    ref_s = [[None if x is None else x.astype(np.float64) for x in st] for st in states]
    d_p = [cuda.to_device(p) for p in params]
    d_s = [[None if x is None else cuda.to_device(x) for x in st] for st in states]
    for t in range(1, steps + 1):
        d_g = [cuda.to_device(g) for g in grads_per_step[t - 1]]
        slot = (lambda xs: xs) if as_list else (lambda xs: xs[0])
        by_name = {spec.states[k]: (None if st[0] is None else slot(st)) for k, st in enumerate(d_s)}
        # the kernel's argument layout (a 4th state goes after the Kahan slot): the registry's planner
        state_args, names = spec.plan_call(hp, lambda state: by_name.get(state))
        arrays = (slot(d_p), slot(d_g)) + tuple(state_args)
        scale = grad_scale
        if isinstance(grad_scale, np.ndarray):  # a 0-d array on the (simulated) device
            scale = cuda.to_device(grad_scale)
        nb.step(spec, arrays, names, hp, t, scale)
        kw = {h.name: hp[h.name] for h in spec.hypers}
        if spec.uses_step:
            kw["step"] = t
        if grad_scale is not None:
            kw["grad_scale"] = float(grad_scale)
        for i in range(len(shapes)):
            reference.STEPS[name](ref_p[i], grads_per_step[t - 1][i].astype(np.float64),
                                  *[st[i] for st in ref_s], **kw)
    for i in range(len(shapes)):
        np.testing.assert_allclose(host(d_p[i]), ref_p[i], **TOL[dtype], err_msg=f"params[{i}]")
        for k, st in enumerate(d_s):
            if st[i] is not None:
                np.testing.assert_allclose(host(st[i]), ref_s[k][i], **TOL[dtype], err_msg=f"state{k}[{i}]")


for dtype in (np.float32, np.float64):
    for name, options, steps in CONFIGS:
        for shape in SINGLE_SHAPES:
            check(f"{name} {options} {dtype.__name__} single {shape}",
                  lambda: run_update(name, options, steps, dtype, [shape], False))
        check(f"{name} {options} {dtype.__name__} list",
              lambda: run_update(name, options, steps, dtype, LIST_SHAPES, True))
    # grad_scale as a float and as a 0-d device array (read by the kernel)
    for gs in (0.5, np.array(0.25, dtype=dtype), np.array(0.25, dtype=np.float64)):
        check(f"adam grad_scale={gs!r} {dtype.__name__}",
              lambda: run_update("adam", {}, 2, dtype, LIST_SHAPES, True, grad_scale=gs))
        check(f"lamb grad_scale={gs!r} {dtype.__name__}",
              lambda: run_update("lamb", {}, 2, dtype, [(37,)], False, grad_scale=gs))


def clip_checks(dtype):
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s).astype(dtype) * 3 for s in LIST_SHAPES]
    tol = TOL[dtype]

    d = [cuda.to_device(g) for g in grads]
    sq = nb.sumsq_per_tensor(d)
    np.testing.assert_allclose(host(sq), [reference.sumsq(g) for g in grads], rtol=1e-12)
    norm = nb.global_norm(sq)
    assert np.shape(host(norm)) == (), np.shape(host(norm))
    np.testing.assert_allclose(host(norm), reference.global_norm(grads), rtol=1e-12)

    for max_norm in (1.0, 1e6):  # clips / does not clip
        d = [cuda.to_device(g) for g in grads]
        total = nb.clip_by_global_norm(d, nb.sumsq_per_tensor(d), max_norm)
        ref_total = reference.global_norm(grads)
        coef = min(1.0, max_norm / (ref_total + 1e-6))
        np.testing.assert_allclose(host(total), ref_total, rtol=1e-12)
        for g, x in zip(grads, d):
            np.testing.assert_allclose(host(x), g * dtype(coef), **tol)

    d = [cuda.to_device(g) for g in grads]
    norms = nb.clip_by_norm(d, nb.sumsq_per_tensor(d), 2.0)
    for g, x, n in zip(grads, d, norms):
        ref = np.sqrt(reference.sumsq(g))
        np.testing.assert_allclose(host(n), ref, rtol=1e-12)
        np.testing.assert_allclose(host(x), g * dtype(min(1.0, 2.0 / (ref + 1e-6))), **tol)

    d = [cuda.to_device(g) for g in grads]
    nb.clamp_(d, 0.5)
    for g, x in zip(grads, d):
        np.testing.assert_array_equal(host(x), np.clip(g, -0.5, 0.5))

    d = [cuda.to_device(g) for g in grads]
    nb.scale_(d, 0.3)
    for g, x in zip(grads, d):
        np.testing.assert_allclose(host(x), g * dtype(0.3), **tol)

    # clip then update, the coefficient never leaving the device
    spec = specs.get_spec("adam")
    hp = dict(spec.defaults)
    p = rng.standard_normal(37).astype(dtype)
    g = rng.standard_normal(37).astype(dtype) * 10
    dp, dg = cuda.to_device(p), cuda.to_device(g)
    m, v = cuda.to_device(np.zeros_like(p)), cuda.to_device(np.zeros_like(p))
    total = nb.global_norm(nb.sumsq_per_tensor(dg))
    coef_host = min(1.0, 1.0 / (np.sqrt(reference.sumsq(g)) + 1e-6))
    coef_dev = cuda.to_device(np.array(coef_host))
    nb.step(spec, (dp, dg, m, v), ("params", "grads", "exp_avg", "exp_avg_sq"), hp, 1, coef_dev)
    rp, rm, rv = p.astype(np.float64), np.zeros(37), np.zeros(37)
    reference.adam_step(rp, g.astype(np.float64), rm, rv, step=1, grad_scale=coef_host)
    np.testing.assert_allclose(host(dp), rp, **tol)
    np.testing.assert_allclose(host(total), np.sqrt(reference.sumsq(g)), rtol=1e-12)


for dtype in (np.float32, np.float64):
    check(f"clipping {dtype.__name__}", lambda: clip_checks(dtype))


def errors_leave_arrays_unchanged():
    spec = specs.get_spec("adam")
    hp = dict(spec.defaults)
    p = cuda.to_device(np.ones(8, np.float32))
    g = cuda.to_device(np.ones(8, np.float32))
    m = cuda.to_device(np.zeros(8, np.float32))
    bad_v = cuda.to_device(np.zeros(7, np.float32))
    try:
        nb.step(spec, ([p], [g], [m], [bad_v]), ("params", "grads", "exp_avg", "exp_avg_sq"), hp, 1, None)
    except ValueError as e:
        assert "exp_avg_sq[0] has shape (7,), expected (8,)" in str(e), e
    else:
        raise AssertionError("no error for a shape mismatch")
    assert (host(p) == 1).all() and (host(m) == 0).all()
    try:
        nb.step(spec, (p, g, m, cuda.to_device(np.zeros(8, np.float64))),
                ("params", "grads", "exp_avg", "exp_avg_sq"), hp, 1, None)
    except TypeError as e:
        assert "expected float32" in str(e), e
    else:
        raise AssertionError("no error for a dtype mismatch")
    try:
        nb.step(spec, (p, g, m, p), ("params", "grads", "exp_avg", "exp_avg_sq"), hp, 1, None)
    except ValueError as e:
        assert "shares memory" in str(e), e
    else:
        raise AssertionError("no error for aliasing")
    assert (host(p) == 1).all()


check("errors leave arrays unchanged", errors_leave_arrays_unchanged)


def sqrt_all_covers_more_than_the_grid():
    """sqrt_all is grid-stride: launched with fewer threads than norms (the launcher caps the grid at
    1024 blocks, 262,144 threads on a GPU), every norm is still written."""
    n = 5 * 32 + 3  # one block of 32 threads
    sq = np.arange(n, dtype=np.float64)
    out = cuda.to_device(np.full(n, -1.0))
    nb._kernels(np.float64)["sqrt_all"][1, 32](cuda.to_device(sq), out)
    np.testing.assert_array_equal(host(out), np.sqrt(sq))


check("sqrt_all grid-stride", sqrt_all_covers_more_than_the_grid)


def list_of_views_in_any_order():
    """A list whose arrays are views of one buffer, in decreasing address order with gaps, next to a
    separate allocation: the table's offsets from each slot's lowest address reach every element, and
    the gaps are not written. Tensors of 70 and 130 elements span 2 and 3 chunks of 64."""
    spec = specs.get_spec("adam")
    hp = dict(spec.defaults)
    rng = np.random.default_rng(5)
    layout = [(200, 70), (3, 130), (140, 1)]  # (first element, size), the first one highest
    buffers = {k: rng.standard_normal(300).astype(np.float32) if k in "pg" else np.zeros(300, np.float32)
               for k in ("p", "g", "m", "v")}
    extra = {k: (rng.standard_normal(9) if k in "pg" else np.zeros(9)).astype(np.float32) for k in buffers}
    d = {k: cuda.to_device(b) for k, b in buffers.items()}
    d_extra = {k: cuda.to_device(x) for k, x in extra.items()}
    lists = {k: [d[k][s:s + n] for s, n in layout] + [d_extra[k]] for k in buffers}
    nb.step(spec, (lists["p"], lists["g"], lists["m"], lists["v"]), ("params", "grads", "exp_avg", "exp_avg_sq"),
            hp, 1, None)
    out = host(d["p"])
    for (start, n) in layout + [(None, 9)]:
        p = buffers["p"][start:start + n] if start is not None else extra["p"]
        g = buffers["g"][start:start + n] if start is not None else extra["g"]
        ref, m, v = p.astype(np.float64), np.zeros(n), np.zeros(n)
        reference.adam_step(ref, g.astype(np.float64), m, v, step=1)
        got = out[start:start + n] if start is not None else host(d_extra["p"])
        np.testing.assert_allclose(got, ref, **TOL[np.float32])
    gaps = np.ones(300, bool)
    for start, n in layout:
        gaps[start:start + n] = False
    np.testing.assert_array_equal(out[gaps], buffers["p"][gaps])


check("list of views of one buffer, any order", list_of_views_in_any_order)


def skipped_two_phase_step_writes_its_partials():
    """A skipped LAMB step: the moments kernel writes zero partials (the trust kernel reads only written
    memory; compute-sanitizer initcheck on a GPU), params and states keep their bytes."""
    spec = specs.get_spec("lamb")
    hp = dict(spec.defaults)
    rng = np.random.default_rng(6)
    shapes = [(70,), (5,)]
    d_p = [cuda.to_device(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    d_g = [cuda.to_device(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    d_m = [cuda.to_device(np.zeros(s, np.float32)) for s in shapes]
    d_v = [cuda.to_device(np.zeros(s, np.float32)) for s in shapes]
    before = [host(x).tobytes() for x in d_p + d_m + d_v]
    nchunks = 2 + 1
    poison = nb._scratch_array(0, 0, "partials", 2 * nchunks, np.float64)
    poison.copy_to_device(np.full(2 * nchunks, np.nan))
    flag = cuda.to_device(np.ones(1, np.uint8)).reshape(())
    nb.step(spec, (d_p, d_g, d_m, d_v), ("params", "grads", "exp_avg", "exp_avg_sq"), hp, 1, None, found_inf=flag)
    np.testing.assert_array_equal(host(nb._scratch_array(0, 0, "partials", 2 * nchunks, np.float64)), 0.0)
    assert [host(x).tobytes() for x in d_p + d_m + d_v] == before


check("skipped two-phase step writes its partials", skipped_two_phase_step_writes_its_partials)


# ---- device-side skipping: the skip flag read by every kernel, the guard, the optimizer classes ----

def skip_flag_leaves_arrays_unchanged(name, options, as_list):
    """One real step, then one with found_inf: set, params and state keep their bytes; clear, the same
    result as without a flag."""
    spec = specs.get_spec(name)
    hp = dict(spec.defaults, **options)
    active = spec.active_states(hp)
    n_used = max([k + 1 for k, a in enumerate(active) if a], default=0)
    shapes = LIST_SHAPES if as_list else [(37,)]
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]
    slot = (lambda xs: xs) if as_list else (lambda xs: xs[0])
    results, first = {}, None
    for flag in (None, 0, 1):
        d_p = [cuda.to_device(p) for p in params]
        d_s = [[cuda.to_device(np.zeros(s, np.float32)) if active[k] else None for s in shapes]
               for k in range(n_used)]
        by_name = {spec.states[k]: (None if st[0] is None else slot(st)) for k, st in enumerate(d_s)}
        states, names = spec.plan_call(hp, lambda state: by_name.get(state))  # the kernel's layout
        live = d_p + [x for st in d_s for x in st if x is not None]
        nb.step(spec, (slot(d_p), slot([cuda.to_device(g) for g in grads[0]])) + states, names, hp, 1, None)
        first = [host(x) for x in live]
        found_inf = None if flag is None else cuda.to_device(np.array([flag], np.uint8)).reshape(())
        nb.step(spec, (slot(d_p), slot([cuda.to_device(g) for g in grads[1]])) + states, names, hp, 2, None,
                found_inf=found_inf)
        results[flag] = [host(x) for x in live]
    for a, b in zip(results[1], first):
        assert a.tobytes() == b.tobytes(), "a skipped step wrote"
    for a, b in zip(results[0], results[None]):
        assert a.tobytes() == b.tobytes(), "a clear flag changed the result"
    assert any(a.tobytes() != b.tobytes() for a, b in zip(results[None], first)), "nothing was updated"


for name, options, _ in CONFIGS:
    for as_list in (False, True):
        check(f"skip flag {name} {options} list={as_list}",
              lambda: skip_flag_leaves_arrays_unchanged(name, options, as_list))


def guard_checks():
    from fastopt.clip import clip_coefficient
    rng = np.random.default_rng(3)
    sq_host = rng.random(5) * 10
    for max_norm in (None, 0.5, 1e9):
        for bad in (None, np.inf, np.nan):
            sq = sq_host.copy()
            if bad is not None:
                sq[2] = bad
            d_sq = cuda.to_device(sq)
            counter = nb.device_zeros(1, np.int64, d_sq).reshape(())
            for skip in (False, True):
                coef, flag = nb.step_guard(d_sq, max_norm, skip, counter if skip else None)
                total = float(np.sqrt(np.sum(sq)))
                if skip:
                    assert int(host(flag)) == (bad is not None), (max_norm, bad)
                else:
                    assert flag is None
                if max_norm is None:
                    assert coef is None
                elif skip and bad is not None:
                    assert float(host(coef)) == 1.0
                else:
                    expected = clip_coefficient(total, max_norm)
                    got = float(host(coef))
                    assert (np.isnan(got) and np.isnan(expected)) or abs(got - expected) <= 1e-15 * abs(expected)
            assert int(host(counter)) == (bad is not None)


check("step guard", guard_checks)


def optimizer_class_on_numba_arrays(name):
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    @contextlib.contextmanager
    def forbid_sync(message):
        real = FakeCUDAArray.copy_to_host

        def forbidden(*a, **k):
            raise AssertionError(message)
        FakeCUDAArray.copy_to_host = forbidden
        try:
            yield
        finally:
            FakeCUDAArray.copy_to_host = real

    device_class_check.run(name, cuda.to_device, host, forbid_sync, np.float64, TOL)


for name in device_class_check.OPTIMIZERS:
    check(f"optimizer class on device arrays {name}", lambda: optimizer_class_on_numba_arrays(name))


def steady_steps_allocate_nothing(name):
    """With the same gradient arrays, a class step (clip + skip, a bucket of empty arrays) allocates no
    device memory after the first: every Numba array made is later a deferred free, and Numba frees in
    batches that synchronise the device (seen on an H200: a LAMB step waited for the device)."""
    cls = getattr(fastopt, specs.get_spec(name).class_name)
    rng = np.random.default_rng(5)
    shapes, dtypes = device_class_check.SHAPES, [np.float32, np.float32, np.float64, np.float32, np.float64]
    params = [cuda.to_device(rng.standard_normal(s).astype(d)) for s, d in zip(shapes, dtypes)]
    grads = [cuda.to_device(rng.standard_normal(s).astype(d)) for s, d in zip(shapes, dtypes)]
    opt = device_class_check.make_optimizer(cls, params, 0.01, "numba")
    opt.step(grads)
    made = []
    real = {attr: getattr(cuda, attr) for attr in ("device_array", "to_device", "device_array_like", "pinned_array")}

    def counting(attr):
        return lambda *a, **k: made.append(attr) or real[attr](*a, **k)
    for attr in real:
        setattr(cuda, attr, counting(attr))
    try:
        for _ in range(3):
            opt.step(grads)
    finally:
        for attr, fn in real.items():
            setattr(cuda, attr, fn)
    assert not made, f"{name}: {made}"


for name in device_class_check.OPTIMIZERS:
    check(f"steady class steps allocate nothing {name}", lambda: steady_steps_allocate_nothing(name))

print(f"SIM CHECKS: {passed} passed, {len(failed)} failed", flush=True)
sys.exit(1 if failed else 0)
