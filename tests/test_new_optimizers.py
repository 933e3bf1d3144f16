"""Issue 14's elementwise optimizers against their oracles, through the classes (param groups, float32 and
float64, 50 steps, sizes 0, 1 and odd): torch.optim.Adadelta, ASGD and Rprop, and pytorch_optimizer's Yogi
(a test extra). The registry-driven suites already check every one of them against the NumPy reference bit
for bit, through every backend's compile checks, checkpoints and the fuzz tables; what is here is what
those tables cannot say: torch's options that are not plain hyperparameters (Rprop's etas/step_sizes
pairs, ASGD's averaging once t0 is passed, its eta/mu state), the start values of state (Rprop's
step_size = lr, Yogi's initial_accumulator), and torch's error messages."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")
import fastopt.torch as fastopt_torch  # noqa: E402

SHAPES = [(0,), (1,), (7,), (33, 5)]
STEPS = 50


def _tol(dtype):
    return (1e-10, 1e-12) if dtype == np.float64 else (2e-5, 2e-6)


def _groups(rng, dtype, lrs):
    """Two param groups (shapes split between them) with their own lr: NumPy arrays and torch copies."""
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tparams = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    ours = [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]
    theirs = [{"params": tparams[:2], "lr": lrs[0]}, {"params": tparams[2:], "lr": lrs[1]}]
    return params, tparams, ours, theirs


def _run(opt, topt, params, tparams, dtype, rng, scale=1.0):
    for _ in range(STEPS):
        grads = [(scale * rng.standard_normal(p.shape)).astype(dtype) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g.copy())
        topt.step()
        opt.step(grads)
    rtol, atol = _tol(dtype)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=rtol, atol=atol)


def _assert_state(opt, topt, tparams, dtype, names):
    """Every state array equals the oracle's state of the same name (ours -> theirs)."""
    rtol, atol = _tol(dtype)
    for i, tp in enumerate(tparams):
        state = opt.state_arrays(i)
        for ours, theirs in names.items():
            np.testing.assert_allclose(state[ours], topt.state[tp][theirs].numpy(), rtol=rtol, atol=atol,
                                       err_msg=ours)


@pytest.fixture(autouse=True)
def _default_dtype():
    yield
    torch.set_default_dtype(torch.float32)


def _match_default_dtype(dtype):
    # torch keeps ASGD's eta and mu (and Rprop's step) in the default dtype
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)


# ---- torch.optim.Rprop: etas and step_sizes are etaminus/etaplus and step_size_min/step_size_max here ----

RPROP_OPTIONS = [
    dict(),
    dict(etas=(0.3, 1.5)),
    dict(etas=(0.5, 1.2), step_sizes=(1e-3, 0.05)),   # both bounds bind within 50 steps
    dict(etas=(0.9, 3.0), step_sizes=(0.0, 1e9)),
    dict(maximize=True),
    dict(maximize=True, etas=(0.25, 2.0), step_sizes=(1e-4, 0.2)),
]


def _rprop_kwargs(options):
    kw = {"maximize": options.get("maximize", False)}
    if "etas" in options:
        kw["etaminus"], kw["etaplus"] = options["etas"]
    if "step_sizes" in options:
        kw["step_size_min"], kw["step_size_max"] = options["step_sizes"]
    return kw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", RPROP_OPTIONS, ids=[str(o) for o in RPROP_OPTIONS])
