"""Sharded-optimizer benchmark (MPI, CPU), recorded in bench/results/distributed-cpu.json with machine info.

    .venv/bin/python bench/bench_distributed.py [--worlds 1,2,3,4] [--sizes 1e6,1e7]   (writes the JSON unless --quick)
    .venv/bin/python -m fastopt.benchmark_distributed [--quick] [--out FILE]         (prints; FILE when given)

For each world size the benchmark starts `mpiexec -n W python -m mpi4py -m fastopt.benchmark_distributed
--worker` (the mpich wheel's mpiexec, oversubscribed: `-launcher fork`), each rank with `--threads` CPU
threads (default 1), and measures, for Adam on N float32 params in one bucket:

  step         ShardedOptimizer.step(grads) with the user's own arrays: gradients packed into the send
               buffer, gathered params copied back into the user's params
  step_views   the same when the user trains on opt.params and writes gradients into opt.grads (no copies)
  update       the fused update of this rank's shard alone (fastopt.adam_step on N / W elements)
  rs, ag       the reduce-scatter of the gradient buffer and the all-gather of the param buffer alone
  model        update + rs + ag: what a step must cost at least (the target: step_views <= 1.2x model at W=2)
  parts        rs, update and ag run back to back on the same buffers without the optimizer: the model's
               three parts with the caches and rank skew of a real step (timed alone, each part finds its
               buffers in the cache at 1e6 params, and both ranks start it together)
  dp           plain data parallelism for comparison: MPI_Allreduce of the gradients (in place) and the update
               of all N params on every rank (each rank holds the whole state)

Cost model (per rank per step, ring algorithms): the reduce-scatter sends (W-1)/W of the gradient buffer and
the all-gather (W-1)/W of the param buffer, together 2 (W-1)/W x 4N bytes, the volume of one all-reduce of
the gradients (what plain data parallelism moves); the update touches N / W params (28 bytes each for
Adam); optimizer state per rank is 8N / W bytes (+ padding). Packing the gradients into the send buffer
and copying the gathered params into the user's arrays add 8 bytes per param each (of all N, on every
rank); training on opt.params with gradients written into opt.grads removes both. One all-reduce of one
number per step (the ranks agree that every rank's gradients passed the checks) adds a latency. MPICH
moves data between the ranks of one machine through shared memory, so the "bytes" are the algorithmic
volume, and the collective times are measured. Components timed alone run with warm caches, so at sizes
that fit the last-level cache the model is optimistic; at 1e7 params (160 MB of buffers) it is not.

Timing: variants interleaved round by round, each round a block of calls between barriers, the slowest
rank's time per call; the median over rounds is reported, and the minimum (contention on a shared machine
only adds time), with the target ratio computed from both. The single-process fastopt.Adam step on all N
params (world 1, all cores) is recorded for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from fastopt.benchmark import machine_info
from fastopt.cli_args import integer, listing, thread_count, write_json

MODEL_TARGET = 1.2


def _worker(sizes, calls, rounds):
    from mpi4py import MPI

    import fastopt
    from fastopt.distributed import ShardedOptimizer
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    fastopt.set_num_threads(threads)
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(n).astype(np.float32)]
        grads = [(rng.standard_normal(n) * 1e-3).astype(np.float32)]
        hp = dict(lr=1e-6)
        opt = ShardedOptimizer("adam", params, comm, **hp)
        views = ShardedOptimizer("adam", [params[0].copy()], comm, copy_params=False, **hp)  # train on views.params
        views.grads[0][...] = grads[0]   # gradients written into the optimizer's send buffer: no packing
        view_grads = views.grads
        (bucket,) = opt.layout.buckets
        shard_p, shard_s = opt.shard_params()[0], opt.shard_states()[0]
        # filled, not np.zeros: untouched calloc pages all map to the one zero page, and reading them moves
        # no memory (the parts timed alone would look faster than they are)
        shard_g = np.full_like(shard_p, 1e-3)
        send = np.full(world * bucket.shard, 1e-3, np.float32)
        recv = np.full(bucket.shard, 1.0, np.float32)
        flat = np.full(world * bucket.shard, 1.0, np.float32)
        adapter = opt.comm

        def update():
            fastopt.adam_step(shard_p, shard_g, **shard_s, step=1, lr=1e-6, grad_scale=1.0 / world)

        dp_p, dp_g = params[0].copy(), grads[0].copy()
        dp_state = fastopt.init_state("adam", dp_p)

        def data_parallel():
            comm.Allreduce(MPI.IN_PLACE, dp_g, op=MPI.SUM)
            fastopt.adam_step(dp_p, dp_g, **dp_state, step=1, lr=1e-6, grad_scale=1.0 / world)

        variants = {
            "step": lambda: opt.step(grads),
            "step_views": lambda: views.step(view_grads),
            "update": update,
            "rs": lambda: adapter.reduce_scatter(send, recv).wait(),
            "ag": lambda: adapter.all_gather(flat, bucket.shard).wait(),
            "dp": data_parallel,
            "parts": lambda: (adapter.reduce_scatter(send, recv).wait(), update(),
                              adapter.all_gather(flat, bucket.shard).wait()),
        }
        times = {k: [] for k in variants}
        for k, fn in variants.items():  # warm-up
            fn()
        for _ in range(rounds):
            for k, fn in variants.items():
                comm.Barrier()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                dt = (time.perf_counter() - t0) / calls
                times[k].append(comm.allreduce(dt, op=MPI.MAX))
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        row = {"n": n, "world": world, "threads_per_rank": threads, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
               **{f"{k}_min_ms": v * 1e3 for k, v in low.items()}}
        row["model_ms"] = (med["update"] + med["rs"] + med["ag"]) * 1e3
        row["step_over_model"] = med["step"] / (row["model_ms"] / 1e3)
        row["step_views_over_model"] = med["step_views"] / (row["model_ms"] / 1e3)
        # contention on a shared machine only ever adds time: the minima are the other estimate
        row["model_min_ms"] = (low["update"] + low["rs"] + low["ag"]) * 1e3
        row["step_views_over_model_min"] = low["step_views"] / (row["model_min_ms"] / 1e3)
        row["step_views_over_dp"] = med["step_views"] / med["dp"]
        row["step_views_over_parts"] = med["step_views"] / med["parts"]
        g_bytes, p_bytes = send.nbytes, flat.nbytes
        sent = (world - 1) / world * (g_bytes + p_bytes)
        row["bytes_sent_per_rank_per_step"] = int(sent)
        row["bytes_sent_over_params_bytes"] = sent / (4 * n)
        row["allreduce_equivalent_bytes"] = int(2 * (world - 1) / world * 4 * n)
        row["rs_GBps"] = (world - 1) / world * g_bytes / med["rs"] / 1e9 if world > 1 else None
        row["ag_GBps"] = (world - 1) / world * p_bytes / med["ag"] / 1e9 if world > 1 else None
        row["state_bytes_per_rank"] = opt.state_bytes()
        row["state_bytes_single_process"] = 2 * 4 * n
        row["state_fraction"] = opt.state_bytes() / (2 * 4 * n)
        if world == 1:
            single = fastopt.Adam([params[0].copy()], **hp)
            fastopt.set_num_threads(os.cpu_count() or 1)
            single.step(grads)
            ts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    single.step(grads)
                ts.append((time.perf_counter() - t0) / calls)
            row["single_process_class_step_ms_all_cores"] = statistics.median(ts) * 1e3
            fastopt.set_num_threads(threads)
        rows.append(row)
        opt = views = view_grads = dp_p = dp_g = dp_state = None  # freed before the next size is allocated
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)


def _launcher():
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(exe):
        raise SystemExit("no mpiexec next to python: pip install 'fastopt[distributed]' (mpi4py and the mpich wheel)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return [exe, "-launcher", "fork"] if "HYDRA" in version else [exe, "--oversubscribe"]


def run(worlds, sizes, calls, rounds, threads=1):
    rows = []
    for w in worlds:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = _launcher() + ["-n", str(w), sys.executable, "-m", "mpi4py", "-m", "fastopt.benchmark_distributed",
                             "--worker", "--sizes", ",".join(str(n) for n in sizes), "--calls", str(calls),
                             "--rounds", str(rounds)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            raise SystemExit(f"world {w} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        for row in json.loads(line[0][len("RESULT "):]):
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    return (f"N={row['n']:.0e} world={row['world']} step {row['step_ms']:.3f} ms (views {row['step_views_ms']:.3f}) "
            f"update {row['update_ms']:.3f} rs {row['rs_ms']:.3f} ag {row['ag_ms']:.3f} -> model "
            f"{row['model_ms']:.3f} ms, step/model {row['step_over_model']:.2f} "
            f"(views {row['step_views_over_model']:.2f}); sent "
            f"{row['bytes_sent_over_params_bytes']:.2f}x params bytes; state {row['state_fraction']:.4f} of one "
            f"process")


def markdown_table(rows) -> str:
    lines = ["| N | world | step ms | step (opt.params) ms | update ms | reduce-scatter ms | all-gather ms | "
             "model ms | step / model | (opt.params) / model | same, minima | parts in sequence ms | "
             "(opt.params) / parts | plain DP ms | (opt.params) / DP | sent per rank / param bytes | "
             "state per rank / single |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:.0e} | {r['world']} | {r['step_ms']:.2f} | {r['step_views_ms']:.2f} | "
                     f"{r['update_ms']:.2f} | {r['rs_ms']:.2f} | {r['ag_ms']:.2f} | {r['model_ms']:.2f} | "
                     f"{r['step_over_model']:.2f} | {r['step_views_over_model']:.2f} | "
                     f"{r['step_views_over_model_min']:.2f} | {r['parts_ms']:.2f} | {r['step_views_over_parts']:.2f} | "
                     f"{r['dp_ms']:.2f} | {r['step_views_over_dp']:.2f} | "
                     f"{r['bytes_sent_over_params_bytes']:.2f} | {r['state_fraction']:.4f} |")
    return "\n".join(lines)


def main(argv=None, default_out=None):
    """The command line (bench/bench_distributed.py's too). default_out: where a full run writes its report when
    --out is not given (the wrapper's record); --quick is a smoke run, not for the record: written to an
    explicit --out only."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2,3,4", type=listing(integer("world size", low=1), "world sizes"))
    ap.add_argument("--sizes", default="1000000,10000000",
                    type=listing(integer("size", low=1, allow_exponent=True), "sizes"))
    ap.add_argument("--calls", type=integer("calls", low=1), default=None,
                    help="calls per timed block (default: by size)")
    ap.add_argument("--rounds", type=integer("rounds", low=1), default=11)
    ap.add_argument("--threads", type=thread_count("threads per rank"), default=1, help="CPU threads per rank (default 1: on a small shared "
                    "machine an OpenMP team whose threads get descheduled waits at every barrier)")
    ap.add_argument("--quick", action="store_true", help="one small size, 2 rounds of 5 calls (a smoke run, not "
                    "for the record: no JSON written unless --out is given)")
    ap.add_argument("--out", default=None, help="write the JSON report here (bench/bench_distributed.py: "
                    "bench/results/distributed-cpu.json, except with --quick)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = list(args.sizes)
    if args.quick:
        sizes, args.rounds, args.calls = [100_000], 2, args.calls or 5
    calls = args.calls or max(2, int(2e7 // max(sizes)))
    if args.worker:
        _worker(sizes, calls, args.rounds)
        return 0
    worlds = list(args.worlds)
    report = {"machine": machine_info(), "load_average_at_start": os.getloadavg(),
              "optimizer": "adam", "dtype": "float32", "engine": "mpi4py + mpich wheel (shared memory)",
              "timing": "median over interleaved rounds of the slowest rank's time per call",
              "target": f"step_views at world 2 <= {MODEL_TARGET} x model (update of N/2 + reduce-scatter + "
                        "all-gather)",
              "threads_per_rank": args.threads, "rows": run(worlds, sizes, calls, args.rounds, args.threads)}
    print(markdown_table(report["rows"]))
    out = args.out if args.out is not None else (None if args.quick else default_out)
    if out:
        write_json(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
