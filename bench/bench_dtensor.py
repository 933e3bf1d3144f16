"""fastopt.torch on DTensor params (FSDP2's layout: every param Shard(0) over the ranks) against torch.optim on the
same DTensors: optimizer step time, 2 processes over gloo on the CPU. Writes bench/results/dtensor-cpu.json.

    .venv/bin/python bench/bench_dtensor.py [--world 2] [--threads 1] [--rounds 9] [--quick] [--out FILE]

Each rank holds its shard of a real model's parameter list (benchmark_torch's shapes: ResNet-50, 161 tensors,
25.6M params; GPT-2 small, 148 tensors, 124M params; --quick: 100 x 10,000) and steps AdamW (lr 1e-3, weight
decay 0.01) with these variants, interleaved round by round, each step timed between barriers (median over the
rounds; the slower rank counts, as a step waits for it):
  fastopt          fastopt.torch.AdamW on the DTensors (the kernels on each rank's local tensors)
  torch foreach    torch.optim.AdamW(foreach=True) on the DTensors (torch's default there)
  torch for-loop   torch.optim.AdamW(foreach=False) on the DTensors
  fastopt local    fastopt.torch.AdamW on plain tensors holding the same local shards: what the DTensor
                   wrapping costs fastopt
  torch fused local torch.optim.AdamW(fused=True) on those plain tensors (torch's fused kernel refuses DTensors
                   on the CPU in some versions: measured where it runs)
and the bandwidth ceiling: on each rank at the same time, AdamW's read/write pattern (28 bytes per param: p, m,
v read and written, g read; float32) with trivial math over one array per operand of the rank's local size
(the compiled `touch` loop of fastopt's CPU benchmark).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_PARAM = 28  # AdamW, float32: p, m, v read and written, g read
VARIANTS = ("fastopt", "torch foreach", "torch for-loop", "fastopt local", "torch fused local")


def shape_lists(quick: bool) -> dict:
    from fastopt.benchmark_torch import gpt2_small_shapes, resnet50_shapes
    if quick:
        return {"100x10000": [(10_000,)] * 100}
    return {"resnet50": resnet50_shapes(), "gpt2-small": gpt2_small_shapes()}


def worker(rank: int, world: int, init: str, out: str, threads: int, rounds: int, quick: bool) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    import numpy as np

    import fastopt
    import fastopt.torch as ft
    from fastopt.kernels.cpu import _cpu_fast
    torch.set_num_threads(threads)
    fastopt.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, shapes in shape_lists(quick).items():
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(s, generator=gen) for s in shapes]
        grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]

        def sharded():
            params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in full]
            for p, g in zip(params, grads):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            return params

        def local():
            params = [torch.nn.Parameter(p.to_local().detach().clone()) for p in sharded()]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            return params
        makers = {"fastopt": lambda: ft.AdamW(sharded(), lr=1e-3, weight_decay=0.01),
                  "torch foreach": lambda: torch.optim.AdamW(sharded(), lr=1e-3, weight_decay=0.01, foreach=True),
                  "torch for-loop": lambda: torch.optim.AdamW(sharded(), lr=1e-3, weight_decay=0.01, foreach=False),
                  "fastopt local": lambda: ft.AdamW(local(), lr=1e-3, weight_decay=0.01),
                  "torch fused local": lambda: torch.optim.AdamW(local(), lr=1e-3, weight_decay=0.01, fused=True)}
        opts, times = {}, {v: [] for v in VARIANTS}
        for v, make in makers.items():
            opts[v] = make()
            opts[v].step()  # state made
        local_params = sum(p.numel() for g in opts["fastopt local"].param_groups for p in g["params"])
        for _ in range(rounds):
            for v in VARIANTS:
                dist.barrier()
                t0 = time.perf_counter()
                opts[v].step()
                t = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step waits for the slower rank
                times[v].append(float(t))
        del opts
        # the ceiling: AdamW's read/write pattern with trivial math (fastopt's CPU benchmark's), over one array
        # of the rank's local size each, on every rank at once
        arrays = [np.ones(local_params, np.float32) for _ in range(4)]
        ceiling = []
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            _cpu_fast.touch(tuple(arrays), 0)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ceiling.append(float(t))
        del arrays
        ms = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
        ceiling_ms = statistics.median(ceiling) * 1e3
        results[name] = {
            "tensors": len(shapes), "params": sum(w.numel() for w in full), "local_params_rank0": local_params,
            "ms_median": ms, "ms_min": {v: min(ts) * 1e3 for v, ts in times.items()},
            "fastopt_speedup_vs": {v: ms[v] / ms["fastopt"] for v in VARIANTS if v != "fastopt"},
            "ceiling_ms": ceiling_ms, "fastopt_of_ceiling": ceiling_ms / ms["fastopt"],
            "fastopt_GBps_per_rank": BYTES_PER_PARAM * local_params / (ms["fastopt"] / 1e3) / 1e9}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads per rank")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="one small list, 3 rounds (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dtensor-cpu.json"))
    ap.add_argument("--worker", nargs=3, metavar=("RANK", "INIT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    if args.worker:
        rank, init, out = args.worker
        worker(int(rank), args.world, init, out, args.threads, rounds, args.quick)
        return 0
    from fastopt.benchmark import machine_info
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, __file__, "--world", str(args.world), "--threads", str(args.threads),
               "--rounds", str(rounds)] + (["--quick"] if args.quick else [])
        procs = [subprocess.Popen(cmd + ["--worker", str(r), init, out], env=env) for r in range(args.world)]
        if any(p.wait() != 0 for p in procs):
            print("a rank failed", file=sys.stderr)
            return 1
        with open(out) as f:
            results = json.load(f)
    report = {"machine": machine_info(), "world": args.world, "threads_per_rank": args.threads, "rounds": rounds,
              "optimizer": "AdamW", "placements": "Shard(0)", "lists": results}
    for name, r in results.items():
        print(f"{name}: {r['tensors']} tensors, {r['params']:,} params over {args.world} ranks")
        for v in VARIANTS:
            ratio = "" if v == "fastopt" else f"  ({r['fastopt_speedup_vs'][v]:.2f}x fastopt's time)"
            print(f"  {v:18s} {r['ms_median'][v]:9.2f} ms{ratio}")
        print(f"  ceiling            {r['ceiling_ms']:9.2f} ms  (fastopt at {r['fastopt_of_ceiling']:.2f} of it; "
              f"{r['fastopt_GBps_per_rank']:.1f} GB/s per rank)")
    if args.out and not args.quick:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
