"""Launch every CUDA kernel fastopt has, on small arrays, on both GPU backends: the program that
`make gpu-check` runs under compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

    python3 tests/gpu/launch_all.py [--backends cupy,numba] [--list]

What runs is derived from the registry, not listed by hand, so a new optimizer or variant is covered
without an edit here:
- every optimizer of fastopt.specs.REGISTRY, with hyperparameters and steps chosen to select each of the
  kernel variants its spec compiles (spec.variants: the family table of fastopt/backends/cuda_source.py),
  in every dtype the backend supports (its DTYPES), as one array (16-byte aligned, and a misaligned view:
  the vector and the scalar path), and as a list (an empty tensor, a 2-d one, one of more than a
  multi-tensor chunk), with each grad_scale form (none, a float, a 0-d device array) and a skip flag
  that is clear and one that is set (the skip path; LAMB's two phases included);
- the weight-averaging kernels (fastopt.specs.KERNEL_OPS: ema_update, swa_update's copy and mean), in
  every dtype and layout;
- the norm, clip, scale, clamp and step-guard kernels in each form, and the CuPy backend's touch;
- then, on a real GPU, the public API on top: the optimizer classes with clip_grad_norm and
  skip_nonfinite (a NaN step skipped), the clip functions, and torch CUDA tensors when torch is there.
The backend-interface part is driven through an array factory, so tests/gpu/test_launch_all.py runs
it against the stand-in CuPy of test_cupy_launch_abi.py and checks that the launches cover every entry
point of cuda_source.kernel_names() and fit their C signatures.

Every call is tried even when one fails (one failure must not hide the sanitizer's view of the rest);
the failures are listed at the end and the exit status is 1 if there were any.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import traceback

import numpy as np

if __package__ in (None, ""):  # run as a script from a source checkout: import this checkout's fastopt
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fastopt.specs import REGISTRY, REQUIRED  # noqa: E402

BACKENDS = ("cupy", "numba")
SINGLE = 4099                                  # > one block, not a multiple of any vector width
LIST_CHUNK = 1 << 16                           # cuda_source.CHUNK: a tensor of more than one chunk
LIST_SHAPES = ((7,), (0,), (33, 5), (LIST_CHUNK + 5,))
STEPS = (1, 10, 1 << 21)                       # SGD's first step; RAdam (un)rectified; ASGD past t0 = 1e6


def backend_module(name):
    return importlib.import_module(f"fastopt.backends.{name}_backend")


def update_configs(spec) -> list:
    """(hp, step) pairs, one per compiled variant of the spec's kernel, found by trying the bool options
    (but maximize, a sign), each float option whose default is 0 at 0 and 0.1 (momentum, dampening, ...),
    and the steps of STEPS; RuntimeError naming the variants that no such configuration selects (then this
    search needs a new axis)."""
    axes = [(h.name, (False, True)) for h in spec.hypers if h.kind == "bool" and h.name != "maximize"]
    axes += [(h.name, (0.0, 0.1)) for h in spec.hypers if h.kind == "float" and h.default == 0.0 and h.name != "lr"]
    axes += [(h.name, (h.default, 0.0)) for h in spec.hypers if h.name == "momentum" and h.default != 0.0]  # LARS
    found: dict = {}
    for values in itertools.product(*(v for _, v in axes)):
        hp = dict(spec.defaults, **dict(zip((n for n, _ in axes), values)))
        if hp.get("lr") is REQUIRED:
            hp["lr"] = 0.01
        for step in STEPS:
            try:
                checked, step = spec.validate(hp, step)
            except ValueError:  # e.g. Nesterov without momentum
                continue
            found.setdefault(spec.variant(checked, step), (checked, step))
    missing = sorted(set(spec.variants) - set(found))
    if missing:
        raise RuntimeError(f"{spec.name}: no configuration selects variant(s) {missing} of kernel {spec.kernel}")
    return [found[v] for v in sorted(found)]


class Calls:
    """The calls of one run: each is tried, failures collected with their traceback."""

    def __init__(self, log=print):
        self.log, self.count, self.failures = log, 0, []

    def __call__(self, what, fn, *args, **kwargs):
        self.count += 1
        try:
            return fn(*args, **kwargs)
        except Exception:
            self.failures.append((what, traceback.format_exc()))
            self.log(f"FAILED {what}:\n{traceback.format_exc()}")
            return None


# ---------------------------------------------------------------------------------------------------
# Array factories: device arrays from host data
# ---------------------------------------------------------------------------------------------------

class CupyArrays:
    def __init__(self):
        import cupy
        self.cp = cupy
        # no memory pool: every array is its own allocation, so that the sanitizer sees an access past an
        # array's end (memcheck) or into memory nothing wrote (initcheck) instead of a recycled pool block
        cupy.cuda.set_allocator(None)

    def array(self, host):
        return self.cp.asarray(host)

    def misaligned(self, host):
        """A view of `host`'s values one element past a 16-byte boundary (the kernels' scalar path)."""
        pad = np.concatenate([np.zeros(1, host.dtype), host.ravel()])
        return self.cp.asarray(pad)[1:]

    def synchronize(self):
        self.cp.cuda.Device().synchronize()


class NumbaArrays:
    def __init__(self):
        from numba import cuda
        self.cuda = cuda

    def array(self, host):
        return self.cuda.to_device(np.array(host, order="C"))  # (ascontiguousarray would make a 0-d array 1-d)

    def misaligned(self, host):
        pad = np.concatenate([np.zeros(1, host.dtype), host.ravel()])
        return self.cuda.to_device(pad)[1:]

    def synchronize(self):
        self.cuda.synchronize()


FACTORIES = {"cupy": CupyArrays, "numba": NumbaArrays}


# ---------------------------------------------------------------------------------------------------
# The backend-interface sweep (also run against the stand-in CuPy)
# ---------------------------------------------------------------------------------------------------

def _state_dtype(dtype):
    """The default state dtype of `dtype` params: float32 for 16-bit ones (float16, bfloat16)."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def _host(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _update_arrays(make, rng, spec, hp, dtype, layout):
    """(arrays, names) for backend.step: params and grads random, the used states zero (as init_state
    makes them; the squared-moment states must not be negative)."""
    def one(shape, dt, random):
        host = _host(rng, shape, dt) if random else np.zeros(shape, dt)
        return make.misaligned(host) if layout == "misaligned" else make.array(host)

    shapes = LIST_SHAPES if layout == "list" else ((SINGLE,),)

    def arrays(dt, random):
        out = [one(s, dt, random) for s in shapes]
        return out if layout == "list" else out[0]

    params, grads = arrays(dtype, True), arrays(dtype, True)
    states, names = spec.plan_call(hp, lambda name: arrays(_state_dtype(dtype), False))
    return (params, grads, *states), names


