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


# ---- 16-bit params and states (DESIGN.md "Precision"): bit for bit the NumPy reference's precision modes ----
try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # the bfloat16 rows need ml_dtypes (a test extra)
    BF16 = None
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
# (label, params, grads, state, rounding): 16-bit params with their own or float32 grads, 16-bit states of
# 16-bit and float32 params, Kahan-compensated and stochastically rounded params
PRECISION_CASES = [("fp16 params fp16 state", F16, F16, F16, None), ("fp32 params fp16 state", F32, F32, F16, None),
                   ("fp16 params stochastic", F16, F16, F32, "stochastic")] + ([
    ("bf16 params", BF16, BF16, F32, None), ("bf16 params fp32 grads", BF16, F32, F32, None),
    ("fp32 params bf16 state", F32, F32, BF16, None), ("bf16 params kahan", BF16, BF16, F32, "kahan"),
    ("bf16 params bf16 state fp32 grads stochastic", BF16, F32, BF16, "stochastic")] if BF16 is not None else [])


INT8 = "int8"  # the state dtype of 8-bit states (precision.QuantizedState) in run_precision


def run_precision(name, options, steps, pdtype, gdtype, sdtype, mode, shapes, as_list):
    """`steps` updates on the (simulated) device and by numpy_backend (the reference of the precision modes) from
    the same values: every array equal bit for bit (8-bit states: their codes and scales), every family with every
    rounding (Adan's fourth state beside the compensation, LAMB's apply pass). LARS's and LAMB's norms are float64
    sums in another order than the reference's, equal here (fixed seeds; sums of float32 squares of these sizes); a
    change that moves them would show."""
    from fastopt.backends import numpy_backend
    from fastopt.functional import with_kahan
    from fastopt.precision import QuantizedState, StochasticRounding, signed_state
    spec = specs.get_spec(name)
    hp = dict(spec.defaults, **options)
    int8 = isinstance(sdtype, str) and sdtype == INT8
    rng = np.random.default_rng([len(shapes), steps, pdtype.num, gdtype.num, 0 if int8 else sdtype.num, bool(mode)])
    params = [rng.standard_normal(s).astype(np.float32).astype(pdtype) for s in shapes]

    def zeros(state):  # states from zeros, as the optimizers start them (valid for every family: centered RMSprop's
        # square_avg must stay above grad_avg squared); after the first step they hold 16-bit or 8-bit values
        if int8:
            return [QuantizedState.from_float(np.zeros(s, np.float32), signed_state(state)) for s in shapes]
        return [np.zeros(s, sdtype) for s in shapes]

    def to_device(x):
        if isinstance(x, QuantizedState):
            return QuantizedState(cuda.to_device(x.codes), cuda.to_device(x.absmax), x.signed)
        return cuda.to_device(x)

    tail, names = spec.plan_call(hp, zeros)
    if mode == "kahan":
        tail, names = with_kahan(tuple(tail), names, [(rng.standard_normal(s) * 1e-3).astype(pdtype) for s in shapes])
    slot = (lambda xs: xs) if as_list else (lambda xs: xs[0])
    host_tail = [None if a is None else slot(a) for a in tail]
    dev_tail = [None if a is None else slot([to_device(x) for x in a]) for a in tail]
    d_p = [cuda.to_device(p) for p in params]
    for t in range(1, steps + 1):
        grads = [(rng.standard_normal(s) * 0.5).astype(np.float32).astype(gdtype) for s in shapes]
        stochastic = StochasticRounding(int(rng.integers(2 ** 62)), t, int(rng.integers(2 ** 40))) \
            if mode == "stochastic" else None
        device = (slot(d_p), slot([cuda.to_device(g) for g in grads]), *dev_tail)
        nb.step(spec, device, names, hp, t, 0.5, stochastic=stochastic)
        numpy_backend.step(spec, (slot(params), slot(grads), *host_tail), names, hp, t, 0.5, stochastic=stochastic)
    pairs, quantized = [(d, h) for d, h in zip(d_p, params)], 0
    for dt, ht in zip(dev_tail, host_tail):
        if dt is None:
            continue
        for d, h in zip(dt if as_list else [dt], ht if as_list else [ht]):
            if isinstance(h, QuantizedState):
                pairs += [(d.codes, h.codes), (d.absmax, h.absmax)]
                quantized += 1
            else:
                pairs.append((d, h))
    assert not int8 or quantized >= len(shapes) or not any(spec.active_states(hp))  # the 8-bit states compared
    for i, (d, h) in enumerate(pairs):
        got = host(d)
        assert got.tobytes() == h.tobytes(), \
            f"array {i} of the call differs in {int((got != h).sum())} of {h.size} elements"


for label, pdtype, gdtype, sdtype, mode in PRECISION_CASES:
    for name, options, steps in CONFIGS:
        check(f"{name} {options} {label} list", lambda: run_precision(name, options, steps, pdtype, gdtype, sdtype,
                                                                     mode, LIST_SHAPES, True))
    check(f"adam {label} single", lambda: run_precision("adam", {}, 2, pdtype, gdtype, sdtype, mode, [(37,)], False))


