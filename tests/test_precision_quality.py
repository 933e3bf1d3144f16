"""Training quality of the precision modes (issue 13 item 6, DESIGN.md "Precision"), on the CPU kernels.

The same model trained from the same start with fastopt.AdamW in float32, and with bfloat16 master params
(the model computes in float32 from their widened copy, the usual mixed-precision loop; grads float32):
plain bf16 (round to nearest even, float32 state), bf16 + Kahan compensation, bf16 + stochastic rounding,
and bf16 params with bf16 state. Each must end within 1% (relative) of float32's final training objective
and at the same test accuracy to 1 point. The setups: the digits MLP (sklearn digits, 64-16-10, ReLU, L2
penalty 0.03 on the weights, 150 full-batch steps at lr 0.02: the objective's scale is set by the
penalty, as in real training where the loss does not go to zero) and linear least squares on diabetes.

The known failure (and what the modes are for): when lr * update is below half a bfloat16 ulp of the
params, plain bf16 rounds every update away and the params never move, while Kahan summation and
stochastic rounding track float32.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import dispatch

ml_dtypes = pytest.importorskip("ml_dtypes")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.skipif(not dispatch.cython_available(), reason="compiled extension not built")

from fastopt.train.data import load_dataset  # noqa: E402
from fastopt.train.models import DenseNetwork  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
MODES = {"bf16": {}, "bf16+kahan": dict(kahan=True), "bf16+stochastic": dict(stochastic_rounding=True, seed=1),
         "bf16 params+bf16 state": dict(state_dtype="bfloat16")}


def train(ds, sizes, task, mode, steps, lr, l2=0.0):
    """(final training objective, test accuracy or None) of full-batch AdamW from seed 0's start."""
    net = DenseNetwork(sizes, task=task, seed=0, dtype=np.float32, l2=l2)
    if mode == "float32":
        p = net.params
        opt = fastopt.AdamW([p], lr=lr, weight_decay=0.0)
    else:
        p = net.params.astype(BF16)
        opt = fastopt.AdamW([p], lr=lr, weight_decay=0.0, **MODES[mode])
    for _ in range(steps):
        if p is not net.params:
            net.params[...] = p.astype(np.float32)  # the float32 model computes from the 16-bit params
        net.loss_and_grad(ds.X_train, ds.y_train)
        opt.step([net.grads])  # float32 grads of the 16-bit params
    if p is not net.params:
        net.params[...] = p.astype(np.float32)
    loss = float(net.loss(ds.X_train, ds.y_train))
    accuracy = float(np.mean(net.predict(ds.X_test) == ds.y_test)) if task != "regression" else None
    return loss, accuracy


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", seed=0).astype(np.float32)
    setup = dict(sizes=[64, 16, 10], task="multiclass", steps=150, lr=0.02, l2=0.03)
    return ds, setup, train(ds, mode="float32", **setup)


@pytest.fixture(scope="module")
def regression():
    ds = load_dataset("diabetes", seed=0).astype(np.float32)
    setup = dict(sizes=[10, 1], task="regression", steps=500, lr=0.01)
    return ds, setup, train(ds, mode="float32", **setup)


@pytest.mark.parametrize("mode", list(MODES))
def test_digits_mlp_matches_float32(digits, mode):
    ds, setup, (loss32, acc32) = digits
    assert acc32 > 0.9  # the float32 run learned (the comparison means something)
    loss, acc = train(ds, mode=mode, **setup)
    assert abs(loss / loss32 - 1) < 0.01, (mode, loss, loss32)
    assert abs(acc - acc32) <= 0.01 + 1e-9, (mode, acc, acc32)


@pytest.mark.parametrize("mode", list(MODES))
def test_regression_matches_float32(regression, mode):
    ds, setup, (loss32, _) = regression
    assert loss32 < 0.6  # well below the variance of the standardised target (1): it fitted
    loss, _ = train(ds, mode=mode, **setup)
    assert abs(loss / loss32 - 1) < 0.01, (mode, loss, loss32)


def test_updates_below_half_an_ulp_stall_plain_bf16_only():
    """Params at 1.0 (bfloat16 ulp 2**-7) pushed up by constant gradients: AdamW's step is lr = 1e-3 per
    update, below half an ulp (3.9e-3). After 500 steps float32 is at 1.5; plain bf16 has not moved at
    all; Kahan is within one ulp of float32 everywhere; stochastic rounding is on float32's value on
    average (1% of the distance travelled) with the spread of its random rounding."""
    n, steps, lr = 4096, 500, 1e-3
    g = -np.ones(n, np.float32)
    runs = {}
    for mode, options in [("float32", None), ("bf16", {}), ("kahan", dict(kahan=True)),
                          ("stochastic", dict(stochastic_rounding=True, seed=3))]:
        p = np.ones(n, np.float32 if options is None else BF16)
        opt = fastopt.AdamW([p], lr=lr, weight_decay=0.0, **(options or {}))
        for _ in range(steps):
            opt.step([g])
        runs[mode] = p.astype(np.float32)
    ref = runs["float32"]
    np.testing.assert_allclose(ref, 1.5, rtol=1e-3)
    assert np.all(runs["bf16"] == 1.0)  # every update rounded away
    ulp = 2.0 ** -7  # of bfloat16 in [1, 2)
    assert np.max(np.abs(runs["kahan"] - ref)) <= ulp
    # each element a random walk of 500 roundings of +-1 ulp: spread ~ ulp * sqrt(500 * 0.13 * 0.87) = 0.06
    err = runs["stochastic"] - ref
    assert abs(err.mean()) < 0.005 and err.std() < 0.1 and np.max(np.abs(err)) < 0.4