LAYOUTS = ("single", "misaligned", "list")
QUICK_LAYOUTS = ("single", "list")  # still every entry point (single and multi), skip path included


def sweep_updates(backend, make, dtypes, calls, rng, quick=False):
    """Every optimizer x variant x dtype x layout, each grad_scale form, the skip flag clear and set
    (quick: one aligned array and a list, with no grad_scale and with a device one and the flag set)."""
    for dtype in dtypes:
        device_scale = make.array(np.asarray(0.5, dtype=dtype))
        clear, set_ = make.array(np.zeros(1, np.uint8)), make.array(np.ones(1, np.uint8))
        for spec in REGISTRY.values():
            for (hp, step), layout in itertools.product(update_configs(spec), QUICK_LAYOUTS if quick else LAYOUTS):
                arrays, names = _update_arrays(make, rng, spec, hp, dtype, layout)
                forms = ((None, None), (device_scale, set_)) if quick else \
                    ((None, None), (0.5, clear), (device_scale, set_))
                for grad_scale, found_inf in forms:
                    what = (f"{backend} {np.dtype(dtype).name} {spec.name} variant {spec.variant(hp, step)} {layout} "
                            f"grad_scale={type(grad_scale).__name__} skip={'set' if found_inf is set_ else found_inf is not None}")
                    calls(what, backend_module(backend).step, spec, arrays, names, hp, step, grad_scale, found_inf)