def test_rprop_matches_torch(options, dtype, rng):
    _match_default_dtype(dtype)
    params, tparams, ours, theirs = _groups(rng, dtype, (0.02, 0.005))
    topt = torch.optim.Rprop(theirs, foreach=False, **options)
    opt = fastopt.Rprop(ours, **_rprop_kwargs(options))
    # gradients with persistent signs on some elements, so step sizes grow to the upper bound too
    _run(opt, topt, params, tparams, dtype, rng)
    _assert_state(opt, topt, tparams, dtype, {"prev": "prev", "step_size": "step_size"})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rprop_functional_with_repeated_and_zero_gradients(dtype, rng):
    """Gradients that repeat (sign kept: growth to step_size_max), flip (shrink, gradient zeroed) and are
    exactly zero (factor 1) in one array, through the functional API with init_state(lr=...)."""
    _match_default_dtype(dtype)
    p = rng.standard_normal(1037).astype(dtype)
    tp = torch.nn.Parameter(torch.tensor(p.copy()))
    topt = torch.optim.Rprop([tp], lr=0.07, step_sizes=(1e-3, 0.5), foreach=False)
    state = fastopt.init_state("rprop", p, lr=0.07)
    assert (state["step_size"] == np.asarray(0.07, dtype)).all() and not state["prev"].any()
    base = rng.standard_normal(1037).astype(dtype)
    for t in range(STEPS):
        g = base * (1 if t % 3 else -1)
        g[::5] = 0
        g[1::7] = rng.standard_normal(g[1::7].shape)
        tp.grad = torch.tensor(g.copy())
        topt.step()
        fastopt.rprop_step(p, g, **state, step_size_min=1e-3, step_size_max=0.5)
    rtol, atol = _tol(dtype)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(state["step_size"], topt.state[tp]["step_size"].numpy(), rtol=rtol, atol=atol)
    np.testing.assert_array_equal(state["prev"], topt.state[tp]["prev"].numpy())


def test_rprop_step_size_starts_at_the_lr_of_its_group_and_schedule(rng):
    p, q = rng.standard_normal(4), rng.standard_normal(3)
    opt = fastopt.Rprop([{"params": [p], "lr": 0.3}, {"params": [q]}], lr=fastopt.schedules.constant(0.02))
    np.testing.assert_array_equal(opt.state_arrays(0)["step_size"], np.full(4, 0.3))
    np.testing.assert_array_equal(opt.state_arrays(1)["step_size"], np.full(3, 0.02))


@pytest.mark.parametrize("etas", [(1.0, 1.2), (0.0, 1.2), (0.5, 1.0), (0.5, 0.9)])
def test_rprop_bad_etas_raise_torchs_message_and_write_nothing(etas, rng):
    p = rng.standard_normal(5)
    before = p.copy()
    with pytest.raises(ValueError) as theirs:
        torch.optim.Rprop([torch.nn.Parameter(torch.tensor(p))], etas=etas)
    with pytest.raises(ValueError) as ours:
        fastopt.Rprop([p], etaminus=etas[0], etaplus=etas[1])
    assert str(ours.value).startswith(str(theirs.value) + " (etaminus must be")  # and names our arguments
    with pytest.raises(ValueError) as ours_torch:
        fastopt_torch.Rprop([torch.nn.Parameter(torch.tensor(p))], etas=etas)
    assert str(ours_torch.value) == str(theirs.value)
    state = fastopt.init_state("rprop", p)
    snap = [a.copy() for a in state.values()]
    with pytest.raises(ValueError, match="Invalid eta values"):
        fastopt.rprop_step(p, rng.standard_normal(5), **state, etaminus=etas[0], etaplus=etas[1])
    assert p.tobytes() == before.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(state.values(), snap))


# ---- torch.optim.ASGD: averaging after t0, eta and mu in torch's state dict ----

