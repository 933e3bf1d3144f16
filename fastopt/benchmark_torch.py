"""fastopt.torch against torch.optim: optimizer step time on real models' parameter lists.

    fastopt bench --torch [--threads N] [--repeats R] [--quick] [--out FILE] [--json]
    .venv/bin/python bench/bench_torch.py            (writes bench/results/torch-cpu.json; not with --quick)

Parameter lists are made from the shapes of real models (nothing is downloaded): GPT-2 small (148
tensors, 124,439,808 params, the tied LM head counted once), ResNet-50 (161 tensors, 25,557,032 params)
and 100 tensors of 10,000. For Adam, AdamW and SGD with momentum, one step of fastopt.torch is timed
against torch.optim's fused, foreach and for-loop implementations, on the same params and grads
(float32, on the CPU; on the GPU too when torch sees one), interleaved round by round so that a loaded
machine slows every variant alike; the median and the minimum are reported. On the CPU a training loop
(a small channels_last CNN with Adam, forward + backward + step) is timed too: fastopt's OpenMP pool and
torch's intra-op pool take turns on the same cores there. Targets (issue 12): on the CPU with 2 threads,
>= 1.3x torch fused Adam/AdamW on the ResNet-50 list and on 100 x 10,000, never slower than torch fused.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from fastopt.benchmark import machine_info
from fastopt.cli_args import listing, thread_count

OPTIMIZERS = {"Adam": {"lr": 1e-3}, "AdamW": {"lr": 1e-3, "weight_decay": 0.01},
              "SGD": {"lr": 1e-3, "momentum": 0.9}}
VARIANTS = ("fastopt", "torch fused", "torch foreach", "torch for-loop")
# the registry's names of the optimizers timed here (bytes moved per element: their active states)
SPECS = {"Adam": "adam", "AdamW": "adamw", "SGD": "sgd"}


def gpt2_small_shapes() -> list[tuple]:
    """GPT-2 small (124M): token and position embeddings, 12 blocks of 12 tensors, the final layer norm;
    the LM head is the token embedding (tied)."""
    d, ff, vocab, ctx = 768, 3072, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_shapes() -> list[tuple]:
    """ResNet-50 (torchvision layout): stem, 16 bottlenecks (3 convs + 3 batch norms each, a downsample
    conv + batch norm in the first of each stage), the 1000-way classifier."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            width, out = planes, planes * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    return shapes + [(1000, 2048), (1000,)]


PARAM_LISTS = {"gpt2-small": gpt2_small_shapes, "resnet50": resnet50_shapes,
               "100x10000": lambda: [(10_000,)] * 100}


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _make_optimizer(torch, name, variant, params):
    import fastopt.torch as ft
    kw = dict(OPTIMIZERS[name])
    if variant == "fastopt":
        return getattr(ft, name)(params, **kw)
    flags = {"torch fused": {"fused": True}, "torch foreach": {"foreach": True},
             "torch for-loop": {"foreach": False}}[variant]
    return getattr(torch.optim, name)(params, **kw, **flags)


class _Ceiling:
    """The byte-count ceiling of one step on the CPU: fastopt's same-pattern kernel (trivial math, the
    optimizer's reads and writes: params and states read and written, grads read) over arrays shaped like
    the param list, through the same chunking and as many threads as torch uses."""

    def __init__(self, torch, shapes, name):
        import numpy as np

        from fastopt.specs import REGISTRY
        spec = REGISTRY[SPECS[name]]
        hp = {**spec.defaults, **{k: v for k, v in OPTIMIZERS[name].items() if k in spec.defaults}}
        nstates = sum(spec.active_states(hp))
        self.torch = torch
        self.arrays = tuple([np.ones(s, np.float32) for s in shapes] for _ in range(2 + nstates))
        self.bytes = sum(_numel(s) for s in shapes) * 4 * (1 + 2 * (1 + nstates))

    def step(self):
        from fastopt.backends import cython_backend
        from fastopt.kernels.cpu import _cpu_fast
        # on torch's thread count, for this thread only, as fastopt.torch runs its kernels
        with cython_backend.thread_count(min(self.torch.get_num_threads(), cython_backend.MAX_THREADS)):
            _cpu_fast.touch(self.arrays, 0)