def sweep_averaging(backend, make, dtypes, calls, rng, quick=False):
    """The weight-averaging kernels (specs.KERNEL_OPS: fastopt.ema_update / swa_update), every mode, dtype
    and layout (quick: one aligned array and a list)."""
    import fastopt
    for dtype in dtypes:
        for layout in QUICK_LAYOUTS if quick else LAYOUTS:
            shapes = LIST_SHAPES if layout == "list" else ((SINGLE,),)
            build = make.misaligned if layout == "misaligned" else make.array
            averages = [build(_host(rng, s, dtype)) for s in shapes]
            params = [build(_host(rng, s, dtype)) for s in shapes]
            if layout != "list":
                averages, params = averages[0], params[0]
            what = f"{backend} {np.dtype(dtype).name} {layout}"
            calls(f"{what} ema_update", fastopt.ema_update, averages, params, 0.9, backend=backend)
            for n in (0, 3):  # 0: the copy of the first model, then the running mean
                calls(f"{what} swa_update(n_averaged={n})", fastopt.swa_update, averages, params, n, backend=backend)


def sweep_reductions(backend, make, dtypes, calls, rng):
    """Norms, clipping, scaling, clamping and the step guard, one array and a list; touch on CuPy."""
    be = backend_module(backend)
    for dtype in dtypes:
        name = f"{backend} {np.dtype(dtype).name}"
        for layout in ("single", "list"):
            shapes = LIST_SHAPES if layout == "list" else ((SINGLE,),)
            grads = [make.array(_host(rng, s, dtype)) for s in shapes]
            grads = grads if layout == "list" else grads[0]
            n = len(shapes)
            sq = calls(f"{name} sumsq_per_tensor {layout}", be.sumsq_per_tensor, grads)
            buffer = be.device_zeros(n + 3, np.float64, grads[0] if layout == "list" else grads)
            calls(f"{name} sumsq_per_tensor(out=) {layout}", be.sumsq_per_tensor, grads, out=buffer[2:2 + n])
            if sq is None:
                continue
            norm = calls(f"{name} global_norm {layout}", be.global_norm, sq)
            if norm is not None:
                calls(f"{name} clip_coefficient {layout}", be.clip_coefficient, norm, 1.0)
            calls(f"{name} clip_by_global_norm {layout}", be.clip_by_global_norm, grads, sq, 1.0)
            calls(f"{name} clip_by_norm {layout}", be.clip_by_norm, grads, sq, 1.0)
            calls(f"{name} scale_(float) {layout}", be.scale_, grads, 0.5)
            calls(f"{name} scale_(device 0-d) {layout}", be.scale_, grads, make.array(np.asarray(2.0, np.float64)))
            calls(f"{name} clamp_ {layout}", be.clamp_, grads, 0.1)
        like = make.array(np.zeros(1, dtype))
        sq_host = np.abs(_host(rng, 4, np.float64))
        for max_norm, skip, counted, nonfinite in itertools.product((None, 1.0), (False, True), (False, True),
                                                                    (False, True)):
            sq = make.array(np.where(np.arange(4) == 2, np.nan, sq_host) if nonfinite else sq_host)
            skipped = be.device_zeros(1, np.int64, like).reshape(()) if counted else None
            calls(f"{name} step_guard(max_norm={max_norm}, skip={skip}, counted={counted}, nan={nonfinite})",
                  be.step_guard, sq, max_norm, skip, skipped)
        if hasattr(be, "select_scalars"):  # capturable steps: two groups, one steady, one run past its 4 rows
            rows = make.array(_host(rng, 2 * 4 * 16, np.float64))
            meta = make.array(np.array([3 | (1 << 62), 0, 4, 0], np.int64))
            counters = be.device_zeros(2, np.int64, like)
            out = be.device_zeros(32, np.float64, like)
            flag, overflow = be.device_zeros(1, np.uint8, like).reshape(()), be.device_zeros(1, np.int64, like)
            for t in range(1, 7):
                calls(f"{name} select_scalars(step {t}, own flag {t % 2})", be.select_scalars, rows, 4, meta, counters,
                      out, flag, t % 2 == 1, overflow, like)
        if backend == "cupy" and "fo_touch" in _cuda_entry_points():  # the CuPy module's bandwidth kernel
            for k in range(2, 6):
                arrays = [make.array(_host(rng, SINGLE, dtype if i < 2 else _state_dtype(dtype))) for i in range(k)]
                calls(f"{name} touch({k} arrays)", be.touch, arrays)


