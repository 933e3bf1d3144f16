"""Per-epoch training time: fastopt's trainer against scikit-learn's MLPClassifier, same architecture,
batch size, epochs, optimizer (Adam, same learning rate and betas), dtype (float32) and data.

    .venv/bin/python bench/bench_train.py [--repeats 3] [--quick] [--out FILE]
    .venv/bin/python -m fastopt.benchmark_train [--out FILE] [--repeats 3] [--threads N|default]

bench/bench_train.py writes bench/results/train-cpu.json unless --out or --quick (a smoke run, not for the
record) is given; this module writes FILE when given.

Thread counts (--threads) are environment variables that BLAS and OpenMP read once, when NumPy and
fastopt load: bench/bench_train.py sets them before importing anything, and the runs this module starts
for each setting get them in their environment.

Cases: digits (MLP 64-128-10, the README's default run) and a larger synthetic problem
(784-256-10, 8192 samples, MNIST-shaped) where the matrix products dominate. sklearn's epoch covers
its minibatch loop only (a fit of N epochs minus a fit of one: its set-up is not an epoch's); ours also
evaluates the validation split every epoch (a handicap we keep because it is what `fastopt train` does). Reported: median over repeats of seconds per epoch, and the
ratio sklearn / fastopt (> 1: fastopt is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

import fastopt
from fastopt.cli_args import thread_count
from fastopt.train.data import Dataset, load_dataset
from fastopt.train.models import MLP
from fastopt.train.trainer import TrainConfig, fit

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def synthetic(n=8192, features=784, classes=10, seed=0):
    """A linearly separable-ish MNIST-shaped problem: the timings, not the accuracy, matter here."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n + 1024, features))
    y = (X @ rng.normal(size=(features, classes))).argmax(axis=1)
    return Dataset("synthetic", "multiclass", X[:n], y[:n], X[n:n + 512], y[n:n + 512], X[n + 512:], y[n + 512:],
                   n_classes=classes)


def time_fastopt(data, hidden, epochs, batch_size, lr, seed):
    data32 = data.astype(np.float32)
    model = MLP(data32.n_features, (hidden,), data32.n_classes, seed=seed)
    result = fit(model, data32, TrainConfig(optimizer="adam", lr=lr, epochs=epochs, batch_size=batch_size,
                                            seed=seed, progress=False))
    return result.train_seconds / result.epochs_run, result.metrics["test"]["accuracy"]


