"""Sharded-optimizer benchmark (MPI, CPU): writes bench/results/distributed-cpu.json with machine info.

    .venv/bin/python bench/bench_distributed.py [--worlds 1,2,3,4] [--sizes 1e6,1e7] [--out FILE]

An entry point: the benchmark is fastopt/benchmark_distributed.py (what it measures, the cost model and
the target are described there). Needs pip install .[distributed] (mpi4py and the mpich wheel). --quick
is a smoke run, not for the record: its JSON is written to an explicit --out only."""
import os
import sys

from fastopt.benchmark_distributed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "distributed-cpu.json")))
