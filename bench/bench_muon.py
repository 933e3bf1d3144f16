"""Muon step time vs the time of its matmuls alone, and torch.optim.Muon's, on GPT-2-like shapes (CPU).

    python bench/bench_muon.py [--shapes 768x768,768x3072,3072x768] [--repeat 7] [--threads N] [--json PATH]

For each shape, float32, ns_steps=5, nesterov (torch's defaults):
  step    one fastopt.Muon step (NumPy arrays): momentum lerp, nesterov, the bfloat16 Newton-Schulz
          iteration, weight decay and the update
  matmul  the same 15 matmuls alone (X X^T, G G, V X per iteration on the step's own work arrays, float32
          BLAS), i.e. the 2 * ns_steps * 3-matmul flops of the cost model and nothing else
  ratio   step / matmul (the target is <= 1.2: the elementwise passes cost at most 20 % on top)
  torch   one torch.optim.Muon step on the same data (bfloat16 matmuls through oneDNN/MKL)
Each time is the least disturbed of --repeat runs (min), the three interleaved, after one warm-up. torch and NumPy's BLAS use --threads threads
(default: torch's current count).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastopt.muon import Muon, Workspace  # noqa: E402


def _best_times(fns, repeat):
    """The least disturbed time of each callable (min over `repeat` runs, after one warm-up each), the
    callables interleaved so that a shared machine's load hits all of them alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _matmuls_alone(shape, ns_steps):
    """The step's 3 * ns_steps matmuls alone, as the step calls them (X in the param's orientation; a tall X
    is multiplied through its transpose), on work arrays laid out as the step's (a Workspace of its own), from
    a matrix with orthonormal rows (columns when tall): the chain then stays at singular values 1 without the
    step's normalisation and polynomial (no overflow, no denormals, which would time something else)."""
    ws = Workspace().get(np, shape, np.float32)
    X, Y, G, V = ws["X"], ws["Y"], ws["G"], ws["V"]
    tall = shape[0] > shape[1]
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal(shape if tall else shape[::-1]))
    start = np.ascontiguousarray(q if tall else q.T, dtype=np.float32)

    def run():
        X[...] = start
        x, y = X, Y
        for _ in range(ns_steps):
            if tall:
                np.matmul(x.T, x, out=G)
                np.matmul(G, G, out=V)
                np.matmul(x, V.T, out=y)
            else:
                np.matmul(x, x.T, out=G)
                np.matmul(G, G, out=V)
                np.matmul(V, x, out=y)
            x, y = y, x
    return run


def bench_shape(shape, repeat, torch):
    rng = np.random.default_rng(1)
    p = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    opt = Muon([p], lr=0.02)
    opt.step([g])
    fns = [lambda: opt.step([g]), _matmuls_alone(shape, 5)]
    if torch is not None:
        tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
        tp.grad = torch.from_numpy(g.copy())
        topt = torch.optim.Muon([tp], lr=0.02)
        fns.append(topt.step)
    times = _best_times(fns, repeat)
    r, c = min(shape), max(shape)
    row = {"shape": f"{shape[0]}x{shape[1]}", "step_ms": times[0] * 1e3, "matmul_ms": times[1] * 1e3,
           "ratio": times[0] / times[1], "gflop": 5 * (4 * r * r * c + 2 * r ** 3) / 1e9}
    if torch is not None:
        row["torch_ms"] = times[2] * 1e3
        row["torch_over_step"] = times[2] / times[0]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="768x768,768x3072,3072x768")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None, help="write the rows and the machine here")
    args = ap.parse_args(argv)
    # checked before the run: each would end in a traceback (Muon's 2-D check, int(), torch's thread count)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        ap.error(f"argument --shapes: invalid shapes {args.shapes!r} (comma-separated ROWSxCOLS, Muon's params "
                 "are 2-D, each size >= 1)")
    if args.repeat < 1:
        ap.error(f"argument --repeat: invalid number of repeats {args.repeat} (>= 1)")
    if args.threads is not None and args.threads < 1:
        ap.error(f"argument --threads: invalid number of threads {args.threads} (>= 1)")
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    threads = args.threads
    if torch is not None:
        if threads is not None:
            torch.set_num_threads(threads)
        threads = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(threads) if threads else None
    except ImportError:
        limiter = None
    rows = []
    print(f"{'shape':>10} {'GFLOP':>6} {'step ms':>9} {'matmul ms':>10} {'ratio':>6} {'torch ms':>9}")
    for shape in shapes:
        row = bench_shape(shape, args.repeat, torch)
        rows.append(row)
        print(f"{row['shape']:>10} {row['gflop']:6.2f} {row['step_ms']:9.1f} {row['matmul_ms']:10.1f} "
              f"{row['ratio']:6.3f} {row.get('torch_ms', float('nan')):9.1f}")
    if limiter is not None:
        limiter.unregister() if hasattr(limiter, "unregister") else None
    if args.json:
        from fastopt.benchmark import machine_info
        info = {"machine": machine_info(), "threads": threads, "numpy": np.__version__, "load": os.getloadavg(),
                "torch": getattr(torch, "__version__", None)}
        with open(args.json, "w") as f:
            json.dump({"benchmark": "muon", "info": info, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