ASGD_OPTIONS = [
    dict(),
    dict(t0=5.0),                                   # averaging from step 7 on
    dict(t0=0.0, lambd=1e-2, alpha=0.5, weight_decay=0.05),
    dict(t0=20.0, lambd=0.1, alpha=1.0, maximize=True),
    dict(t0=-3.0, lambd=0.0),                       # mu < 1 from step 2
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", ASGD_OPTIONS, ids=[str(o) for o in ASGD_OPTIONS])
def test_asgd_matches_torch(options, dtype, rng):
    _match_default_dtype(dtype)
    params, tparams, ours, theirs = _groups(rng, dtype, (0.05, 0.2))
    topt = torch.optim.ASGD(theirs, foreach=False, **options)
    opt = fastopt.ASGD(ours, **options)
    _run(opt, topt, params, tparams, dtype, rng)
    _assert_state(opt, topt, tparams, dtype, {"ax": "ax"})
    # torch's per-param eta, mu and step come out of the conversion, and a fresh torch ASGD continues from it
    sd = opt.torch_state_dict()
    rtol = 1e-6  # the conversion writes eta and mu as float32 tensors (torch's default scalar dtype)
    for i, tp in enumerate(tparams):
        for key in ("eta", "mu", "step"):
            np.testing.assert_allclose(float(sd["state"][i][key]), float(topt.state[tp][key]), rtol=rtol, err_msg=key)
    fresh = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    again = torch.optim.ASGD([{"params": fresh[:2]}, {"params": fresh[2:]}], foreach=False, **options)
    again.load_state_dict(sd)
    grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
    for tp, fp, g in zip(tparams, fresh, grads):
        tp.grad, fp.grad = torch.tensor(g.copy()), torch.tensor(g.copy())
    topt.step()
    again.step()
    for tp, fp in zip(tparams, fresh):
        np.testing.assert_allclose(fp.detach().numpy(), tp.detach().numpy(), rtol=max(rtol, _tol(dtype)[0]),
                                   atol=max(1e-7, _tol(dtype)[1]))


def test_asgd_torch_state_dict_loads_back(rng):
    torch.set_default_dtype(torch.float64)
    p = rng.standard_normal(9)
    tp = torch.nn.Parameter(torch.tensor(p.copy()))
    topt = torch.optim.ASGD([tp], lr=0.1, t0=2.0, foreach=False)
    for _ in range(6):
        tp.grad = torch.tensor(rng.standard_normal(9))
        topt.step()
    opt = fastopt.ASGD([tp.detach().numpy().copy()], lr=0.1, t0=2.0)  # a torch state dict has no params
    opt.load_torch_state_dict(topt.state_dict())
    g = rng.standard_normal(9)
    tp.grad = torch.tensor(g.copy())
    topt.step()
    opt.step([g])
    np.testing.assert_allclose(opt.params[0], tp.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(opt.state_arrays(0)["ax"], topt.state[tp]["ax"].numpy(), rtol=1e-12)


@pytest.mark.parametrize("kwargs,match", [({"lambd": -1e-4}, "lambd"), ({"alpha": -0.5}, "alpha"),
                                          ({"t0": float("inf")}, "t0"), ({"lr": -0.1}, "learning rate")])
def test_asgd_bad_hyperparameters_write_nothing(kwargs, match, rng):
    p = rng.standard_normal(5)
    state = fastopt.init_state("asgd", p)
    snap = p.tobytes(), state["ax"].tobytes()
    with pytest.raises(ValueError, match=match):
        fastopt.asgd_step(p, rng.standard_normal(5), **state, step=1, **kwargs)
    assert (p.tobytes(), state["ax"].tobytes()) == snap


def test_asgd_huge_step_does_not_overflow():
    p, g = np.ones(3), np.ones(3)
    state = fastopt.init_state("asgd", p)
    fastopt.asgd_step(p, g, **state, step=2 ** 53, lambd=1e300, alpha=2.0, lr=1e3)  # (1 + 1e306 t)^2: inf
    np.testing.assert_array_equal(p, np.ones(3))                                     # eta = 0


# ---- torch.optim.Adadelta through the classes ----

ADADELTA_OPTIONS = [dict(), dict(rho=0.5, eps=1e-4), dict(weight_decay=0.05, maximize=True), dict(rho=1.0),
                    dict(rho=0.0, weight_decay=0.01)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", ADADELTA_OPTIONS, ids=[str(o) for o in ADADELTA_OPTIONS])
def test_adadelta_matches_torch(options, dtype, rng):
    _match_default_dtype(dtype)
    params, tparams, ours, theirs = _groups(rng, dtype, (1.0, 0.3))
    topt = torch.optim.Adadelta(theirs, foreach=False, **options)
    opt = fastopt.Adadelta(ours, **options)
    _run(opt, topt, params, tparams, dtype, rng)
    _assert_state(opt, topt, tparams, dtype, {"square_avg": "square_avg", "acc_delta": "acc_delta"})


@pytest.mark.parametrize("rho", [-0.1, 1.5])
def test_adadelta_bad_rho_raises_torchs_message(rho, rng):
    p = rng.standard_normal(3)
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adadelta([torch.nn.Parameter(torch.tensor(p))], rho=rho)
    with pytest.raises(ValueError) as ours:
        fastopt.Adadelta([p], rho=rho)
    assert str(ours.value) == str(theirs.value)


# ---- Yogi against pytorch_optimizer (a test extra) ----

def _yogi_oracle():
    return pytest.importorskip("pytorch_optimizer").Yogi


YOGI_OPTIONS = [dict(weight_decay=wd, decoupled_weight_decay=dec, fixed_decay=fixed, maximize=mx)
                for wd, dec, fixed, mx in itertools.product((0.0, 0.05), (True, False), (False, True), (False, True))
                if not (fixed and not dec)] + [dict(betas=(0.8, 0.99), eps=1e-6, initial_accumulator=0.01)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", YOGI_OPTIONS, ids=[str(o) for o in YOGI_OPTIONS])
def test_yogi_matches_pytorch_optimizer(options, dtype, rng):
    Yogi = _yogi_oracle()
    params, tparams, ours, theirs = _groups(rng, dtype, (0.01, 0.003))
    theirs_kw = {("weight_decouple" if k == "decoupled_weight_decay" else k): v for k, v in options.items()}
    topt = Yogi(theirs, foreach=False, **theirs_kw)
    opt = fastopt.Yogi(ours, **options)
    init = options.get("initial_accumulator", 1e-6)
    assert all((a == np.asarray(init, dtype)).all() for i in range(len(params)) for a in opt.state_arrays(i).values())
    _run(opt, topt, params, tparams, dtype, rng)
    _assert_state(opt, topt, tparams, dtype, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"})


# ---- LARS against pytorch_optimizer (a test extra): the NumPy reference, which the kernels must equal ----
# Here the reference semantics are pinned (the kernels' equality with the reference is in tests/test_lars.py).
# Documented differences:
# pytorch_optimizer has no eps (eps=0 is it) and always excludes ndim <= 1 (exclude_1d=True is it; with
# exclude_1d=False a 1-D param is adapted, which the oracle does for the same values shaped (n, 1)); it adds
# weight_decay * p even when weight_decay is 0 (0 * inf is NaN there, nothing here). optax.lars (not installed
# here) is another algorithm: its ratio is trust_coefficient * ||p|| / (||g + wd p|| + eps) (the norm of the
# decayed update, not ||g|| + wd ||p||), its masks default to adapting every param, and lr scales the update
# before the momentum trace (the same as here while lr is constant).

LARS_SHAPES = [(0,), (1,), (7,), (33, 5), (), (0, 3), (1, 1), (4, 3, 2)]


def _lars_oracle():
    return pytest.importorskip("pytorch_optimizer").LARS


LARS_OPTIONS = [dict(momentum=mom, nesterov=nest, dampening=damp, weight_decay=wd, maximize=mx)
                for mom, nest, damp, wd, mx in itertools.product((0.0, 0.9), (False, True), (0.0, 0.1), (0.0, 0.05),
                                                                 (False, True))
                if not (nest and mom == 0.0)] + [dict(trust_coefficient=0.02, weight_decay=0.01, momentum=0.5)]


def _lars_run(options, dtype, rng, exclude_1d=True, grad_scale=None, foreach=False):
    """50 steps of reference.lars_step per array against pytorch_optimizer.LARS on copies; returns both."""
    from fastopt import reference
    LARS = _lars_oracle()
    lr = 0.5
    params = [rng.standard_normal(s).astype(dtype) for s in LARS_SHAPES]
    # the oracle adapts ndim >= 2 only: exclude_1d=False is its behaviour on the same values shaped (n, 1)
    oracle_shape = (lambda s: s if exclude_1d or len(s) > 1 else (int(np.prod(s)), 1))
    tparams = [torch.nn.Parameter(torch.tensor(p.copy()).reshape(oracle_shape(p.shape))) for p in params]
    topt = LARS(tparams, lr=lr, foreach=foreach, **options)
    kw = dict(options, lr=lr, exclude_1d=exclude_1d)
    bufs = [np.zeros_like(p) for p in params] if kw.get("momentum", 0.9) > 0 else [None] * len(params)
    for _ in range(STEPS):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g * (1.0 if grad_scale is None else grad_scale)).reshape(tp.shape)
        topt.step()
        for p, g, b in zip(params, grads, bufs):
            reference.lars_step(p, g, b, grad_scale=grad_scale, **kw)
    return params, bufs, tparams, topt


def _lars_compare(params, bufs, tparams, topt, dtype):
    rtol, atol = _tol(dtype)
    for i, (p, b, tp) in enumerate(zip(params, bufs, tparams)):
        want = tp.detach().numpy().reshape(p.shape)
        # absolute error on the scale of the tensor (maximize grows params to ~30: one float32 ulp there is
        # 2e-6, which a small element of the same tensor can differ by after 50 steps)
        scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        np.testing.assert_allclose(p, want, rtol=rtol, atol=atol * scale, err_msg=f"p{i}")
        if b is not None and p.size:
            want_b = topt.state[tp]["momentum_buffer"].numpy().reshape(p.shape)
            np.testing.assert_allclose(b, want_b, rtol=rtol, atol=atol * max(1.0, float(np.abs(want_b).max())),
                                       err_msg=f"momentum_buffer{i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=[str(o) for o in LARS_OPTIONS])
def test_lars_reference_matches_pytorch_optimizer(options, dtype, rng):
    params, bufs, tparams, topt = _lars_run(options, dtype, rng)
    _lars_compare(params, bufs, tparams, topt, dtype)
    assert params[3].dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lars_reference_exclude_1d_false_adapts_vectors(dtype, rng):
    params, bufs, tparams, topt = _lars_run(dict(weight_decay=0.05, nesterov=True), dtype, rng, exclude_1d=False)
    _lars_compare(params, bufs, tparams, topt, dtype)


def test_lars_reference_foreach_oracle_and_grad_scale(rng):
    # pytorch_optimizer's foreach path is the same algorithm; grad_scale multiplies g before the norms
    params, bufs, tparams, topt = _lars_run(dict(weight_decay=0.05), np.float64, rng, grad_scale=0.25, foreach=True)
    _lars_compare(params, bufs, tparams, topt, np.float64)


def test_lars_trust_ratio_is_per_tensor_and_1d_is_plain_sgd(rng):
    from fastopt import reference
    # a 1-D param under exclude_1d: SGD with a zero-started buffer, no weight decay
    p = rng.standard_normal(5)
    g = rng.standard_normal(5)
    want = p - 0.1 * (0.9 * np.zeros(5) + 1.0 * g)
    buf = np.zeros(5)
    reference.lars_step(p, g, buf, lr=0.1, weight_decay=0.5)
    np.testing.assert_array_equal(p, want)
    # a 2-D param: the step is lr * trust_coefficient * ||p|| / (||g|| + wd ||p||) * (g + wd p)
    p = rng.standard_normal((3, 4))
    g = rng.standard_normal((3, 4))
    pn, gn = np.linalg.norm(p), np.linalg.norm(g)
    want = p - 0.1 * (1e-3 * pn / (gn + 0.5 * pn)) * (g + 0.5 * p)
    reference.lars_step(p, g, None, lr=0.1, momentum=0.0, weight_decay=0.5)
    np.testing.assert_allclose(p, want, rtol=1e-14)
    # zero param: trust 1
    z = np.zeros((2, 2))
    reference.lars_step(z, np.ones((2, 2)), None, lr=0.1, momentum=0.0)
    np.testing.assert_array_equal(z, np.full((2, 2), -0.1))


@pytest.mark.parametrize("name,value,match", [
    ("momentum", 1.0, "Invalid momentum value: 1.0"), ("momentum", -0.1, "Invalid momentum value: -0.1"),
    ("dampening", 1.0, "Invalid dampening value: 1.0"), ("trust_coefficient", -1e-3, "Invalid trust_coefficient "
                                                                                      "value: -0.001"),
    ("eps", float("nan"), "Invalid epsilon value: nan"), ("lr", -1.0, "Invalid learning rate: -1.0"),
    ("weight_decay", float("inf"), "Invalid weight_decay value: inf")])
def test_lars_spec_errors_echo_the_bad_value(name, value, match):
    from fastopt.specs import LARS
    with pytest.raises(ValueError, match=match):
        LARS.validate(dict(LARS.defaults, **{name: value}), 1)
    with pytest.raises(TypeError, match="nesterov must be a bool, got 1"):
        LARS.validate(dict(LARS.defaults, nesterov=1), 1)