def sweep_precision(backend, make, dtypes, calls, rng, quick=False):
    """The CuPy backend's precision modules (cuda_source.module_key): 16-bit states of float32 and 16-bit
    params, the Kahan and stochastic stores of 16-bit params, and float32 grads of 16-bit params (FASTOPT_GRAD),
    every elementwise optimizer the modes apply to (not LAMB's two phases nor Adan's fourth state), each in its
    first configuration, one array (the single-array kernel; Kahan: the table) and a list. quick: five of the
    modules (each compiles for seconds) and three optimizers, for the sanitizer's budget."""
    if backend != "cupy":
        return
    from fastopt.functional import with_kahan
    from fastopt.precision import StochasticRounding
    sixteen = [np.dtype(d) for d in dtypes if np.dtype(d).itemsize == 2]
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    plans = [(f32, d, None, f32) for d in sixteen] + [
        (d, s, mode, d) for d in sixteen for s in (f32, d) for mode in (None, "kahan", "stochastic")] + [
        (d, f32, mode, f32) for d in sixteen for mode in (None, "kahan")]  # float32 grads of 16-bit params
    if quick:
        plans = [p for p in plans if p[:3] in ((f32, f16, None), (f16, f32, "kahan"), (f16, f16, "stochastic")) and (
            p[3] == p[0]) or (p[0].name == "bfloat16" and p[1] == p[0] and p[2] == "kahan") or (
            p[0].name == "bfloat16" and p[3] == f32 and p[2] is None)]
    for dtype, sdtype, mode, gdtype in plans:
        if mode is None and sdtype == _state_dtype(dtype) and gdtype == dtype:
            continue  # the default state: sweep_updates
        for spec in REGISTRY.values():
            if mode is not None and (spec.two_phase or len(spec.states) > 3):
                continue
            if quick and spec.name not in ("adam", "sgd", "lion"):
                continue
            hp, step = update_configs(spec)[0]
            for layout in QUICK_LAYOUTS:
                shapes = LIST_SHAPES if layout == "list" else ((SINGLE,),)

                def arrays(dt, random, shapes=shapes, layout=layout):
                    out = [make.array(_host(rng, s, dt) if random else np.zeros(s, dt)) for s in shapes]
                    return out if layout == "list" else out[0]
                params, grads = arrays(dtype, True), arrays(gdtype, True)
                states, names = spec.plan_call(hp, lambda name: arrays(sdtype, False))
                tail, stochastic = tuple(states), None
                if mode == "kahan":
                    tail, names = with_kahan(tail, names, arrays(dtype, False))
                elif mode == "stochastic":
                    stochastic = StochasticRounding(int(rng.integers(2 ** 32)), step)
                what = (f"{backend} {dtype.name} params, {gdtype.name} grads, {sdtype.name} state"
                        f"{', ' + mode if mode else ''} {spec.name} variant {spec.variant(hp, step)} {layout}")
                calls(what, backend_module(backend).step, spec, (params, grads, *tail), names, hp, step, None, None,
                      stochastic)