def conversions_equal_the_reference():
    """kernels/numba/precision.py's conversions, random bits and Kahan store on edge values (zeros, fp16
    subnormals and their ties, the overflow thresholds, Inf, NaN) and random ones, against fastopt.precision."""
    from fastopt import precision as fp
    from fastopt.kernels.numba import precision as nprec
    p = nprec.build()
    rng = np.random.default_rng(8)
    edges = np.array([0.0, -0.0, 1.0, -1.5, 5.96e-8, 2.98e-8, 8.9e-8, 6.1e-5, 6.103e-5, 65504.0, 65519.0, 65520.0,
                      1e5, np.inf, -np.inf, np.nan, 3.4e38, 1e-40, 1.00390625, 1.01171875], np.float32)
    x = np.concatenate([edges, -edges, rng.standard_normal(200).astype(np.float32) * np.float32(1e-5),
                        rng.standard_normal(200).astype(np.float32) * np.float32(300)])
    random = rng.integers(0, 2 ** 32, x.size, dtype=np.uint64)
    h16 = rng.integers(0, 2 ** 16, x.size, dtype=np.uint64).astype(np.uint16)
    index = rng.integers(0, 2 ** 40, x.size, dtype=np.int64)
    to_bf, to_bf_sr, from_bf = p["to_bits_bfloat16"], p["to_bits_sr_bfloat16"], p["to_float_bfloat16"]
    to_h, to_h_sr, from_h = p["to_bits_float16"], p["to_bits_sr_float16"], p["to_float_float16"]
    bits_of, kahan = p["random_bits"], p["kahan_store_bfloat16"]

    @cuda.jit
    def convert(x, r, h, index, c, out16, out32, outr):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            out16[0, i] = to_bf(x[i])
            out16[1, i] = to_bf_sr(x[i], r[i])
            out16[2, i] = to_h(x[i])
            out16[3, i] = to_h_sr(x[i], r[i])
            out32[0, i] = from_bf(h[i])
            out32[1, i] = from_h(h[i])
            outr[i] = bits_of(12345, index[i])
            pb, cb = kahan(from_bf(h[i]), from_bf(c[i]), x[i])
            out16[4, i] = pb
            out16[5, i] = cb

    out16 = np.zeros((6, x.size), np.uint16)
    out32 = np.zeros((2, x.size), np.float32)
    outr = np.zeros(x.size, np.int64)
    comp = fp.to_bf16(rng.standard_normal(x.size).astype(np.float32) * np.float32(1e-3))
    with np.errstate(invalid="ignore"):  # the Inf and NaN rows
        convert[4, 32](x, random.astype(np.int64), h16, index, comp, out16, out32, outr)
        pk, ck = fp.kahan_store(h16, comp, x)
    want16 = [fp.to_bf16(x), fp.to_bf16_sr(x, random.astype(np.uint32)), fp.to_fp16(x),
              fp.to_fp16_sr(x, random.astype(np.uint32)), pk, ck]
    for k, w in enumerate(want16):
        assert out16[k].tobytes() == np.asarray(w, np.uint16).tobytes(), f"16-bit result {k}"
    assert out32[0].tobytes() == fp.from_bf16(h16).tobytes() and out32[1].tobytes() == fp.from_fp16(h16).tobytes()
    assert (outr == fp.random_bits(12345, index.astype(np.uint64)).astype(np.int64)).all()


check("16-bit conversions, random bits and Kahan store equal fastopt.precision", conversions_equal_the_reference)


# ---- 8-bit state (state_dtype="int8"): the update_q8 kernels against the NumPy reference, codes and scales bit
# for bit, every family that takes it (several quantization blocks and chunks per tensor: the simulator's chunk is
# one block of 256), float32 and 16-bit params with every rounding ----

INT8_SHAPES = [(300,), (0,), (2, 3)]  # the simulator runs a Python thread per CUDA thread: small


def int8_families():
    from fastopt.precision import INT8_REFUSED
    return [(name, options, steps) for name, options, steps in CONFIGS if name not in INT8_REFUSED]


for name, options, steps in int8_families():
    check(f"{name} {options} int8 state list",
          lambda: run_precision(name, options, min(steps, 2), F32, F32, INT8, None, INT8_SHAPES, True))
check("adam int8 state single", lambda: run_precision("adam", {}, 3, F32, F32, INT8, None, [(513,)], False))
# 16-bit params with each rounding (Adam), and the per-tensor numbers (LARS) and a one-state family (SGD) with one
INT8_PRECISION = [("adam", {}, "fp16 params", F16, F16, None),
                  ("adam", {}, "fp16 params fp32 grads stochastic", F16, F32, "stochastic")] + ([
    ("adam", {}, "bf16 params", BF16, BF16, None), ("adam", {}, "bf16 params kahan", BF16, BF16, "kahan"),
    ("adam", {}, "bf16 params fp32 grads stochastic", BF16, F32, "stochastic"),
    ("lars", dict(lr=1.0, weight_decay=0.01), "bf16 params kahan", BF16, BF16, "kahan"),
    ("sgd", dict(lr=0.1, momentum=0.9), "bf16 params stochastic", BF16, BF16, "stochastic")]
    if BF16 is not None else [])
