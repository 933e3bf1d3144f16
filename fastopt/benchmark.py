"""CPU benchmark of the update kernels (`fastopt bench`, bench/bench_cpu.py).

For each optimizer and size N (float32), in one run and interleaved (round-robin over the variants, so
that drift of the machine hits them alike), median time of one step for:
  fastopt          one array of N elements
  fastopt-list100  a list of 100 arrays of N/100 elements (one multi-tensor call)
  numpy            fastopt.reference on one array (what the update costs written in plain NumPy)
  torch-fused      torch.optim.<X>(fused=True).step(), where torch has a fused CPU kernel
  torch-foreach    torch.optim.<X>(foreach=True).step()
  ceiling          a compiled loop with the optimizer's exact read/write pattern and trivial math,
                   run through the same chunking and threads (the same-pattern bandwidth ceiling)
GB/s counts the bytes the optimizer must move (spec.bytes_per_element: every array read once, every
written array written once); "of ceiling" = ceiling time / variant time, from the medians and from the
minima (the fastest run of each) and paired (the median over repetitions of the ratio within one
repetition, where the ceiling runs right after fastopt: the estimate a shared machine disturbs least; the
target uses it). Every optimizer of the registry is benchmarked (the list, the hyperparameters, the states
and the byte count all come from its spec); a run that includes N = 1e7 reports issue 14's target,
>= 0.85 of the ceiling there, per optimizer.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import numpy as np

import fastopt
from fastopt import reference
from fastopt.specs import REGISTRY, REQUIRED

LIST_LEN = 100
TORCH_FUSED_CPU = {"Adam", "AdamW", "SGD", "Adagrad"}  # torch 2.x has fused CPU kernels for these


def bench_hyperparameters(spec):
    hp = {k: (0.01 if v is REQUIRED else v) for k, v in spec.defaults.items()}
    if spec.name == "sgd":
        hp["momentum"] = 0.9  # the common configuration: one state array
    return hp


# The CPU extensions the kernels pick their loops by (kernels/cpu: the target_clones levels, F16C, the 8-bit
# codec's AVX-512 and VBMI, AVX512_BF16's stores). Recorded with every benchmark because a model name does
# not tell them: this project's VMs called "AMD EPYC" have had AVX-512 on some days and AVX2 only on others,
# and the 8-bit and 16-bit cases run other loops on the two.
KERNEL_CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi",
                       "avx512_bf16")


def cpuinfo():
    """The model name and the flags of the first CPU in /proc/cpuinfo (None, None where there is none)."""
    model = flags = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:  # x86 / aarch64
                    flags = set(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model, flags


def machine_info():
    """The machine a benchmark ran on, one description for every benchmark: CPU model and the extensions
    the kernels dispatch on, cores and threads, versions (torch's where it is installed)."""
    model, flags = cpuinfo()
    try:
        from fastopt.kernels.cpu import _cpu_fast
        isa_dispatch = _cpu_fast.ISA_DISPATCH  # the levels the build compiled (platform.hpp)
    except ImportError:  # not built: the NumPy backend runs (and says so once)
        isa_dispatch = None
    info = {
        "cpu": model or platform.processor() or "unknown",
        # None where the flags cannot be read (not Linux); else the subset of KERNEL_CPU_FEATURES present
        "cpu_features": None if flags is None else [f for f in KERNEL_CPU_FEATURES if f in flags],
        "isa_dispatch": isa_dispatch,
        "cores": os.cpu_count(),
        "threads": fastopt.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastopt": fastopt.__version__,
        "platform": platform.platform(),
    }
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


class Case:
    """The arrays and callables of one (optimizer, N) benchmark."""

    def __init__(self, spec, n, rng, with_torch):
        from fastopt.kernels.cpu import _cpu_fast

        self.spec, self.n = spec, n
        self.hp = hp = bench_hyperparameters(spec)
        self.kw = dict(hp, **({"step": 10} if spec.uses_step else {}))
        fn = getattr(fastopt, spec.function_name)
        ref = reference.STEPS[spec.name]

        def arrays(size):
            p = rng.standard_normal(size, dtype=np.float32)
            g = rng.standard_normal(size, dtype=np.float32)
            state = fastopt.init_state(spec.name, p, **{k: v for k, v in hp.items() if k != "lr"})
            for a in state.values():
                a[...] = np.abs(rng.standard_normal(size, dtype=np.float32))
            return p, g, state

        p, g, state = arrays(n)
        sizes = [n // LIST_LEN + (1 if i < n % LIST_LEN else 0) for i in range(LIST_LEN)]
        bounds = np.cumsum([0] + sizes)
        # the list as 100 separate allocations (each on its own 4 KiB pages), and as 100 views into one
        # buffer (the large buffer gets transparent huge pages, like the single array): the difference
        # between the two is the memory system's, the rest fastopt's per-array cost
        lists = [arrays(s) for s in sizes]
        lp, lg = [x[0] for x in lists], [x[1] for x in lists]
        lstate = {k: [x[2][k] for x in lists] for k in state}
        fp, fg, fstate = arrays(n)

        def views(a):
            return [a[bounds[i]:bounds[i + 1]] for i in range(LIST_LEN)]
        vp, vg, vstate = views(fp), views(fg), {k: views(a) for k, a in fstate.items()}
        kw = self.kw
        # the ceiling kernel gets arrays of its own: its trivial math would make the states invalid
        cp, cg, cstate = arrays(n)
        touched = [cstate[s] for s in spec.states if s in cstate]
        if len(touched) > 3:  # a fourth state (Adan) goes after the Kahan compensation's slot (None here)
            touched = touched[:3] + [None] + touched[3:]

        self.variants = {
            "fastopt": lambda: fn(p, g, **state, **kw),
            "fastopt-list100": lambda: fn(lp, lg, **lstate, **kw),
            "fastopt-list100-views": lambda: fn(vp, vg, **vstate, **kw),
            "numpy": lambda: ref(p, g, **state, **kw),
        }
        if spec.two_phase:
            def ceiling():
                _cpu_fast.touch((cp, cg, *touched), 1)
                _cpu_fast.touch((cp, cg, *touched), 2)
        elif spec.tensor_coefs is not None:
            def ceiling():  # LARS: its norms pass reads p and g (the reduction itself: no lighter read exists)
                _cpu_fast.sumsq_per_tensor([cp, cg])
                _cpu_fast.touch((cp, cg, *touched), 0)
        else:
            def ceiling():
                _cpu_fast.touch((cp, cg, *touched), 0)
        # the ceiling right after fastopt in each repetition: the pair sees the same state of the machine
        self.variants = {"fastopt": self.variants.pop("fastopt"), "ceiling": ceiling, **self.variants}
        if with_torch and spec.torch_class:
            self._add_torch(spec, n, rng)

    def _add_torch(self, spec, n, rng):
        import torch
        kw = spec.torch_keywords(self.hp)
        cls = getattr(torch.optim, spec.torch_class)
        modes = [("torch-foreach", {"foreach": True})]
        if spec.torch_class in TORCH_FUSED_CPU:
            modes.insert(0, ("torch-fused", {"fused": True}))
        for label, mode in modes:
            param = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n, dtype=np.float32)))
            param.grad = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
            opt = cls([param], **kw, **mode)
            opt.step()  # allocate the state
            self.variants[label] = opt.step

    def bytes(self):
        return self.spec.bytes_per_element(self.hp, 4) * self.n