def sweep_int8(backend, make, dtypes, calls, rng, quick=False):
    """The CuPy backend's 8-bit state (state_dtype="int8": the int8 modules' _q8 kernels) for float32 and 16-bit
    params: every variant of every optimizer that takes it, one array and a list, with a device grad_scale and
    the skip flag clear, rounded to nearest (and for 16-bit params Kahan-compensated, stochastically rounded and
    with float32 grads, one configuration each). quick: a list only, to nearest (still every _q8 entry point)."""
    if backend != "cupy":
        return
    from fastopt.functional import with_kahan
    from fastopt.precision import INT8_REFUSED, QuantizedState, StochasticRounding, signed_state
    for dtype in (np.dtype(d) for d in dtypes if np.dtype(d).itemsize in (2, 4)):
        device_scale = make.array(np.asarray(0.5, dtype=np.float32))
        clear = make.array(np.zeros(1, np.uint8))
        for spec in REGISTRY.values():
            if not spec.states or spec.two_phase or spec.name in INT8_REFUSED:
                continue
            modes = (None,) if quick or dtype.itemsize == 4 else (None, "kahan", "stochastic", "float32 grads")
            layouts = ("list",) if quick else QUICK_LAYOUTS
            for ((hp, step), layout, mode) in itertools.product(update_configs(spec), layouts, modes):
                if mode is not None and (hp, step) != update_configs(spec)[0]:
                    continue
                shapes = LIST_SHAPES if layout == "list" else ((SINGLE,),)

                def arrays(dt, shapes=shapes, layout=layout):
                    out = [make.array(_host(rng, s, dt)) for s in shapes]
                    return out if layout == "list" else out[0]

                def quantized(name, shapes=shapes, layout=layout):
                    out = []
                    for s in shapes:
                        q = QuantizedState.from_float(np.abs(_host(rng, s, np.float32)), signed_state(name))
                        out.append(QuantizedState(make.array(q.codes), make.array(q.absmax), q.signed))
                    return out if layout == "list" else out[0]
                states, names = spec.plan_call(hp, quantized)
                tail, stochastic = tuple(states), None
                if mode == "kahan":
                    tail, names = with_kahan(tail, names, arrays(dtype))
                elif mode == "stochastic":
                    stochastic = StochasticRounding(int(rng.integers(2 ** 32)), step)
                what = (f"{backend} {dtype.name} params, int8 state{', ' + mode if mode else ''} {spec.name} "
                        f"variant {spec.variant(hp, step)} {layout}")
                grads = arrays(np.dtype(np.float32) if mode == "float32 grads" else dtype)
                calls(what, backend_module(backend).step, spec, (arrays(dtype), grads, *tail), names, hp, step,
                      device_scale, clear, stochastic)


def _cuda_entry_points():
    from fastopt.backends import cuda_source
    return cuda_source.kernel_names()


def sweep_backend(backend, make, dtypes=None, log=print, seed=None, quick=False, calls=None) -> Calls:
    rng = np.random.default_rng(seed)
    dtypes = backend_module(backend).DTYPES if dtypes is None else dtypes
    calls = Calls(log) if calls is None else calls
    sweep_updates(backend, make, dtypes, calls, rng, quick)
    sweep_averaging(backend, make, dtypes, calls, rng, quick)
    sweep_reductions(backend, make, dtypes, calls, rng)
    sweep_precision(backend, make, dtypes, calls, rng, quick)
    sweep_int8(backend, make, dtypes, calls, rng, quick)
    return calls


# ---------------------------------------------------------------------------------------------------
# The public API on top (real GPU only)
# ---------------------------------------------------------------------------------------------------

