"""GPU benchmark script: `python bench/bench_gpu.py [--quick] [--out bench/results/gpu-<device>.json]`.
An entry point: the same as `fastopt bench --device gpu` (fastopt/benchmark_gpu.py)."""
import sys

from fastopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--device", "gpu", *sys.argv[1:]]))
