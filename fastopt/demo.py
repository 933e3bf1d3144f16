"""`python -m fastopt.demo`: the functional API on a small problem, then the short CPU benchmark.

Fits a least-squares problem with every registry optimizer through fastopt's fused steps, showing the calls
a user writes: state from init_state, one <name>_step per iteration, clipping fused as grad_scale. Then the
composite optimizers (fastopt.specs.COMPOSITE: classes, not fused steps) on a matrix least-squares problem,
a few steps each: Muon and Adafactor need a 2-D param (orthogonalized / factored updates), SparseAdam is given
every row as present, LBFGS is closure-driven.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import fastopt
from fastopt.specs import COMPOSITE, REGISTRY

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


# composite optimizers on the matrix problem: (steps, constructor keywords); tuned on it
COMPOSITE_RUNS = {
    "lbfgs": (5, dict(lr=1, line_search_fn="strong_wolfe")),  # 5 steps of up to 20 iterations each
    "muon": (100, dict(lr=0.2, weight_decay=0.0)),
    "adafactor": (100, dict(lr=1.0)),  # the relative step rho = min(lr, 1/sqrt(t)): the paper's 1/sqrt(t)
    "sparse_adam": (100, dict(lr=0.2)),
}


def matrix_least_squares(seed=0, n=256, d=32, k=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w_true = rng.standard_normal((d, k)).astype(np.float32)
    return x, x @ w_true, w_true


def fit_composite(name, x, y):
    """(W, final MSE) after COMPOSITE_RUNS[name] steps of fastopt.<Class> on min |x W - y|^2 / n."""
    steps, kwargs = COMPOSITE_RUNS[name]
    w = np.zeros((x.shape[1], y.shape[1]), np.float32)
    opt = getattr(fastopt, COMPOSITE[name].class_name)([w], **kwargs)

    def loss_and_grad():
        r = x @ w - y
        return float(np.mean(r * r)), (2.0 / r.size * (x.T @ r)).astype(np.float32)
    rows = np.arange(w.shape[0])
    for _ in range(steps):
        if name == "lbfgs":
            opt.step(lambda: (lambda loss, g: (loss, [g]))(*loss_and_grad()))
        elif name == "sparse_adam":
            opt.step([(rows, loss_and_grad()[1])])  # every row present: Adam with lazy semantics
        else:
            opt.step([loss_and_grad()[1]])
    return w, loss_and_grad()[0]


def list_optimizers():
    """Every optimizer fastopt has: the registry's fused steps, then the composite classes."""
    x, y, w_true = least_squares()
    print("fastopt demo: least squares, 512 x 64, 300 steps per optimizer (float32, fused CPU kernels)")
    print(f"{'optimizer':>19} {'final MSE':>12} {'|w - w*|':>10} {'ms/step':>8}")
    for name in REGISTRY:
        t0 = time.perf_counter()
        w, loss = fit(name, x, y)
        ms = (time.perf_counter() - t0) * 1e3 / 300
        print(f"{name:>19} {loss:12.3e} {float(np.linalg.norm(w - w_true)):10.3e} {ms:8.3f}")
    x, y, w_true = matrix_least_squares()
    start = float(np.mean(y * y))
    print(f"\ncomposite optimizers (classes): matrix least squares, 256 x 32 -> 16, W 32 x 16 (MSE at W = 0: "
          f"{start:.3g})")
    print(f"{'optimizer':>19} {'class':>10} {'steps':>6} {'final MSE':>12} {'ms/step':>8}  summary")
    for name, spec in COMPOSITE.items():
        t0 = time.perf_counter()
        _, loss = fit_composite(name, x, y)
        steps = COMPOSITE_RUNS[name][0]
        ms = (time.perf_counter() - t0) * 1e3 / steps
        summary = spec.summary.split(":")[0].split(" as ")[0]
        print(f"{name:>19} {spec.class_name:>10} {steps:>6} {loss:12.3e} {ms:8.3f}  {summary}")


def main():
    list_optimizers()
    print("\nShort CPU benchmark (fastopt bench --quick):")
    from fastopt.cli import main as cli_main
    return cli_main(["bench", "--quick"])


if __name__ == "__main__":
    sys.exit(main())