def public_api(backend, make, calls, rng, dtypes=None):
    import fastopt
    for dtype in backend_module(backend).DTYPES if dtypes is None else dtypes:
        name = f"{backend} {np.dtype(dtype).name}"
        params = [make.array(_host(rng, s, dtype)) for s in LIST_SHAPES]
        capturable = (False, True) if backend == "cupy" else (False,)  # True: the kernels read device scalars
        for cls, cap in itertools.product((fastopt.Adam, fastopt.LAMB, fastopt.SGD), capturable):
            kwargs = {"lr": 1e-3, "clip_grad_norm": 1.0, "skip_nonfinite": True, "backend": backend,
                      "capturable": cap}
            opt = calls(f"{name} {cls.__name__}(clip_grad_norm, skip_nonfinite)", cls, params, **kwargs)
            if opt is None:
                continue
            for t in range(3):
                host = [_host(rng, s, dtype) for s in LIST_SHAPES]
                if t == 1:
                    host[-1][3] = np.nan  # this step is skipped on the device
                calls(f"{name} {cls.__name__}.step {t}", opt.step, [make.array(h) for h in host])
            skipped = calls(f"{name} {cls.__name__}.skipped_steps", lambda: opt.skipped_steps)
            if skipped is not None and skipped != 1:
                calls.failures.append((f"{name} {cls.__name__}", f"skipped_steps {skipped}, expected 1"))
        grads = [make.array(_host(rng, s, dtype)) for s in LIST_SHAPES]
        calls(f"{name} fastopt.global_norm", fastopt.global_norm, grads)
        calls(f"{name} fastopt.clip_by_global_norm", fastopt.clip_by_global_norm, grads, 1.0)
        calls(f"{name} fastopt.clip_by_norm", fastopt.clip_by_norm, grads, 1.0)
        calls(f"{name} fastopt.clip_by_value", fastopt.clip_by_value, grads, 0.1)
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    p, g = (torch.randn(SINGLE, device="cuda") for _ in range(2))
    state = calls(f"{backend} torch tensors init_state", fastopt.init_state, "adam", p)
    if state is not None:
        calls(f"{backend} torch tensors adam_step", fastopt.adam_step, p, g, **state, step=1, backend=backend)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated GPU backends (default: cupy,numba)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer layouts and grad_scale forms (every kernel still launched; for racecheck/synccheck)")
    parser.add_argument("--list", action="store_true", help="print the update configurations and exit (no GPU)")
    args = parser.parse_args(argv)
    # torch's caching allocator off, for the same reason as CuPy's pool (read when torch initialises CUDA)
    os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backends: unknown {unknown or args.backends!r}; choose from {', '.join(BACKENDS)}")
    if args.list:
        for spec in REGISTRY.values():
            for hp, step in update_configs(spec):
                changed = {k: v for k, v in hp.items() if v != spec.defaults.get(k)}
                print(f"{spec.name:>10} variant {spec.variant(hp, step)} step {step} {changed}")
        return 0
    failures, total = [], 0
    for backend in backends:
        try:
            make = FACTORIES[backend]()
        except Exception:  # e.g. numba-cuda failing to import: the other backend still runs
            failures.append((f"{backend}: cannot create device arrays", traceback.format_exc()))
            print(f"launch_all: {backend}: cannot create device arrays:\n{traceback.format_exc()}", flush=True)
            continue
        calls = Calls()
        try:
            sweep_backend(backend, make, quick=args.quick, calls=calls)
            public_api(backend, make, calls, np.random.default_rng())
        except Exception:  # outside a single call (array creation, the configuration search): stop this backend
            calls.failures.append((f"{backend}: sweep stopped", traceback.format_exc()))
            print(f"launch_all: {backend}: sweep stopped:\n{traceback.format_exc()}", flush=True)
        try:
            make.synchronize()  # a launch that failed asynchronously reports here
        except Exception:
            calls.failures.append((f"{backend} synchronize", traceback.format_exc()))
        print(f"launch_all: {backend}: {calls.count} calls, {len(calls.failures)} failed", flush=True)
        failures += calls.failures
        total += calls.count
    for what, _ in failures:
        print(f"launch_all: FAILED {what}")
    print(f"launch_all: {total} calls on {', '.join(backends)}: {'OK' if not failures else f'{len(failures)} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
