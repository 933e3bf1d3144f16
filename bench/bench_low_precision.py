"""CPU benchmark of the precision modes (issue 13): Adam at N = 1e7 with bfloat16 / float16 params, 16-bit
state (state_dtype=, 8-bit state included), Kahan summation and stochastic rounding, against its byte-count
ceiling, next to float32 Adam.

    .venv/bin/python bench/bench_low_precision.py [--n 1e7] [--threads 2] [--reps 30] [--out FILE]

Bytes per param: p read + written and g read in their storage dtype, m and v read and written in the
state dtype, the Kahan compensation (params' dtype) read and written: bf16/fp16 params with 16-bit grads
and float32 state 2+2+2+16 = 22; with float32 grads 24; float32 28; bf16 params and bf16 state 14; float32
params with bf16 state 20; Kahan 22 + 4 = 26. state_bytes_per_param is what the state keeps per param (m, v
and the compensation). The ceiling is the same traffic with trivial math (_cpu_fast.touch on the very same
arrays, the compensation included: the bandwidth of this machine, in this run, for this read/write
pattern); fraction = ceiling time / Adam time. Adam and the ceiling are timed alternately, so that load
from other processes hits both alike; minimum, median and paired (the median over repetitions of the
ratio of back-to-back times: the robust one on a shared VM) are reported. `step_overhead`: the time of a
class step on small arrays (the host's work per call and per tensor), float32 against 8-bit state.
"""
from __future__ import annotations

import argparse
import json
import os
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
    f32, f16 = np.dtype(np.float32), np.dtype(np.float16)
    cases = [  # (label, params, grads, state dtype, mode)
        ("float32", f32, f32, None, {}),
        ("float32, bf16 state", f32, f32, "bfloat16", {}),
        ("bfloat16", bf16, bf16, None, {}),
        ("bfloat16, float32 grads", bf16, f32, None, {}),
        ("bfloat16, bf16 state", bf16, bf16, "bfloat16", {}),
        ("bfloat16 + kahan", bf16, bf16, None, {"kahan": True}),
        ("bfloat16, bf16 state + kahan", bf16, bf16, "bfloat16", {"kahan": True}),
        ("bfloat16 + stochastic", bf16, bf16, None, {"stochastic_rounding": True}),
        ("float16", f16, f16, None, {}),
        ("float16 + kahan", f16, f16, None, {"kahan": True}),
        ("float16, fp16 state", f16, f16, "float16", {}),
    ]
    for label, pd, gd, sd, mode in cases:
        p = rng.standard_normal(n, dtype=np.float32).astype(pd)
        g = rng.standard_normal(n, dtype=np.float32).astype(gd)
        st = fastopt.init_state("adam", p, state_dtype=sd, kahan=bool(mode.get("kahan")))
        m, v = st["exp_avg"], st["exp_avg_sq"]
        comp = st.get("kahan_comp")
        state_bytes = m.itemsize + v.itemsize + (comp.itemsize if comp is not None else 0)
        nbytes = 2 * p.itemsize + g.itemsize + 2 * state_bytes
        # the ceiling touches copies: its trivial math (x + x on the storage) would turn 16-bit params into
        # garbage, NaN and Inf included, and the steps after it would be timed on that
        touched = tuple(a.copy() for a in ((p, g, m, v) if comp is None else (p, g, m, v, comp)))
        if comp is not None:
            touched = touched[:4] + (None,) + touched[4:]
        extra = {"kahan_comp": comp} if comp is not None else {}
        if mode.get("stochastic_rounding"):
            extra["stochastic_rounding"] = True
        adam, ceiling = [], []
        for t in range(1, reps + 3):
            t0 = time.perf_counter()
            fastopt.adam_step(p, g, m, v, step=t, lr=1e-3, **extra)
            t1 = time.perf_counter()
            _cpu_fast.touch(touched)
            t2 = time.perf_counter()
            if t > 2:  # warm-up: page faults, the OpenMP team
                adam.append(t1 - t0)
                ceiling.append(t2 - t1)
        row = {"case": label, "n": n, "threads": threads, "bytes_per_param": nbytes,
               "state_bytes_per_param": state_bytes,
               "adam_ms_min": 1e3 * min(adam), "adam_ms_median": 1e3 * float(np.median(adam)),
               "ceiling_ms_min": 1e3 * min(ceiling), "ceiling_ms_median": 1e3 * float(np.median(ceiling)),
               "adam_gbs_min_time": nbytes * n / min(adam) / 1e9,
               "fraction_of_ceiling_min": min(ceiling) / min(adam),
               "fraction_of_ceiling_median": float(np.median(ceiling)) / float(np.median(adam)),
               # per repetition, the ceiling and Adam timed back to back: robust to load that comes and goes
               # and to the odd clock jump of a shared VM (which can make a minimum impossibly small)
               "fraction_of_ceiling_paired": float(np.median(np.array(ceiling) / np.array(adam)))}
        rows.append(row)
        print(f"  {label}: {row['adam_ms_min']:.2f} ms, fraction {row['fraction_of_ceiling_min']:.2f}", flush=True)
        del p, g, st, m, v, comp, touched, extra
    rows.append(measure_int8(n, threads, reps, rng))
    return rows