def run_case(case, repeats, numpy_repeats):
    times = {k: [] for k in case.variants}
    for fn in case.variants.values():  # warm up (first-touch page faults, torch state, caches)
        fn()
        fn()
    for r in range(repeats):
        for name, fn in case.variants.items():
            if name == "numpy" and r >= numpy_repeats:
                continue
            t0 = time.perf_counter_ns()
            fn()
            times[name].append(time.perf_counter_ns() - t0)
    nbytes = case.bytes()
    ceiling = statistics.median(times["ceiling"])
    ceiling_min = min(times["ceiling"])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "ms": med / 1e6,
            "gbps": nbytes / med,
            "of_ceiling": ceiling / med,
            # minima: on a shared machine another process's burst lands in some runs of a variant and not
            # in others; the fastest run of each is the least disturbed estimate
            "min_ms": min(ts) / 1e6,
            "of_ceiling_min": ceiling_min / min(ts),
            # paired: the median over repetitions of ceiling time / variant time within the same repetition
            # (a slow stretch of the machine hits both and cancels; fastopt and the ceiling run back to back)
            "of_ceiling_paired": statistics.median(c / t for c, t in zip(times["ceiling"], ts)),
            "runs": len(ts),
        }
    return out


TARGET_N, TARGET_OF_CEILING = 10**7, 0.85  # issue 14: every elementwise optimizer at >= 0.85 of its ceiling


