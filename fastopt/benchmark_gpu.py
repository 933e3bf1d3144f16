"""GPU benchmark (`fastopt bench --device gpu`, bench/bench_gpu.py): every optimizer, fp32, one array of N
elements and a list of 200 transformer-like arrays, for fastopt-cupy, fastopt-numba, torch.optim fused
and foreach, against the measured bandwidth of a kernel with the same read/write pattern and trivial
math (cupy_backend.touch). CUDA events, warm-up, median of the repeats. Writes JSON with the device name.
Needs a CUDA GPU with CuPy (torch and numba optional)."""
from __future__ import annotations

import platform
import statistics

import numpy as np

from fastopt.specs import REGISTRY

TORCH_CLASSES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW",
                 "nadam": "NAdam", "radam": "RAdam"}


def transformer_shapes(n_arrays=200, d=1024):
    """A list of n_arrays shapes like a transformer's parameters (attention, MLP, norms, biases)."""
    block = [(d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [block[i % len(block)] for i in range(n_arrays)]


def _time(cp, fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return statistics.median(times)


def _case(cp, name, shapes, repeats, backends):
    import fastopt
    spec = REGISTRY[name]
    hp = dict(spec.defaults)
    if name == "sgd":
        hp.update(lr=0.01, momentum=0.9)
    ps = [cp.random.standard_normal(s, dtype=cp.float32) for s in shapes]
    gs = [cp.random.standard_normal(s, dtype=cp.float32) for s in shapes]
    state = fastopt.init_state(name, ps, **({"momentum": 0.9} if name == "sgd" else {}))
    single = len(shapes) == 1
    pick = (lambda x: x[0]) if single else (lambda x: x)
    kw = {h.name: hp[h.name] for h in spec.hypers}
    if spec.uses_step:
        kw["step"] = 2
    n = sum(int(np.prod(s)) for s in shapes)
    nbytes = n * spec.bytes_per_element(hp, 4)
    row = {"optimizer": name, "elements": n, "arrays": len(shapes), "bytes": nbytes}
    fn = getattr(fastopt, spec.function_name)
    for backend in backends:
        t = _time(cp, lambda: fn(pick(ps), pick(gs), **{k: pick(v) for k, v in state.items()}, backend=backend, **kw),
                  repeats)
        row[f"fastopt-{backend}_s"] = t
        row[f"fastopt-{backend}_GBps"] = nbytes / t / 1e9
    if single:  # bandwidth ceiling: same traffic, trivial math
        from fastopt.backends import cupy_backend
        arrays = [ps[0], gs[0]] + [v for v in state.values()]
        t = _time(cp, lambda: cupy_backend.touch(arrays), repeats)
        row["touch_GBps"] = (n * 4 * (2 * len(arrays) - 1)) / t / 1e9
    try:
        import torch
    except ImportError:
        return row
    cls = TORCH_CLASSES.get(name)
    if cls and torch.cuda.is_available():
        tp = [torch.as_tensor(p, device="cuda") for p in ps]
        for p, g in zip(tp, gs):
            p.grad = torch.as_tensor(g, device="cuda")
        targs = {"lr": hp["lr"]}
        for mode in ("fused", "foreach"):
            try:
                opt = getattr(torch.optim, cls)(tp, **targs, **{mode: True})
            except (TypeError, RuntimeError, ValueError):
                continue
            row[f"torch-{mode}_s"] = _time(cp, opt.step, repeats)
    return row


def _class_case(cp, shapes, repeats, backend):
    """fastopt.Adam.step on a list: plain, and with clip_grad_norm + skip_nonfinite (target: at most one
    extra read of the gradients, i.e. <= (bytes + grad bytes) / bytes of the plain step). GPU time by
    CUDA events; host time = wall time of the step() call alone (launch and Python overhead: with no
    host synchronisation inside step it does not wait for the GPU)."""
    import time

    import fastopt
    ps = [cp.random.standard_normal(s, dtype=cp.float32) for s in shapes]
    gs = [cp.random.standard_normal(s, dtype=cp.float32) for s in shapes]
    n = sum(int(np.prod(s)) for s in shapes)
    nbytes = n * REGISTRY["adam"].bytes_per_element(dict(REGISTRY["adam"].defaults), 4)
    row = {"case": "Adam class step", "backend": backend, "elements": n, "arrays": len(shapes), "bytes": nbytes,
           "model_ratio_clip_skip": (nbytes + 4 * n) / nbytes}
    for label, options in (("plain", {}), ("clip_skip", dict(clip_grad_norm=1.0, skip_nonfinite=True))):
        opt = fastopt.Adam(ps, lr=1e-3, backend=backend, **options)
        row[f"{label}_s"] = _time(cp, lambda: opt.step(gs), repeats)
        host = []
        for _ in range(repeats):
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            opt.step(gs)
            host.append(time.perf_counter() - t0)
        row[f"{label}_host_us"] = statistics.median(host) * 1e6
    row["ratio_clip_skip"] = row["clip_skip_s"] / row["plain_s"]
    return row


def main(args):
    import cupy as cp
    # args as parsed by fastopt.cli: sizes and optimizers are checked lists; the GPU was checked there too
    sizes = list(args.sizes) if args.sizes else \
        ([1 << 20, 1 << 24] if args.quick else [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28])
    names = list(args.optimizers) if args.optimizers else list(REGISTRY)
    repeats = args.repeats or (5 if args.quick else 50)
    backends = ["cupy"]
    try:
        import numba  # noqa: F401
        backends.append("numba")
    except ImportError:
        pass
    props = cp.cuda.runtime.getDeviceProperties(0)
    device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    rows = []
    for name in names:
        for n in sizes:
            rows.append(_case(cp, name, [(n,)], repeats, backends))
        rows.append(_case(cp, name, transformer_shapes(20 if args.quick else 200), repeats, backends))
    classes = []
    for backend in backends:
        for shapes in ([(1 << 24,)], transformer_shapes(20 if args.quick else 200)):
            try:
                classes.append(_class_case(cp, shapes, repeats, backend))
            except Exception as e:  # one failing case must not lose the rest of a scarce GPU run
                classes.append({"case": "Adam class step", "backend": backend, "arrays": len(shapes),
                                "error": f"{type(e).__name__}: {e}"})
    result = {"device": device, "python": platform.python_version(), "cupy": cp.__version__, "results": rows,
              "optimizer_classes": classes}
    from fastopt.cli_args import dumps, write_json
    if args.out:
        write_json(args.out, result)
    if args.json:
        print(dumps(result))
    else:
        print(f"device: {device}")
        for r in rows:
            cells = [f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float)]
            print(f"{r['optimizer']:>10} n={r['elements']:>10} arrays={r['arrays']:>3} " + " ".join(cells))
        for r in classes:
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return 0