def measure_int8(n, threads, reps, rng):
    """8-bit Adam state (state_dtype="int8") of float32 params: p read + written and g read (12 bytes), the
    codes of m and v read and written (4), their float32 scales (2 x 4 bytes per 256 elements, read and
    written: 16/256): 16.06 bytes per param, 2 + 8/256 of them kept as state. touch() takes float arrays
    only, so the ceiling is this traffic at the bandwidth of float32 Adam's own touch pattern (p, g, m, v,
    28 bytes per param), timed alternately with the 8-bit step on arrays of the same size."""
    import fastopt
    from fastopt.kernels.cpu import _cpu_fast

    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32)
    st = fastopt.init_state("adam", p, state_dtype="int8")
    m, v = st["exp_avg"], st["exp_avg_sq"]
    state_bytes = (m.nbytes + v.nbytes) / n
    nbytes = 12 + 2 * state_bytes
    m32, v32 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    p_touch, g_touch = p.copy(), g.copy()  # the ceiling's own arrays: touch doubles what it writes
    adam, ceiling = [], []
    for t in range(1, reps + 3):
        t0 = time.perf_counter()
        fastopt.adam_step(p, g, m, v, step=t, lr=1e-3)
        t1 = time.perf_counter()
        _cpu_fast.touch((p_touch, g_touch, m32, v32))
        t2 = time.perf_counter()
        if t > 2:
            adam.append(t1 - t0)
            ceiling.append((t2 - t1) * nbytes / 28.0)  # the same bandwidth, the 8-bit step's bytes
    row = {"case": "float32, int8 state", "n": n, "threads": threads, "bytes_per_param": round(nbytes, 4),
           "state_bytes_per_param": round(state_bytes, 4),
           "adam_ms_min": 1e3 * min(adam), "adam_ms_median": 1e3 * float(np.median(adam)),
           "ceiling_ms_min": 1e3 * min(ceiling), "ceiling_ms_median": 1e3 * float(np.median(ceiling)),
           "adam_gbs_min_time": nbytes * n / min(adam) / 1e9,
           "fraction_of_ceiling_min": min(ceiling) / min(adam),
           "fraction_of_ceiling_median": float(np.median(ceiling)) / float(np.median(adam)),
           "fraction_of_ceiling_paired": float(np.median(np.array(ceiling) / np.array(adam))),
           "ceiling_note": "float32 touch time scaled by bytes (touch takes float arrays only)"}
    print(f"  {row['case']}: {row['adam_ms_min']:.2f} ms, fraction {row['fraction_of_ceiling_min']:.2f}", flush=True)
    return row


def measure_step_overhead(threads, reps=7, steps=200):
    """An optimizer's step where the arrays are small (the host's work, not memory: validation and set-up per
    call and per tensor): fastopt.Adam with float32 and with 8-bit state, one tensor of 1 element and 200
    tensors of 100, median over `reps` runs of `steps` steps, microseconds per step."""
    import fastopt
    from fastopt.kernels.cpu import _cpu_fast

    _cpu_fast.set_num_threads(threads)
    rng = np.random.default_rng(1)
    rows = []
    for count, size in ((1, 1), (200, 100)):
        params = [rng.standard_normal(size, dtype=np.float32) for _ in range(count)]
        grads = [rng.standard_normal(size, dtype=np.float32) for _ in range(count)]
        row = {"tensors": count, "elements_each": size}
        for label, options in (("float32", {}), ("int8", {"state_dtype": "int8"})):
            opt = fastopt.Adam(params, lr=1e-3, **options)
            opt.step(grads)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(steps):
                    opt.step(grads)
                times.append((time.perf_counter() - t0) / steps)
            row[f"{label}_state_us"] = 1e6 * float(np.median(times))
        row["int8_over_float32"] = row["int8_state_us"] / row["float32_state_us"]
        rows.append(row)
        print(f"  step of {count} x {size}: float32 state {row['float32_state_us']:.1f} us, 8-bit state "
              f"{row['int8_state_us']:.1f} us", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # checked before the long run: each would end in a traceback (min() of no times, a division by n)
    if not 1 <= args.n < float("inf"):
        ap.error(f"argument --n: invalid number of params {args.n:g} (finite, >= 1)")
    if args.threads < 1:
        ap.error(f"argument --threads: invalid number of threads {args.threads} (>= 1)")
    if args.reps < 1:
        ap.error(f"argument --reps: invalid number of repetitions {args.reps} (>= 1)")
    from fastopt.benchmark import machine_info
    load_before = os.getloadavg()
    rows = measure(int(args.n), args.threads, args.reps)
    result = {"benchmark": "low-precision params, state and rounding modes, CPU (issue 13)", "machine": machine_info(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
              "step_overhead": measure_step_overhead(args.threads)}
    print(f"{'case':30s} {'B/param':>7s} {'state B':>7s} {'Adam ms min/med':>17s} {'ceiling ms min/med':>19s} "
          f"{'GB/s':>6s} {'fraction min/med/paired':>24s}")
    for r in rows:
        print(f"{r['case']:30s} {r['bytes_per_param']:7.2f} {r['state_bytes_per_param']:7.2f} "
              f"{r['adam_ms_min']:8.2f}/{r['adam_ms_median']:8.2f} "
              f"{r['ceiling_ms_min']:9.2f}/{r['ceiling_ms_median']:9.2f} {r['adam_gbs_min_time']:6.1f} "
              f"{r['fraction_of_ceiling_min']:8.2f}/{r['fraction_of_ceiling_median']:6.2f}/"
              f"{r['fraction_of_ceiling_paired']:6.2f}")
    print(f"load average before {load_before}, after {result['load_average_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
