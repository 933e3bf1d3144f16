"""CPU benchmark of 16-bit params (issue 13, part 1): Adam at N = 1e7 with bfloat16 / float16 params
and float32 state, against its byte-count ceiling, next to float32 Adam.

    .venv/bin/python bench/bench_low_precision.py [--n 1e7] [--threads 2] [--reps 30] [--out FILE]

Bytes per param: p read + written and g read in their storage dtype, m and v (float32) read and written:
bf16/fp16 params with 16-bit grads 2+2+2+16 = 22; with float32 grads 2+4+2+16 = 24; float32 28. The
ceiling is the same traffic with trivial math (_cpu_fast.touch on the very same arrays: the bandwidth of
this machine, in this run, for this read/write pattern); fraction = ceiling time / Adam time. Adam and
the ceiling are timed alternately, so that load from other processes hits both alike; minimum and
median are reported (the minimum is the machine's, the median includes the noise of a shared VM).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def measure(n, threads, reps):
    import ml_dtypes

    import fastopt
    from fastopt.kernels.cpu import _cpu_fast

    _cpu_fast.set_num_threads(threads)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    rows = []
    for label, pd, gd in [("float32", np.float32, np.float32), ("bfloat16", bf16, bf16),
                          ("bfloat16, float32 grads", bf16, np.float32), ("float16", np.float16, np.float16)]:
        p = rng.standard_normal(n, dtype=np.float32).astype(pd)
        g = rng.standard_normal(n, dtype=np.float32).astype(gd)
        st = fastopt.init_state("adam", p)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        nbytes = 2 * p.itemsize + g.itemsize + 2 * (m.itemsize + v.itemsize)
        adam, ceiling = [], []
        for t in range(1, reps + 3):
            t0 = time.perf_counter()
            fastopt.adam_step(p, g, m, v, step=t, lr=1e-3)
            t1 = time.perf_counter()
            _cpu_fast.touch((p, g, m, v))
            t2 = time.perf_counter()
            if t > 2:  # warm-up: page faults, the OpenMP team
                adam.append(t1 - t0)
                ceiling.append(t2 - t1)
        row = {"case": label, "n": n, "threads": threads, "bytes_per_param": nbytes,
               "adam_ms_min": 1e3 * min(adam), "adam_ms_median": 1e3 * float(np.median(adam)),
               "ceiling_ms_min": 1e3 * min(ceiling), "ceiling_ms_median": 1e3 * float(np.median(ceiling)),
               "adam_gbs_min_time": nbytes * n / min(adam) / 1e9,
               "fraction_of_ceiling_min": min(ceiling) / min(adam),
               "fraction_of_ceiling_median": float(np.median(ceiling)) / float(np.median(adam))}
        rows.append(row)
        del p, g, st, m, v
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    rows = measure(int(args.n), args.threads, args.reps)
    result = {"benchmark": "low-precision params, CPU (issue 13 part 1)", "machine": platform.node(),
              "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    print(f"{'case':26s} {'B/param':>7s} {'Adam ms min/med':>17s} {'ceiling ms min/med':>19s} "
          f"{'GB/s':>6s} {'fraction min/med':>17s}")
    for r in rows:
        print(f"{r['case']:26s} {r['bytes_per_param']:7d} {r['adam_ms_min']:8.2f}/{r['adam_ms_median']:8.2f} "
              f"{r['ceiling_ms_min']:9.2f}/{r['ceiling_ms_median']:9.2f} {r['adam_gbs_min_time']:6.1f} "
              f"{r['fraction_of_ceiling_min']:8.2f}/{r['fraction_of_ceiling_median']:8.2f}")
    print(f"load average before {load_before}, after {result['load_average_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
