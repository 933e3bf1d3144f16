"""`python -m fastopt.demo`: the functional API on a small problem, then the short CPU benchmark.

Fits a least-squares problem with every optimizer through fastopt's fused steps, showing the calls a
user writes: state from init_state, one <name>_step per iteration, clipping fused as grad_scale.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import fastopt
from fastopt.specs import REGISTRY

# tuned on this problem; an optimizer not listed takes 10x its registry default (the problem is well scaled)
LEARNING_RATES = {"sgd": 0.05, "adagrad": 0.5, "rmsprop": 0.01, "adam": 0.05, "adamw": 0.05, "nadam": 0.05,
                  "radam": 0.1, "adabelief": 0.05, "lamb": 0.1, "lion": 0.02}


def learning_rate(name):
    default = REGISTRY[name].defaults["lr"]
    return LEARNING_RATES.get(name) or 10 * (default if isinstance(default, float) else 0.01)


def least_squares(seed=0, n=512, d=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w_true = rng.standard_normal(d).astype(np.float32)
    y = x @ w_true + 0.01 * rng.standard_normal(n).astype(np.float32)
    return x, y, w_true


def fit(name, x, y, steps=300, max_norm=10.0):
    spec = REGISTRY[name]
    step_fn = getattr(fastopt, spec.function_name)
    w = np.zeros(x.shape[1], np.float32)
    hp = {"lr": learning_rate(name)}
    if name == "sgd":
        hp["momentum"] = 0.9
    state = fastopt.init_state(name, w, **{k: v for k, v in hp.items() if k != "lr"})
    for t in range(1, steps + 1):
        grad = (x.T @ (x @ w - y) / len(y)).astype(np.float32)
        norm = fastopt.global_norm(grad)
        scale = fastopt.clip.clip_coefficient(norm, max_norm)  # clipping fused into the update
        step_fn(w, grad, **state, **hp, grad_scale=scale, **({"step": t} if spec.uses_step else {}))
    loss = float(np.mean((x @ w - y) ** 2))
    return w, loss


def main():
    x, y, w_true = least_squares()
    print("fastopt demo: least squares, 512 x 64, 300 steps per optimizer (float32, fused CPU kernels)")
    print(f"{'optimizer':>10} {'final MSE':>12} {'|w - w*|':>10} {'ms/step':>8}")
    for name in REGISTRY:
        t0 = time.perf_counter()
        w, loss = fit(name, x, y)
        ms = (time.perf_counter() - t0) * 1e3 / 300
        print(f"{name:>10} {loss:12.3e} {float(np.linalg.norm(w - w_true)):10.3e} {ms:8.3f}")
    print("\nShort CPU benchmark (fastopt bench --quick):")
    from fastopt.cli import main as cli_main
    return cli_main(["bench", "--quick"])


if __name__ == "__main__":
    sys.exit(main())
