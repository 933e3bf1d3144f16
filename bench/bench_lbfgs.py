"""L-BFGS: CPU time per closure evaluation of fastopt.LBFGS, fastopt.torch.LBFGS and torch.optim.LBFGS.

    python bench/bench_lbfgs.py [--n 1000000] [--dtype float64] [--history 10] [--repeat 3] [--json PATH]

Problem: f(x) = sum(c x^2 / 2 - b x) over one vector of n elements (c in [0.1, 1.1)), so that the closure
is one elementwise pass and the optimizer's own vector work (gather, two-loop recursion, update, line
search bookkeeping) dominates. max_iter=20, tolerances 0 (every step runs its 20 iterations), both
line_search_fn values. Reported: process CPU time of one step() divided by the closure evaluations it made
(the three optimizers need the same number in float64, not always in float32), the least of --repeat
steps, the optimizers interleaved, after two warm-up steps each (which also fill the history). CPU time
rather than wall time: the numbers are meant for a shared machine; run it with OMP_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 to compare single-threaded vector work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastopt  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    import fastopt.torch as ft

    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    c = (rng.random(args.n) + 0.1).astype(dtype)
    b = rng.standard_normal(args.n).astype(dtype)
    x0 = rng.standard_normal(args.n).astype(dtype)
    ct, bt = torch.from_numpy(c), torch.from_numpy(b)
    rows = []
    for ls in (None, "strong_wolfe"):
        options = dict(max_iter=20, history_size=args.history, line_search_fn=ls, tolerance_grad=0,
                       tolerance_change=0)

        def torch_run(cls):
            p = torch.from_numpy(x0.copy()).requires_grad_()
            opt = cls([p], **options)

            def closure():
                with torch.no_grad():
                    g = ct * p - bt
                    p.grad = g
                    return float((0.5 * ct * p * p - bt * p).sum())
            return opt, closure, lambda: opt.state[p]["func_evals"]

        def numpy_run():
            x = x0.copy()
            opt = fastopt.LBFGS([x], **options)
            g = np.empty_like(x)

            def closure():
                np.multiply(c, x, out=g)
                np.subtract(g, b, out=g)
                return float(np.sum(0.5 * c * x * x - b * x)), [g]
            return opt, closure, lambda: opt.state[0]["func_evals"]

        runs = {"torch.optim.LBFGS": torch_run(torch.optim.LBFGS), "fastopt.torch.LBFGS": torch_run(ft.LBFGS),
                "fastopt.LBFGS": numpy_run()}
        for opt, closure, _ in runs.values():
            opt.step(closure)
            opt.step(closure)
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeat):
            for name, (opt, closure, evals) in runs.items():
                e0 = evals()
                t = time.process_time()
                opt.step(closure)
                spent = time.process_time() - t
                best[name] = min(best[name], spent * 1e3 / max(1, evals() - e0))
        row = {"line_search_fn": ls, "ms_per_evaluation": best}
        rows.append(row)
        print(f"n={args.n} {args.dtype} line_search_fn={ls}: " +
              "; ".join(f"{k} {v:.2f} ms" for k, v in best.items()))
    if args.json:
        with open(args.json, "w") as fh:
            from fastopt.benchmark import machine_info
            json.dump({"machine": machine_info(),
                       "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                   "MKL_NUM_THREADS")},
                       "n": args.n, "dtype": args.dtype, "history_size": args.history, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
