"""Per-epoch training time, fastopt's trainer against scikit-learn's MLPClassifier: writes
bench/results/train-cpu.json.

    .venv/bin/python bench/bench_train.py [--repeats 3] [--quick] [--threads N|default] [--out FILE]

An entry point: the benchmark is fastopt/benchmark_train.py (cases and method described there). --quick is
a smoke run, not for the record: its JSON is written to an explicit --out only."""
import os
import sys

if "--threads" in sys.argv[:-1] and sys.argv[sys.argv.index("--threads") + 1] != "default":
    # BLAS and OpenMP read these once, when NumPy and fastopt load: set them before importing either
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = sys.argv[sys.argv.index("--threads") + 1]

from fastopt.benchmark_train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "train-cpu.json")))
