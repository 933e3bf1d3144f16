"""CPU benchmark: every optimizer x N in {1e5, 1e6, 1e7}, float32; writes bench/results/cpu-<host>.json
and prints the README table. An entry point: the same as `fastopt bench --out ...` (fastopt/benchmark.py)."""
import os
import platform
import sys

from fastopt.cli import main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "results", f"cpu-{platform.node() or 'host'}.json")
    sys.exit(main(["bench", "--out", out, *sys.argv[1:]]))
