"""Adafactor step time: fastopt.Adafactor (NumPy), fastopt.torch.Adafactor and torch.optim.Adafactor
(foreach=False and True), float32, on 768x3072, 4x1024x1024 and a 1-D 1e6 param, against the cost
model of fastopt.adafactor (5 itemsizes per element for a factored param, 8 for a vector): 'pattern' is
that memory traffic with trivial math (NumPy dot products and p += g over the same arrays), 'frac' its
time over fastopt's.

    python bench/bench_adafactor.py [--repeat 15] [--threads 1,2] [--json out.json]

Each implementation is timed `repeat` times after 3 warm-up steps, round-robin (the machine may be
shared); min and median are reported, speedups from the mins.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

SHAPES = [(768, 3072), (4, 1024, 1024), (1_000_000,)]


def _timings(fns, repeat):
    """Per name: (min, median) seconds of one call; the calls interleaved round by round, so that a
    disturbance on the shared machine hits every implementation alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def bench(shape, repeat, dtype=np.float32):
    import torch

    import fastopt
    import fastopt.torch as ftorch

    rng = np.random.default_rng(0)
    init = rng.standard_normal(shape).astype(dtype)
    grad = rng.standard_normal(shape).astype(dtype)
    n = init.size
    s = init.itemsize
    factored = len(shape) > 1
    fns = {}
    p = init.copy()
    opt = fastopt.Adafactor([p], weight_decay=0.01)
    fns["fastopt_numpy"] = lambda: opt.step([grad])
    for name, cls, kw in (("fastopt_torch", ftorch.Adafactor, {}),
                          ("torch_foreach_false", torch.optim.Adafactor, {"foreach": False}),
                          ("torch_foreach_true", torch.optim.Adafactor, {"foreach": True})):
        tp = torch.tensor(init.copy(), requires_grad=True)
        tp.grad = torch.tensor(grad)
        fns[name] = cls([tp], weight_decay=0.01, **kw).step
    # the cost model's memory traffic with trivial math, over the same arrays (the byte-count ceiling):
    # factored: read g and p (two dot products), then read g and p and write p (p += g) = 5 s per element;
    # vector: read g, v, p and write v, then read g, v, p and write p = 8 s per element
    a, b, v = init.copy(), grad.copy(), np.abs(grad)
    if factored:
        def pattern():
            np.dot(b.reshape(-1), b.reshape(-1)), np.dot(a.reshape(-1), a.reshape(-1))
            np.add(a, b, out=a)
    else:
        def pattern():
            np.add(v, b, out=v), np.dot(a, a)
            np.dot(v, v), np.add(a, b, out=a)
    fns["pattern"] = pattern
    t = _timings(fns, repeat)
    model = (5 if factored else 8) * s
    row = {"shape": list(shape), "dtype": np.dtype(dtype).name, "elements": n, "model_bytes_per_element": model,
           "pattern_GBps": model * n / t["pattern"][0] / 1e9}
    for name, (tmin, tmed) in t.items():
        row[f"{name}_ms_min"], row[f"{name}_ms_median"] = tmin * 1e3, tmed * 1e3
    row["fraction_of_pattern"] = t["pattern"][0] / t["fastopt_numpy"][0]
    for ref in ("torch_foreach_false", "torch_foreach_true"):
        row[f"speedup_vs_{ref}_min"] = t[ref][0] / t["fastopt_numpy"][0]
        row[f"speedup_vs_{ref}_median"] = t[ref][1] / t["fastopt_numpy"][1]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", default=None,
                    help="torch thread counts to run, comma-separated (default: torch's own)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    # checked before the run: each would end in a traceback (min() of no times, int() or torch's thread count)
    if args.repeat < 1:
        ap.error(f"argument --repeat: invalid number of repeats {args.repeat} (>= 1)")
    try:
        counts = [int(x) for x in args.threads.split(",")] if args.threads else None
        if counts is not None and (not counts or min(counts) < 1):
            raise ValueError
    except ValueError:
        ap.error(f"argument --threads: invalid thread counts {args.threads!r} (comma-separated integers >= 1)")
    import torch
    counts = counts or [torch.get_num_threads()]
    runs = []
    for threads in counts:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        rows = [bench(shape, args.repeat) for shape in SHAPES]
        runs.append({"torch_threads": threads, "load_before": load, "load_after": os.getloadavg()[0],
                     "rows": rows})
        print(f"ms per step, float32, min / median of {args.repeat} interleaved rounds, torch threads {threads}, "
              f"load {load:.1f}; 'pattern': the cost model's traffic with trivial math")
        print(f"{'shape':>14} {'B/el':>4} {'fastopt':>13} {'fastopt.torch':>13} {'torch loop':>13} "
              f"{'torch foreach':>13} {'pattern':>6} {'frac':>5} {'x loop':>6} {'x fe':>6}")
        for r in rows:
            cell = [f"{r[k + '_ms_min']:6.2f}/{r[k + '_ms_median']:<6.2f}"
                    for k in ("fastopt_numpy", "fastopt_torch", "torch_foreach_false", "torch_foreach_true")]
            print(f"{'x'.join(map(str, r['shape'])):>14} {r['model_bytes_per_element']:4d} {' '.join(cell)} "
                  f"{r['pattern_ms_min']:6.2f} {r['fraction_of_pattern']:5.2f} "
                  f"{r['speedup_vs_torch_foreach_false_min']:6.2f} {r['speedup_vs_torch_foreach_true_min']:6.2f}")
    if args.json:
        from fastopt.benchmark import machine_info
        meta = {"machine": machine_info(), "repeat": args.repeat, "note": "fastopt.Adafactor runs NumPy ufuncs (one thread) and BLAS"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
