"""LARS (You et al. 2017) through every entry point against pytorch_optimizer.LARS 4.x (a test extra): the
functional lars_step on lists (the compiled CPU backend: a norms pass, the trust ratios on the host, then the
elementwise kernel with one coefficient per tensor), the NumPy class fastopt.LARS and fastopt.torch.LARS
(channels_last conv weights included: their kernel views keep the param's ndim, which exclude_1d reads);
float32 and float64, 50 steps, two param groups, sizes 0 and 1, 0-d, 1-D to 4-D. The reference semantics
and the documented differences from pytorch_optimizer are in tests/test_new_optimizers.py (LARS section).
The Numba backend runs on the CUDA simulator here (the CuPy kernels are compile- and launch-checked in
tests/gpu); the sharded optimizer's LARS is tested in tests/distributed/test_lars.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.specs import REGISTRY

torch = pytest.importorskip("torch")
PLARS = pytest.importorskip("pytorch_optimizer").LARS
import fastopt.torch as fastopt_torch  # noqa: E402

SHAPES = [(0,), (1,), (7,), (33, 5), (), (1, 1), (4, 3, 2), (3, 2, 2, 2)]
STEPS = 50
OPTIONS = {
    "default": {},
    "wd": dict(weight_decay=0.05),
    "nesterov-wd": dict(nesterov=True, weight_decay=0.01),
    "no-momentum": dict(momentum=0.0, weight_decay=0.02),
    "dampening-max": dict(dampening=0.1, maximize=True),
    "trust": dict(trust_coefficient=0.02, momentum=0.5, weight_decay=0.01),
}


def _tol(dtype):
    return (1e-10, 1e-12) if dtype == np.float64 else (3e-5, 3e-6)


def _assert_close(ours, theirs, dtype, what):
    rtol, atol = _tol(dtype)
    scale = max(1.0, float(np.abs(theirs).max())) if theirs.size else 1.0
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol * scale, err_msg=what)


def _problem(rng, dtype):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tparams = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    return params, tparams


def _oracle_step(topt, tparams, grads):
    for tp, g in zip(tparams, grads):
        tp.grad = torch.tensor(g)
    topt.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_functional_lists_match_pytorch_optimizer(name, dtype, rng):
    """One lars_step call per step on the whole list (the compiled backend), 50 steps."""
    options = OPTIONS[name]
    params, tparams = _problem(rng, dtype)
    topt = PLARS(tparams, lr=0.5, **options)
    states = fastopt.init_state("lars", params, **{k: v for k, v in options.items() if k == "momentum"})
    for _ in range(STEPS):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        _oracle_step(topt, tparams, grads)
        fastopt.lars_step(params, grads, **states, lr=0.5, **options)
    for i, (p, tp) in enumerate(zip(params, tparams)):
        _assert_close(p, tp.detach().numpy(), dtype, f"params[{i}]")
        if "momentum_buffer" in states and p.size:
            _assert_close(states["momentum_buffer"][i], topt.state[tp]["momentum_buffer"].numpy(), dtype,
                          f"momentum_buffer[{i}]")
    assert params[3].dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_class_two_groups_and_grad_scale(dtype, rng):
    """fastopt.LARS with two groups (other lr and options each) against the same groups in pytorch_optimizer."""
    params, tparams = _problem(rng, dtype)
    g1 = dict(lr=0.5, weight_decay=0.05, nesterov=True)
    g2 = dict(lr=0.2, momentum=0.5, trust_coefficient=0.01)
    ours = fastopt.LARS([{"params": params[:4], **g1}, {"params": params[4:], **g2}])
    theirs = PLARS([{"params": tparams[:4], **g1}, {"params": tparams[4:], **g2}])
    for _ in range(STEPS):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        _oracle_step(theirs, tparams, grads)
        ours.step(grads)
    for i, (p, tp) in enumerate(zip(params, tparams)):
        _assert_close(p, tp.detach().numpy(), dtype, f"params[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_class_on_a_model_with_channels_last(dtype):
    """fastopt.torch.LARS on a conv (channels_last weight: a non-contiguous dense layout) + linear model with
    biases (1-D: excluded from the ratio), two groups, against pytorch_optimizer.LARS on a copy."""
    torch.manual_seed(5)

    def model():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).to(dtype)

    ours_m = model().to(memory_format=torch.channels_last)
    theirs_m = model()
    theirs_m.load_state_dict(ours_m.state_dict())
    assert not ours_m[0].weight.is_contiguous()
    groups = lambda m: [{"params": [m[0].weight, m[0].bias]},  # noqa: E731
                        {"params": [m[2].weight, m[2].bias], "lr": 0.2, "weight_decay": 0.01}]
    ours = fastopt_torch.LARS(groups(ours_m), lr=0.5, nesterov=True)
    theirs = PLARS(groups(theirs_m), lr=0.5, nesterov=True)
    x = torch.randn(8, 3, 8, 8, dtype=dtype)
    y = torch.randn(8, 5, dtype=dtype)
    for _ in range(20):
        for m, opt in ((ours_m, ours), (theirs_m, theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x.contiguous(memory_format=torch.channels_last) if m is ours_m else x),
                                         y).backward()
            opt.step()
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)  # the two models' grads differ too
    for (name, a), b in zip(ours_m.named_parameters(), theirs_m.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=rtol, atol=atol, err_msg=name)
        assert a.dtype == dtype and a.detach().numpy().dtype == np_dtype
    assert not ours_m[0].weight.is_contiguous()  # updated in its own storage


def test_exclude_1d_false_adapts_vectors_on_the_compiled_backend(rng):
    """exclude_1d=False: a 1-D param takes the trust ratio too (pytorch_optimizer on the same values shaped
    (n, 1), which it adapts); exclude_1d=True leaves it plain SGD with momentum."""
    p = rng.standard_normal(9)
    tp = torch.nn.Parameter(torch.tensor(p.copy()).reshape(9, 1))
    plain = p.copy()
    topt = PLARS([tp], lr=0.5, weight_decay=0.05)
    ours = fastopt.LARS([p], lr=0.5, weight_decay=0.05, exclude_1d=False)
    sgd_like = fastopt.LARS([plain], lr=0.5, weight_decay=0.05)
    for _ in range(10):
        g = rng.standard_normal(9)
        tp.grad = torch.tensor(g).reshape(9, 1)
        topt.step()
        ours.step([g])
        sgd_like.step([g])
    _assert_close(p, tp.detach().numpy().reshape(9), np.float64, "exclude_1d=False")
    assert not np.allclose(p, plain)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_backends_agree_and_bad_input_writes_nothing(backend, rng):
    """The compiled and the NumPy backends agree (their norms differ in summation order only); a bad call
    (a grad of the wrong shape after valid ones) raises naming it and leaves every array unchanged: the
    norms pass reads only."""
    params = [rng.standard_normal(s) for s in [(4, 3), (5,), (2, 2, 2)]]
    other = [p.copy() for p in params]
    bufs, obufs = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    for _ in range(5):
        grads = [rng.standard_normal(p.shape) for p in params]
        fastopt.lars_step(params, grads, bufs, lr=0.3, weight_decay=0.1, backend=backend)
        fastopt.lars_step(other, grads, obufs, lr=0.3, weight_decay=0.1,
                          backend="numpy" if backend == "cython" else "cython")
    for a, b in zip(params + bufs, other + obufs):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    before = [a.copy() for a in params + bufs]
    bad = [rng.standard_normal(p.shape) for p in params]
    bad[2] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"grads\[2\]"):
        fastopt.lars_step(params, bad, bufs, lr=0.3, backend=backend)
    for a, b in zip(params + bufs, before):
        assert a.tobytes() == b.tobytes()


def test_sharding_takes_lars():
    """ShardedOptimizer runs LARS (per-piece sums of squares and one all-reduce: tests/distributed/test_lars.py)
    and LAMB (its two passes apart, a second all-reduce: tests/distributed/test_lamb.py)."""
    from fastopt.distributed.sharded import unsupported_reason
    spec = REGISTRY["lars"]
    assert unsupported_reason(spec) is None and unsupported_reason(REGISTRY["lamb"]) is None
    assert spec.norms_per_tensor and not REGISTRY["adam"].norms_per_tensor


def test_numba_simulator_matches_the_reference():
    """The Numba backend on the CUDA simulator (its kernels read the per-tensor ratios from an array): lists
    with an empty array, 1-D (excluded) and 2-D params, a grad_scale, float32 and float64."""
    pytest.importorskip("numba")
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "gpu", "lars_sim_check.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert out.returncode == 0 and "LARS SIM: ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
