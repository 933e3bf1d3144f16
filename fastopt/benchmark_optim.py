"""Optimizer-class benchmark (CPU), recorded in bench/results/optim-cpu.json with machine info.

    .venv/bin/python bench/bench_optim.py [--quick] [--threads 1,2]     (writes bench/results/optim-cpu.json)
    .venv/bin/python -m fastopt.benchmark_optim [--quick] [--out FILE]  (prints; writes FILE when given)

1. Class step overhead: fastopt.Adam(...).step(grads) against the bare functional call
   fastopt.adam_step(params, grads, exp_avg, exp_avg_sq, step=t) on the same list of tiny arrays
   (16 float32 each), for 1, 10, 100 arrays. Target: at most 5 us + 1 us per array.
2. 1000 small arrays (16..1024 float32, 0.5M parameters): fastopt.Adam step against
   torch.optim.Adam(fused=True) and (foreach=True) on the CPU. Target: at least 3x faster than fused.
3. Flat buffer against the list path on the same 1000 arrays (fastopt.flatten).
4. clip_grad_norm + skip_nonfinite: Adam on 4 x 2^21 float32 (memory-bound), plain / clip / skip /
   clip + skip. Target: at most one extra read of the gradients, i.e. a time ratio of at most
   (28 + 4) / 28 = 1.14 (Adam moves 28 bytes per parameter; reading the gradients again adds 4).
5. Host cost per class step (issue 11, item 3): fastopt.Adam on 200 x 1000 and 100 x 10,000 float32,
   plain and with clip_grad_norm + skip_nonfinite: the class step against the same kernels run on
   arrays validated once (the backend's run() on a prepared call, plus the sums of squares for
   clip + skip); the difference is what the class spends on the host per step.

Timing: variants are interleaved round by round (machine drift hits them alike), each round times a
block of calls, and the median of the per-call times over rounds is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import fastopt
from fastopt.benchmark import machine_info  # one description of the machine for every benchmark
from fastopt.cli_args import listing, thread_count


def interleaved(variants: dict, calls: int, rounds: int, with_min=False):
    """Median seconds per call of each variant; variants run in turn within every round. with_min: also
    the minimum over rounds (on a shared machine contention only ever adds time)."""
    for fn in variants.values():  # warm up
        for _ in range(max(1, calls // 10)):
            fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    medians = {name: statistics.median(v) for name, v in times.items()}
    if with_min:
        return medians, {name: min(v) for name, v in times.items()}
    return medians


def overhead(quick):
    rows = []
    rng = np.random.default_rng(0)
    for n in (1, 10, 100):
        params = [rng.standard_normal(16).astype(np.float32) for _ in range(n)]
        grads = [(1e-3 * rng.standard_normal(16)).astype(np.float32) for _ in range(n)]
        state = fastopt.init_state("adam", params)
        fparams = [p.copy() for p in params]
        opt = fastopt.Adam([p.copy() for p in params], lr=1e-3)
        opt_sched = fastopt.Adam([p.copy() for p in params], lr=fastopt.schedules.cosine(1e-3, 10 ** 9))
        t = [0]

        def functional():
            t[0] += 1
            fastopt.adam_step(fparams, grads, state["exp_avg"], state["exp_avg_sq"], step=t[0], lr=1e-3)

        calls = (2000 if not quick else 300) // max(1, n // 10)
        res, best = interleaved({"functional": functional, "class": lambda: opt.step(grads),
                                 "class_schedule": lambda: opt_sched.step(grads)}, calls, 15 if not quick else 5,
                                with_min=True)
        us = {k: v * 1e6 for k, v in res.items()}
        us_min = {k: v * 1e6 for k, v in best.items()}
        rows.append({"arrays": n, "functional_us": us["functional"], "class_us": us["class"],
                     "class_with_schedule_us": us["class_schedule"],
                     "overhead_us": us["class"] - us["functional"],
                     "overhead_with_schedule_us": us["class_schedule"] - us["functional"],
                     "overhead_min_us": us_min["class"] - us_min["functional"],
                     "functional_min_us": us_min["functional"], "class_min_us": us_min["class"],
                     "target_us": 5.0 + 1.0 * n})
        print(f"overhead  {n:4d} arrays: functional {us['functional']:8.2f} us  class {us['class']:8.2f} us  "
              f"(+schedule {us['class_schedule']:8.2f})  overhead {us['class'] - us['functional']:+7.2f} us  "
              f"target <= {5 + n:.0f} us")
    return rows


def small_arrays(quick):
    import torch
    rng = np.random.default_rng(1)
    sizes = rng.integers(16, 1025, size=1000)
    params = [rng.standard_normal(int(s)).astype(np.float32) for s in sizes]
    grads = [(1e-3 * rng.standard_normal(int(s))).astype(np.float32) for s in sizes]
    opt = fastopt.Adam([p.copy() for p in params], lr=1e-3)
    flat = fastopt.flatten([p.copy() for p in params])
    flat.set_grads(grads)
    flat_opt = fastopt.Adam([flat.params], lr=1e-3)
    flat_grads = [flat.grad]

    def torch_opt(**kw):
        tp = [torch.from_numpy(p.copy()) for p in params]
        for p, g in zip(tp, grads):
            p.grad = torch.from_numpy(g.copy())
        o = torch.optim.Adam(tp, lr=1e-3, **kw)
        return o

    fused = torch_opt(fused=True)
    foreach = torch_opt(foreach=True)
    calls, rounds = (20, 15) if not quick else (5, 5)
    with torch.no_grad():
        res = interleaved({"fastopt_list": lambda: opt.step(grads), "fastopt_flat": lambda: flat_opt.step(flat_grads),
                           "torch_fused": fused.step, "torch_foreach": foreach.step}, calls, rounds)
    us = {k: v * 1e6 for k, v in res.items()}
    out = {"arrays": 1000, "parameters": int(sizes.sum()), "dtype": "float32", **{f"{k}_us": v for k, v in us.items()},
           "speedup_vs_torch_fused": us["torch_fused"] / us["fastopt_list"],
           "speedup_vs_torch_foreach": us["torch_foreach"] / us["fastopt_list"],
           "flat_speedup_vs_list": us["fastopt_list"] / us["fastopt_flat"], "target_speedup_vs_fused": 3.0,
           "torch_threads": torch.get_num_threads(), "fastopt_threads": fastopt.get_num_threads()}
    print(f"1000 arrays ({out['parameters']} params): fastopt list {us['fastopt_list']:8.1f} us  flat "
          f"{us['fastopt_flat']:8.1f} us  torch fused {us['torch_fused']:8.1f} us  foreach {us['torch_foreach']:8.1f} us"
          f"  -> {out['speedup_vs_torch_fused']:.1f}x vs fused (target >= 3x), flat {out['flat_speedup_vs_list']:.1f}x "
          f"vs list")
    return out


def clip_skip(quick):
    rng = np.random.default_rng(2)
    n = 2 ** 21 if not quick else 2 ** 18
    params = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    grads = [(1e-3 * rng.standard_normal(n)).astype(np.float32) for _ in range(4)]
    opts = {
        "plain": fastopt.Adam([p.copy() for p in params], lr=1e-3),
        "clip": fastopt.Adam([p.copy() for p in params], lr=1e-3, clip_grad_norm=1.0),
        "skip": fastopt.Adam([p.copy() for p in params], lr=1e-3, skip_nonfinite=True),
        "clip_skip": fastopt.Adam([p.copy() for p in params], lr=1e-3, clip_grad_norm=1.0, skip_nonfinite=True),
    }
    unfused_params = [p.copy() for p in params]
    unfused = fastopt.Adam(unfused_params, lr=1e-3)
    grads_copy = [g.copy() for g in grads]

    def clip_then_step():  # the unfused way: clip in place (read + write the grads), then step
        fastopt.clip_by_global_norm(grads_copy, 1.0)
        unfused.step(grads_copy)

    variants = {k: (lambda o=o: o.step(grads)) for k, o in opts.items()}
    variants["unfused_clip_then_step"] = clip_then_step
    variants["grad_read_only"] = lambda: fastopt.global_norm(grads)  # one read of the gradients
    res, best = interleaved(variants, 3 if not quick else 2, 25 if not quick else 5, with_min=True)
    ms = {k: v * 1e3 for k, v in res.items()}
    ms_min = {k: v * 1e3 for k, v in best.items()}
    out = {"arrays": 4, "elements_per_array": n, "dtype": "float32", **{f"{k}_ms": v for k, v in ms.items()},
           "ratio_clip_skip_vs_plain": ms["clip_skip"] / ms["plain"],
           "extra_ms_clip_skip": ms["clip_skip"] - ms["plain"],
           "extra_in_gradient_reads": (ms["clip_skip"] - ms["plain"]) / ms["grad_read_only"],
           **{f"{k}_min_ms": v for k, v in ms_min.items()},
           "ratio_clip_skip_vs_plain_min": ms_min["clip_skip"] / ms_min["plain"],
           "target_ratio": 32 / 28}
    print(f"clip+skip, 4 x {n} float32: plain {ms['plain']:.2f} ms  clip {ms['clip']:.2f}  skip {ms['skip']:.2f}  "
          f"clip+skip {ms['clip_skip']:.2f}  unfused clip-then-step {ms['unfused_clip_then_step']:.2f}  "
          f"one read of the grads {ms['grad_read_only']:.2f} ms -> ratio {out['ratio_clip_skip_vs_plain']:.3f} "
          f"(target <= {32 / 28:.3f}), extra = {out['extra_in_gradient_reads']:.2f} gradient reads; "
          f"minima: plain {ms_min['plain']:.2f} ms, clip+skip {ms_min['clip_skip']:.2f} ms -> ratio "
          f"{out['ratio_clip_skip_vs_plain_min']:.3f}")
    return out


def host_cost(quick):
    """Per-step host time of the class: step() minus the bare kernel time on the same arrays."""
    from fastopt.backends.dispatch import backend_for
    rows = []
    rng = np.random.default_rng(3)
    for n, size in ((200, 1000), (100, 10_000)):
        params = [rng.standard_normal(size).astype(np.float32) for _ in range(n)]
        grads = [(1e-3 * rng.standard_normal(size)).astype(np.float32) for _ in range(n)]
        plain = fastopt.Adam([p.copy() for p in params], lr=1e-3)
        guarded = fastopt.Adam([p.copy() for p in params], lr=1e-3, clip_grad_norm=1.0, skip_nonfinite=True)
        kparams = [p.copy() for p in params]
        state = fastopt.init_state("adam", kparams)
        be = backend_for(kparams)
        spec = fastopt.Adam.spec
        hp = dict(spec.defaults)
        prepared = be.prepare((kparams, grads, state["exp_avg"], state["exp_avg_sq"]),
                              ("params", "grads", "exp_avg", "exp_avg_sq"))
        prepared_grads = be.prepare_grads(grads)
        t = [0]

        def kernel():
            t[0] += 1
            be.run(prepared, spec, hp, t[0], None)

        def kernel_with_sumsq():
            t[0] += 1
            be.sumsq_per_tensor(prepared_grads)
            be.run(prepared, spec, hp, t[0], 0.5)

        calls, rounds = (50, 21) if not quick else (10, 5)
        res, best = interleaved({"class": lambda: plain.step(grads), "kernel": kernel,
                                 "class_clip_skip": lambda: guarded.step(grads), "kernel_sumsq": kernel_with_sumsq},
                                calls, rounds, with_min=True)
        us = {k: v * 1e6 for k, v in res.items()}
        us_min = {k: v * 1e6 for k, v in best.items()}
        # the minima too: on a shared machine contention only ever adds time, to the kernels most of all
        row = {"arrays": n, "elements_per_array": size, "dtype": "float32", **{f"{k}_us": v for k, v in us.items()},
               **{f"{k}_min_us": v for k, v in us_min.items()},
               "host_us": us["class"] - us["kernel"], "host_clip_skip_us": us["class_clip_skip"] - us["kernel_sumsq"],
               "host_min_us": us_min["class"] - us_min["kernel"],
               "host_clip_skip_min_us": us_min["class_clip_skip"] - us_min["kernel_sumsq"]}
        rows.append(row)
        print(f"host cost {n} x {size}: class step {us['class']:8.1f} us (kernels {us['kernel']:8.1f}) -> host "
              f"{row['host_us']:7.1f} us;  clip+skip {us['class_clip_skip']:8.1f} us (kernels + sumsq "
              f"{us['kernel_sumsq']:8.1f}) -> host {row['host_clip_skip_us']:7.1f} us;  from the minima: host "
              f"{row['host_min_us']:7.1f} us, clip+skip {row['host_clip_skip_min_us']:7.1f} us")
    return rows


CASES = ("overhead", "small_arrays", "clip_skip", "host_cost")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run, not for the record)")
    ap.add_argument("--out", default=None, help="write the JSON report here (bench/bench_optim.py: "
                    "bench/results/optim-cpu.json)")
    ap.add_argument("--threads", default="1,2", type=listing(thread_count(), "thread counts"),
                    help="comma-separated thread counts (fastopt and torch alike), one run each")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    # the machine may be shared: the load average says how much the numbers can be trusted
    report = {"machine": machine_info(), "timing": "median of interleaved rounds (and minimum where noted)",
              "runs": {}}
    for threads in args.threads:
        fastopt.set_num_threads(threads)
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            torch = None
        print(f"--- {threads} thread(s)")
        run = {"threads": threads, "load_average_at_start": os.getloadavg()}
        if "overhead" in cases:
            run["overhead"] = overhead(args.quick)
        if "small_arrays" in cases:
            if torch is not None:
                run["small_arrays"] = small_arrays(args.quick)
            else:
                print("torch not installed: skipping the torch comparison")
        if "clip_skip" in cases:
            run["clip_skip"] = clip_skip(args.quick)
        if "host_cost" in cases:
            run["host_cost"] = host_cost(args.quick)
        run["load_average_at_end"] = os.getloadavg()
        report["runs"][str(threads)] = run
    if not args.quick and args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