def time_sklearn(data, hidden, epochs, batch_size, lr, seed):
    """(seconds per epoch, test accuracy) of sklearn's MLPClassifier: a fit of `epochs` minus a fit of one
    epoch (the same seed), over the epochs in between, so that fit()'s one-time set-up (input checks, label
    encoding, weight initialisation: ~17 ms on digits, 3% of 20 epochs) is not charged to the epochs."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    X, y = data.X_train.astype(np.float32), data.y_train

    def fit(max_iter):
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", solver="adam", alpha=0.0,
                            batch_size=batch_size, learning_rate_init=lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                            max_iter=max_iter, shuffle=True, random_state=seed, tol=0.0, n_iter_no_change=10 ** 6,
                            early_stopping=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            start = time.perf_counter()
            clf.fit(X, y)
            return time.perf_counter() - start, clf

    seconds, clf = fit(epochs)
    accuracy = float((clf.predict(data.X_test.astype(np.float32)) == data.y_test).mean())
    if clf.n_iter_ < 2:
        return seconds / clf.n_iter_, accuracy
    one, _ = fit(1)
    return max(seconds - one, 0.0) / (clf.n_iter_ - 1), accuracy


def machine():
    import sklearn

    from fastopt.benchmark import machine_info
    return {**machine_info(), "scikit-learn": sklearn.__version__, "fastopt_threads": fastopt.get_num_threads()}


def main(argv=None, default_out=None):
    """The command line (bench/bench_train.py's too). default_out: where a full run writes its report when --out
    is not given (the wrapper's record); --quick is a smoke run, not for the record: written to an explicit
    --out only."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the JSON report here (bench/bench_train.py: "
                        "bench/results/train-cpu.json, except with --quick)")
    parser.add_argument("--quick", action="store_true", help="digits only, 1 repeat (a smoke run, not for the "
                        "record: no JSON written unless --out is given)")
    parser.add_argument("--threads", default=None, type=_threads_or_default,
                        help="BLAS and OpenMP threads for both libraries, or 'default' (unset: run once "
                             "with the machine's defaults and once with 1 thread, each in its own process)")
    args = parser.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = default_out
    if args.threads is None:
        return _both_thread_settings(args)
    cases = [("digits", lambda: load_dataset("digits", seed=0), 128, 20, 32, 5e-3)]
    if not args.quick:
        cases.append(("synthetic-784-256-10", synthetic, 256, 3, 64, 1e-3))
    repeats = 1 if args.quick else args.repeats
    rows = []
    for name, load, hidden, epochs, batch_size, lr in cases:
        data = load()
        ours, theirs = [], []
        for r in range(repeats):  # interleaved, so drifting machine load hits both alike
            ours.append(time_fastopt(data, hidden, epochs, batch_size, lr, seed=r))
            theirs.append(time_sklearn(data, hidden, epochs, batch_size, lr, seed=r))
        f_epoch = statistics.median(t for t, _ in ours)
        s_epoch = statistics.median(t for t, _ in theirs)
        row = {"case": name, "architecture": f"{data.n_features}-{hidden}-{data.n_classes}",
               "train_samples": int(len(data.y_train)), "epochs": epochs, "batch_size": batch_size, "lr": lr,
               "dtype": "float32", "repeats": repeats,
               "fastopt_s_per_epoch": f_epoch, "sklearn_s_per_epoch": s_epoch, "speedup_vs_sklearn": s_epoch / f_epoch,
               "fastopt_test_accuracy": [a for _, a in ours], "sklearn_test_accuracy": [a for _, a in theirs]}
        rows.append(row)
        print(f"{name:>22} {row['architecture']:>11}  fastopt {f_epoch * 1e3:8.2f} ms/epoch   "
              f"sklearn {s_epoch * 1e3:8.2f} ms/epoch   sklearn/fastopt = {row['speedup_vs_sklearn']:.2f}x   "
              f"test acc {np.mean(row['fastopt_test_accuracy']):.4f} vs {np.mean(row['sklearn_test_accuracy']):.4f}")
    payload = {"benchmark": "per-epoch training time, fastopt trainer vs sklearn MLPClassifier",
               "threads": args.threads, "machine": machine(), "results": rows}
    _write(args.out, payload)
    return 0


def _write(out, payload):
    if out is None:  # printed only: a smoke run (--quick) or no --out
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {out}")


def _threads_or_default(text):
    """--threads: a thread count, as text (it becomes environment variables), or 'default'."""
    return "default" if text.strip() == "default" else str(thread_count("threads (or 'default')")(text))


def _both_thread_settings(args):
    """Small matrices and a shared machine make thread counts decisive (idle spinning threads of one
    library slow the other): record the default and the single-threaded setting side by side."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:  # the children's reports, whether or not this run writes one
        for threads in ("default", "1"):
            out = os.path.join(tmp, f"{threads}.json")
            cmd = [sys.executable, "-m", __spec__.name if __spec__ else "fastopt.benchmark_train",
                   "--repeats", str(args.repeats), "--out", out]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--threads", threads]  # given, so the child measures instead of recursing
            env = dict(os.environ)
            for k in THREAD_VARIABLES:  # in the child's environment before it loads NumPy and fastopt
                if threads == "default":
                    env.pop(k, None)
                else:
                    env[k] = threads
            print(f"-- threads: {threads}")
            subprocess.run(cmd, check=True, env=env)
            with open(out) as f:
                runs[threads] = json.load(f)
    payload = {"benchmark": runs["1"]["benchmark"], "machine": runs["1"]["machine"],
               "by_threads": {k: v["results"] for k, v in runs.items()}}
    _write(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