for name, options, label, pdtype, gdtype, mode in INT8_PRECISION:
    check(f"{name} int8 state {label}",
          lambda: run_precision(name, options, 2, pdtype, gdtype, INT8, mode, INT8_SHAPES, True))


def int8_refused_with_nothing_written():
    """The families whose state stays exact (precision.INT8_REFUSED: LAMB, Adan, ...) refuse 8-bit state by name
    before anything is written."""
    from fastopt.precision import INT8_REFUSED, QuantizedState, signed_state
    for name in INT8_REFUSED:
        spec = specs.get_spec(name)
        hp = dict(spec.defaults, **{h.name: 0.01 for h in spec.hypers if h.default is specs.REQUIRED})
        p = cuda.to_device(np.ones(300, np.float32))
        host_states = {}

        def quantized(state):
            q = QuantizedState.from_float(np.full(300, 0.5, np.float32), signed_state(state))
            host_states[state] = q
            return QuantizedState(cuda.to_device(q.codes), cuda.to_device(q.absmax), q.signed)
        tail, names = spec.plan_call(hp, quantized)
        device = dict(zip(names[2:], tail))
        try:
            nb.step(spec, (p, cuda.to_device(np.ones(300, np.float32)), *tail), names, hp, 1, None)
        except ValueError as e:
            assert "state_dtype='int8'" in str(e), e
        else:
            raise AssertionError(f"{name}: 8-bit state not refused")
        assert (host(p) == 1).all(), name
        for state, q in host_states.items():
            d = device[state]
            assert host(d.codes).tobytes() == q.codes.tobytes() and host(d.absmax).tobytes() == q.absmax.tobytes()


check("8-bit state refused by the exact-state optimizers, nothing written", int8_refused_with_nothing_written)


def precision_class_equals_the_host_class(pdtype, options):
    """fastopt.AdamW with precision options (`options`: state_dtype=, kahan=, stochastic_rounding=) on Numba device
    arrays (init_state makes the 16-bit, 8-bit and compensation states on the device) steps as the host class does,
    and its state dict (codes and scales of 8-bit states) is the host class's and loads back."""
    rng = np.random.default_rng(11)
    shapes = [(300,), (7,), (2, 260)]
    params = [rng.standard_normal(s).astype(np.float32).astype(pdtype) for s in shapes]
    d_params = [cuda.to_device(p) for p in params]
    kw = dict(lr=1e-2, weight_decay=0.1, seed=3, **options) if options.get("stochastic_rounding") else \
        dict(lr=1e-2, weight_decay=0.1, **options)
    host_opt = fastopt.AdamW(params, **kw)
    dev_opt = fastopt.AdamW(d_params, **kw)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32).astype(pdtype) for s in shapes]
        host_opt.step(grads)
        dev_opt.step([cuda.to_device(g) for g in grads])
    for d, h in zip(d_params, params):
        assert host(d).tobytes() == h.tobytes()
    want, got = host_opt.state_dict()["state"], dev_opt.state_dict()["state"]
    assert want.keys() == got.keys()
    for i in want:
        assert want[i].keys() == got[i].keys(), (want[i].keys(), got[i].keys())
        for key in want[i]:
            assert np.asarray(host(got[i][key])).tobytes() == np.asarray(want[i][key]).tobytes(), (i, key)
    again = fastopt.AdamW([cuda.to_device(p) for p in params], **kw)
    again.load_state_dict(dev_opt.state_dict())
    for i, entry in again.state_dict()["state"].items():
        for key in entry:
            assert np.asarray(host(entry[key])).tobytes() == np.asarray(want[i][key]).tobytes(), (i, key)


for pdtype, options in ((F32, dict(state_dtype="int8")), (F16, dict(state_dtype="int8", kahan=True)),
                        (F32, dict(state_dtype="float16")), (F16, dict(kahan=True)),
                        (F16, dict(stochastic_rounding=True))):
    check(f"AdamW {pdtype} {options} class on Numba arrays equals the host class",
          lambda: precision_class_equals_the_host_class(pdtype, options))


def clip_checks(dtype):
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s).astype(dtype) * 3 for s in LIST_SHAPES]
    tol = TOL[dtype]

    d = [cuda.to_device(g) for g in grads]
    sq = nb.sumsq_per_tensor(d)
    np.testing.assert_allclose(host(sq), [reference.sumsq(g) for g in grads], rtol=1e-12)
    out = cuda.to_device(np.zeros(len(grads) + 2))
    np.testing.assert_allclose(host(nb.sumsq_per_tensor(d, out=out[1:1 + len(grads)]))[:], host(sq), rtol=1e-12)
    for bad in (out, cuda.to_device(np.zeros(len(grads), np.float32))):  # the wrong length / dtype: refused
        before = host(bad).copy()
        try:
            nb.sumsq_per_tensor(d, out=bad)
        except ValueError as e:
            assert "out" in str(e), e
        else:
            raise AssertionError("a wrong out= was accepted")
        assert np.array_equal(host(bad), before)
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