def targets(report, n=TARGET_N, target=TARGET_OF_CEILING):
    """Per optimizer at size n: its fraction of the byte-count ceiling (ratio of the medians, of the minima,
    and the paired median) and whether it reaches `target`, judged by the paired median: on a shared machine
    a slow stretch during a variant's runs moves a ratio of separate medians either way, while each pair
    (fastopt, then the ceiling, in the same repetition) sees the same machine."""
    out = {}
    for row in report["results"]:
        if row["n"] != n:
            continue
        v = row["variants"]["fastopt"]
        out[row["optimizer"]] = {"of_ceiling": v["of_ceiling"], "of_ceiling_min": v["of_ceiling_min"],
                                 "of_ceiling_paired": v["of_ceiling_paired"],
                                 "bytes_per_element": row["bytes_per_element"], "met": v["of_ceiling_paired"] >= target}
    return out


def run(optimizers=None, sizes=(10**5, 10**6, 10**7), repeats=None, threads=None, with_torch=True,
        progress=True):
    if threads:
        fastopt.set_num_threads(threads)
    try:
        import torch
        torch.set_num_threads(fastopt.get_num_threads())
    except ImportError:
        with_torch = False
    names = optimizers or list(REGISTRY)
    rng = np.random.default_rng(0)
    load_at_start = os.getloadavg()  # the machine may be shared: how far the numbers can be trusted
    results = []
    for n in sizes:
        reps = repeats or (200 if n <= 10**5 else 50 if n <= 10**6 else 15)
        for name in names:
            spec = REGISTRY[name]
            case = Case(spec, n, rng, with_torch)
            timing = run_case(case, reps, max(3, reps // 5))
            row = {"optimizer": name, "n": n, "bytes_per_element": spec.bytes_per_element(case.hp, 4),
                   "variants": timing}
            single = timing["fastopt"]["ms"]
            row["per_extra_array_us"] = (timing["fastopt-list100"]["ms"] - single) * 1e3 / (LIST_LEN - 1)
            row["per_extra_array_us_views"] = (timing["fastopt-list100-views"]["ms"] - single) * 1e3 / (LIST_LEN - 1)
            row["speedup_vs_numpy"] = timing["numpy"]["ms"] / single
            for t in ("torch-fused", "torch-foreach"):
                if t in timing:
                    row[f"speedup_vs_{t}"] = timing[t]["ms"] / single
            results.append(row)
            if progress:
                print(format_row(row), file=sys.stderr, flush=True)
            del case
    report = {"machine": machine_info(), "dtype": "float32", "list_len": LIST_LEN,
              "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(), "results": results}
    if any(row["n"] == TARGET_N for row in results):
        report["targets"] = {"n": TARGET_N, "of_ceiling": TARGET_OF_CEILING, "optimizers": targets(report)}
    return report


def format_row(row):
    v = row["variants"]
    parts = [f"{row['optimizer']:>9} N={row['n']:>9.0e}",
             f"fastopt {v['fastopt']['ms']:8.3f} ms {v['fastopt']['gbps']:6.1f} GB/s "
             f"({v['fastopt']['of_ceiling_paired']:.2f} of ceiling paired, {v['fastopt']['of_ceiling']:.2f} by medians, "
             f"{v['fastopt']['of_ceiling_min']:.2f} by minima)",
             f"list100 +{row['per_extra_array_us']:.2f} us/array (views +{row['per_extra_array_us_views']:.2f})",
             f"numpy x{row['speedup_vs_numpy']:.1f}"]
    for t in ("torch-fused", "torch-foreach"):
        if f"speedup_vs_{t}" in row:
            parts.append(f"{t} x{row[f'speedup_vs_{t}']:.2f}")
    return " | ".join(parts)


def markdown_table(report):
    lines = ["| optimizer | N | bytes/elem | fastopt ms | GB/s | of ceiling (paired / medians / minima) | list of 100: µs per "
             "extra array (separate / views) | vs NumPy | vs torch fused | vs torch foreach |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        v = row["variants"]["fastopt"]

        def ratio(key):
            return f"{row[key]:.2f}x" if key in row else "–"
        lines.append(f"| {row['optimizer']} | {row['n']:.0e} | {row['bytes_per_element']} | {v['ms']:.3f} | "
                     f"{v['gbps']:.1f} | {v['of_ceiling_paired']:.2f} / {v['of_ceiling']:.2f} / {v['of_ceiling_min']:.2f} "
                     f"| {row['per_extra_array_us']:.1f} / {row['per_extra_array_us_views']:.1f} | {row['speedup_vs_numpy']:.1f}x | {ratio('speedup_vs_torch-fused')} "
                     f"| {ratio('speedup_vs_torch-foreach')} |")
    m = report["machine"]
    lines.append("")
    load = (f"; load average {report['load_average_at_start'][0]:.1f} at the start, "
            f"{report['load_average_at_end'][0]:.1f} at the end" if "load_average_at_start" in report else "")
    threads = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    lines.append(f"{m['cpu']}, {threads}, numpy {m['numpy']}, torch {m.get('torch')}; float32{load}; "
                 f"median of interleaved runs (each variant runs after the others, so it starts mostly out of cache). "
                 f"Ratios > 1: fastopt is faster. GB/s: bytes the update must move / time; of ceiling: "
                 f"time of a loop with the same reads and writes and trivial math / time (paired: median over "
                 f"repetitions of the ratio within one repetition; medians: ratio of the medians; minima: of the "
                 f"fastest runs).")
    if report.get("targets", {}).get("optimizers"):
        t = report["targets"]
        missed = [name for name, r in t["optimizers"].items() if not r["met"]]
        lines.append(f"Target (issue 14): >= {t['of_ceiling']} of the ceiling at N={t['n']:.0e}: "
                     + (f"missed by {', '.join(missed)}." if missed else "met by every optimizer."))
    return "\n".join(lines)


def main(args):
    """`fastopt bench` on the CPU; args as parsed by fastopt.cli (sizes and optimizers already checked lists)."""
    from fastopt.cli_args import dumps, write_json
    sizes = list(args.sizes) if args.sizes else None
    optimizers = list(args.optimizers) if args.optimizers else None
    if args.quick:
        sizes = sizes or [10**5, 10**6]
        optimizers = optimizers or ["sgd", "adam", "lion"]
    report = run(optimizers=optimizers, sizes=sizes or (10**5, 10**6, 10**7), repeats=args.repeats or
                 (20 if args.quick else None), threads=args.threads, progress=not args.json)
    if args.out:
        write_json(args.out, report, indent=1)
    print(dumps(report, indent=1) if args.json else markdown_table(report))
    return 0
