"""SparseAdam step time: an embedding table (default 100,000 x 256 float32) with 4096 random rows per step
(repeats included, as a batch of token ids gives them), fastopt vs torch.optim.SparseAdam.

    .venv/bin/python bench/bench_sparse_adam.py [--rows 100000] [--dim 256] [--nnz 4096] [--dtype float32]
                                                [--steps 30] [--threads 1,2] [--chunk ELEMENTS] [--out FILE]

Measured, interleaved step by step so that all see the same machine load (this runs on shared VMs):
- numpy:        fastopt.SparseAdam.step([(rows, values)]) on NumPy arrays (coalescing included);
- fastopt.torch: fastopt.torch.SparseAdam.step() with p.grad an uncoalesced sparse COO tensor;
- torch:        torch.optim.SparseAdam.step() with the same p.grad.
Each step uses another of 8 pre-built gradients (different rows each step). The table gives the median and
the minimum per step (on a shared machine the minimum is the least disturbed step), and the effective
bandwidth at the minimum, counted as Adam's 28 bytes per touched float32 element (read g, p, m, v; write p,
m, v; 56 in float64) over the coalesced rows. Results go to
bench/results/sparse-adam-cpu.json with the machine's description, one run per torch thread count (fastopt's
NumPy update is single-threaded: the count matters to torch only, and to fastopt.torch's torch.coalesce).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--nnz", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", default=None, help="torch intra-op thread counts, comma-separated (default: torch's)")
    ap.add_argument("--chunk", type=int, default=None, help="fastopt.sparse_adam.CHUNK_ELEMENTS")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "sparse-adam-cpu.json"))
    args = ap.parse_args(argv)

    import torch

    threads = [int(x) for x in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    runs = []
    for n in threads:
        torch.set_num_threads(n)
        runs.append(run_once(args))
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"benchmark": "sparse_adam", "runs": runs}, f, indent=2)
            f.write("\n")
    return 0


def run_once(args) -> dict:
    import torch

    import fastopt
    import fastopt.benchmark
    import fastopt.sparse_adam
    import fastopt.torch

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    if args.chunk:
        fastopt.sparse_adam.CHUNK_ELEMENTS = args.chunk
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    shape = (args.rows, args.dim)
    w0 = rng.standard_normal(shape).astype(dtype)
    grads = []
    for _ in range(8):
        idx = rng.integers(0, args.rows, args.nnz)
        vals = rng.standard_normal((args.nnz, args.dim)).astype(dtype)
        tgrad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(vals), shape)
        grads.append((idx, vals, tgrad, int(np.unique(idx).size)))

    w_np = w0.copy()
    opt_np = fastopt.SparseAdam([w_np], lr=1e-3)
    w_ft = torch.tensor(w0, requires_grad=True)
    opt_ft = fastopt.torch.SparseAdam([w_ft], lr=1e-3)
    w_t = torch.tensor(w0, requires_grad=True)
    opt_t = torch.optim.SparseAdam([w_t], lr=1e-3)

    def run_numpy(g):
        opt_np.step([(g[0], g[1])])

    def run_ft(g):
        w_ft.grad = g[2]
        opt_ft.step()

    def run_t(g):
        w_t.grad = g[2]
        opt_t.step()

    runs = {"numpy": run_numpy, "fastopt.torch": run_ft, "torch": run_t}
    times = {name: [] for name in runs}
    for step in range(args.steps + 2):  # two warm-up steps
        g = grads[step % len(grads)]
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(g)
            dt = time.perf_counter() - t0
            if step >= 2:
                times[name].append(dt)
    # the three ran the same steps: same result (to rounding)
    np.testing.assert_allclose(w_np, w_t.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w_ft.detach().numpy(), w_t.detach().numpy(), rtol=1e-4, atol=1e-5)

    touched = float(np.mean([g[3] for g in grads])) * args.dim
    bytes_per_step = touched * 7 * dtype.itemsize
    rows = []
    torch_median, torch_min = float(np.median(times["torch"])), float(np.min(times["torch"]))
    for name, ts in times.items():
        med, best = float(np.median(ts)), float(np.min(ts))
        rows.append({"impl": name, "median_ms": med * 1e3, "min_ms": best * 1e3,
                     "speedup_vs_torch": torch_median / med, "speedup_vs_torch_min": torch_min / best,
                     "GB_per_s_at_median": bytes_per_step / med / 1e9, "GB_per_s_at_min": bytes_per_step / best / 1e9})
    result = {
        "shape": list(shape), "dtype": args.dtype, "nnz": args.nnz,
        "unique_rows_mean": touched / args.dim, "steps": args.steps, "torch_threads": torch.get_num_threads(),
        "chunk_elements": fastopt.sparse_adam.CHUNK_ELEMENTS, "bytes_per_step_counted": bytes_per_step,
        "machine": fastopt.benchmark.machine_info(),
        "results": rows,
    }
    try:
        result["machine"]["loadavg"] = os.getloadavg()
    except OSError:
        pass
    print(f"SparseAdam step, {shape[0]} x {shape[1]} {args.dtype}, nnz {args.nnz} "
          f"({result['unique_rows_mean']:.0f} unique rows), torch threads {torch.get_num_threads()}")
    print(f"{'impl':<15}{'median ms':>11}{'min ms':>9}{'vs torch (median, min)':>24}{'GB/s at min':>13}")
    for r in rows:
        print(f"{r['impl']:<15}{r['median_ms']:>11.3f}{r['min_ms']:>9.3f}{r['speedup_vs_torch']:>13.2f}x"
              f"{r['speedup_vs_torch_min']:>10.2f}x{r['GB_per_s_at_min']:>13.1f}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
