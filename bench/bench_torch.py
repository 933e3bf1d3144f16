"""fastopt.torch against torch.optim (CPU; GPU too when torch sees one): writes bench/results/torch-cpu.json.

    .venv/bin/python bench/bench_torch.py [--quick] [--threads 1,2] [--out FILE]

An entry point: the benchmark is fastopt/benchmark_torch.py (what it measures and the targets are
described there); `fastopt bench --torch` runs the same. --quick is a smoke run, not for the record: its
JSON is written to an explicit --out only."""
import os
import sys

from fastopt.benchmark_torch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "torch-cpu.json")))
