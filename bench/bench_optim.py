"""Optimizer-class benchmark (CPU): writes bench/results/optim-cpu.json with machine info.

    .venv/bin/python bench/bench_optim.py [--quick] [--threads 1,2] [--out FILE]

An entry point: the benchmark is fastopt/benchmark_optim.py (what it measures and the targets are
described there)."""
import os
import sys

from fastopt.benchmark_optim import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "optim-cpu.json")]
    sys.exit(main(argv))