def time_case(torch, shapes, name, device, repeats, warmup=2):
    """Median step time (ms) of each variant on one param list, interleaved round by round."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device) * 1e-2
        params.append(p)
    opts, times = {}, {}
    for variant in VARIANTS:
        try:
            opts[variant] = _make_optimizer(torch, name, variant, params)
            times[variant] = []
        except (RuntimeError, ValueError) as e:  # e.g. no fused implementation on this device
            times[variant] = f"unavailable: {e}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cpu":
        opts["ceiling"] = _Ceiling(torch, shapes, name)
        times["ceiling"] = []
    for round_ in range(warmup + repeats):
        for variant, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if round_ >= warmup:
                times[variant].append((time.perf_counter() - t0) * 1e3)
    median = {v: (statistics.median(t) if isinstance(t, list) else t) for v, t in times.items()}
    best = {v: (min(t) if isinstance(t, list) else t) for v, t in times.items()}
    del opts, params
    gc.collect()
    return median, best


def run(threads=(2,), repeats=None, quick=False, devices=None, progress=True, param_lists=None,
        training_iterations=20):
    """The report: one row per (device, threads, param list, optimizer), and on the CPU the training-loop
    case per thread count. param_lists: name -> shapes function (default PARAM_LISTS; --quick: ResNet-50
    and 100 x 10,000)."""
    import torch
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if param_lists is None:
        param_lists = {k: f for k, f in PARAM_LISTS.items() if not quick or k != "gpt2-small"}
    report = {"machine": machine_info(),
              "timing": "step time (ms), float32: median (ms) and minimum (min_ms) of interleaved rounds",
              "params": {k: {"tensors": len(f()), "params": sum(_numel(s) for s in f())}
                         for k, f in param_lists.items()},
              "runs": []}
    if torch.cuda.is_available():
        report["machine"]["gpu"] = torch.cuda.get_device_name()
    lists = list(param_lists)
    before = torch.get_num_threads()
    try:
        for device in devices:
            for n in (threads if device == "cpu" else (before,)):
                torch.set_num_threads(n)  # fastopt.torch follows torch's thread count
                for list_name in lists:
                    shapes = param_lists[list_name]()
                    reps = repeats or (3 if quick else (5 if list_name == "gpt2-small" else 15))
                    if list_name == "100x10000" and not repeats:
                        reps = 10 if quick else 60
                    for name in OPTIMIZERS:
                        load = os.getloadavg()
                        ms, best = time_case(torch, shapes, name, device, reps)
                        ceiling = ms.pop("ceiling", None)
                        best.pop("ceiling", None)
                        row = {"device": device, "threads": n if device == "cpu" else None, "params": list_name,
                               "optimizer": name, "repeats": reps, "load_average": load[0], "ms": ms,
                               "min_ms": best,
                               # how many times faster fastopt.torch is than each torch variant (median)
                               "speedup_vs": {v: (t / ms["fastopt"] if isinstance(t, float) else None)
                                              for v, t in ms.items() if v != "fastopt"}}
                        if ceiling is not None:
                            # the same-pattern kernel's time: no update can move these bytes faster here
                            row["ceiling_ms"] = ceiling
                            row["of_ceiling"] = {v: (ceiling / t if isinstance(t, float) else None)
                                                 for v, t in ms.items()}
                        if progress:
                            print(format_row(row), flush=True)
                        report["runs"].append(row)
        if "cpu" in devices:
            report["training_loop"] = [training_loop(torch, n, training_iterations) for n in threads]
            if progress:
                for r in report["training_loop"]:
                    print(f"training loop, {r['threads']} thr: ms per iteration {r['ms_per_iteration']}")
    finally:
        torch.set_num_threads(before)
    return report


def training_loop(torch, threads, iterations=20, rounds=5):
    """Time per training iteration (forward, backward, step) of a small channels_last CNN with Adam, as
    fastopt.torch and as torch fused: what counts when torch's intra-op pool and fastopt's OpenMP pool
    alternate on the same cores (fastopt.torch follows torch.get_num_threads())."""
    import fastopt.torch as ft
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), generator=gen)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(512, 10),
        ).to(memory_format=torch.channels_last)

    setups = {"fastopt": (m := model(), ft.Adam(m.parameters(), 1e-3)),
              "torch fused": (m2 := model(), torch.optim.Adam(m2.parameters(), 1e-3, fused=True))}
    times = {k: [] for k in setups}
    for _ in range(rounds):
        for name, (net, opt) in setups.items():
            t0 = time.perf_counter()
            for _ in range(iterations):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            times[name].append((time.perf_counter() - t0) * 1e3 / iterations)
    return {"threads": threads, "load_average": os.getloadavg()[0],
            "ms_per_iteration": {k: statistics.median(v) for k, v in times.items()},
            "min_ms_per_iteration": {k: min(v) for k, v in times.items()}}


def _fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else "–"


def _ratio(a, b):
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "–"


def format_row(row) -> str:
    """One table row: each variant's median (minimum) ms, and fastopt.torch's speedup over torch fused."""
    ms, best = row["ms"], row["min_ms"]
    where = row["device"] + (f", {row['threads']} thr" if row["threads"] else "")
    cells = [f"{_fmt(ms[v])} ({_fmt(best[v])})" for v in VARIANTS]
    speedup = f"{_ratio(ms['torch fused'], ms['fastopt'])} ({_ratio(best['torch fused'], best['fastopt'])})"
    of = row.get("of_ceiling") or {}
    ceiling = " / ".join(f"{of[v]:.2f}" if isinstance(of.get(v), float) else "–" for v in ("fastopt", "torch fused"))
    return (f"| {row['params']} | {row['optimizer']} | {where} | " + " | ".join(cells) + f" | {speedup} | {ceiling} "
            f"| {row['load_average']:.1f} |")


def markdown_table(report) -> str:
    head = ("| params | optimizer | device | fastopt.torch ms | torch fused ms | torch foreach ms | torch for-loop ms "
            "| vs fused | of ceiling (fastopt / fused) | load |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [format_row(r) for r in report["runs"]])


def main(argv=None, default_out=None) -> int:
    """bench/bench_torch.py's command line. default_out: where a full run writes its report when --out is not
    given (the wrapper's record); --quick is a smoke run, not for the record: written to an explicit --out only."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="2", type=listing(thread_count(), "thread counts"),
                    help="comma-separated CPU thread counts (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    ap.add_argument("--quick", action="store_true", help="ResNet-50 and 100 x 10,000 only, few rounds (a smoke "
                    "run, not for the record: no JSON written unless --out is given)")
    ap.add_argument("--out", default=None, help="write the JSON report here (bench/bench_torch.py: "
                    "bench/results/torch-cpu.json, except with --quick)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    threads = args.threads
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"argument --repeats: invalid number of repeats {args.repeats} (>= 1)")
    out = args.out if args.out is not None else (None if args.quick else default_out)
    return report_and_write(run(threads, args.repeats, args.quick, progress=not args.json), out, args.json)


def cli(args) -> int:
    """`fastopt bench --torch`: args as parsed by fastopt.cli (threads and repeats already checked;
    --device gpu only when torch sees a GPU)."""
    threads = (args.threads,) if args.threads else (2,)
    devices = ["cuda"] if args.device == "gpu" else ["cpu"]
    return report_and_write(run(threads, args.repeats, args.quick, devices=devices, progress=not args.json),
                            args.out, args.json)


def report_and_write(report, out, as_json) -> int:
    from fastopt.cli_args import dumps, write_json
    if out:
        write_json(out, report, indent=1)
    print(dumps(report, indent=1) if as_json else markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
