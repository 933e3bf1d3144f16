"""The test suite as two pytest processes side by side (what `make test`, and so CI, runs).

Why: the GPU-emulation tests (tests/gpu: the CUDA kernels compiled with g++ and run on fibers, the Numba
simulator, the PTX checks) take about three quarters of the suite's time on a 2-core machine, and almost all
of it on one core. Run beside the rest, the suite takes about as long as that half alone: on the 2-core CI
machine, about 45 instead of 61 minutes.

    python tests/run_suite.py [pytest options]

The options go to both processes. The half named in BESIDE runs in a second process whose report is printed
whole once the first half has finished; the exit status is the first half's failure, else the second's.
With one CPU, or FASTOPT_TEST_SERIAL=1, it is one pytest over everything, as `python -m pytest` runs it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BESIDE = "tests/gpu"


def commands(argv: list[str]) -> tuple[list[str], list[str]]:
    """The two pytest command lines: everything but BESIDE, and BESIDE (without the cache plugin, whose
    writes to .pytest_cache would race the first process's)."""
    base = [sys.executable, "-m", "pytest", *argv]
    return base + [f"--ignore={BESIDE}"], base + ["-p", "no:cacheprovider", BESIDE]


def serial() -> bool:
    return (os.cpu_count() or 1) < 2 or os.environ.get("FASTOPT_TEST_SERIAL", "") not in ("", "0")


def main(argv: list[str]) -> int:
    if serial():
        return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=ROOT)
    first, second = commands(argv)
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        beside = subprocess.Popen(second, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc_first = subprocess.call(first, cwd=ROOT)
            if beside.poll() is None:
                print(f"\n(waiting for {BESIDE}, running beside since the start)", flush=True)
            rc_second = beside.wait()
        finally:
            if beside.poll() is None:  # interrupted: stop the second half too
                beside.terminate()
                beside.wait()
        log.seek(0)
        print(f"\n======== {BESIDE} (run beside the rest) ========", flush=True)
        sys.stdout.write(log.read())
        sys.stdout.flush()
    return rc_first or rc_second


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
