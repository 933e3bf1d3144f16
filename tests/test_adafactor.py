"""fastopt.Adafactor (NumPy) and fastopt.torch.Adafactor against torch.optim.Adafactor: every option, float32
and float64, 50 steps, 0-d to 4-D params with size-1 dims, several groups, the blocked paths, strided
params, state sizes, state-dict interchange, and bad input that leaves everything unchanged."""
from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
import fastopt.adafactor as core  # noqa: E402
import fastopt.torch as ftorch  # noqa: E402

SHAPES = [(), (7,), (1,), (5, 9), (3, 4, 6), (2, 1, 3, 5), (1, 1), (1, 7), (7, 1)]
# base options, then each option changed, then all at once (eps1 given / None, d, weight_decay, maximize,
# beta2_decay, lr)
BASE = dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False)
CONFIGS = [
    {},
    {"eps": (1e-3, 1e-2)},
    {"d": 2.5},
    {"weight_decay": 0.3},
    {"maximize": True},
    {"beta2_decay": -0.5},
    {"lr": 0.3},
    {"eps": (1e-30, 0.0), "d": 1.2, "weight_decay": 0.05, "maximize": True, "beta2_decay": -0.3, "lr": 0.05},
]
TOL = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-6)}


def _params(rng, dtype, shapes):
    return [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]


def _grad(rng, shape, dtype, t):
    if t % 11 == 5:
        return np.zeros(shape, dtype)  # the eps1 floors at work
    return np.asarray(rng.standard_normal(shape) * (0.1 + t % 4), dtype=dtype)


def _groups(arrays, split, extra):
    """Two groups: the second overrides some options."""
    return [{"params": arrays[:split]}, {"params": arrays[split:], **extra}]


def _run(dtype, opts, shapes=SHAPES, steps=50, seed=0, monkeypatch=None, block_bytes=None):
    """torch.optim.Adafactor, fastopt.Adafactor and fastopt.torch.Adafactor on the same data."""
    if block_bytes is not None:
        monkeypatch.setattr(core, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(seed)
    init = _params(rng, dtype, shapes)
    hp = dict(BASE, **opts)
    second = {"lr": hp["lr"] * 0.5, "weight_decay": hp["weight_decay"] * 2}
    split = len(shapes) // 2
    ref = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    fto = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    npp = [a.copy() for a in init]
    topt = torch.optim.Adafactor(_groups(ref, split, second), **hp)
    fopt = ftorch.Adafactor(_groups(fto, split, second), **hp)
    nopt = fastopt.Adafactor(_groups(npp, split, second), **hp)
    for t in range(steps):
        grads = [None if (t + k) % 7 == 3 else _grad(rng, s, dtype, t) for k, s in enumerate(shapes)]
        for ps in (ref, fto):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else torch.tensor(g.copy())
        topt.step()
        fopt.step()
        nopt.step(grads)
    return ref, fto, npp, topt, fopt, nopt


def _check(ref, fto, npp, topt, fopt, nopt, dtype):
    tol = TOL[dtype]
    for k, (r, f, n) in enumerate(zip(ref, fto, npp)):
        want = r.detach().numpy()
        np.testing.assert_allclose(f.detach().numpy(), want, **tol, err_msg=f"fastopt.torch param {k}")
        np.testing.assert_allclose(n, want, **tol, err_msg=f"NumPy param {k}")
        ts, fs, ns = topt.state[r], fopt.state[f], nopt.state[k]
        assert set(ts) == set(fs) == set(ns), k
        assert float(ts["step"]) == float(fs["step"]) == ns["step"] > 0
        assert fs["step"].dtype == torch.float32
        for name in ts:
            if name != "step":
                assert fs[name].shape == ts[name].shape and ns[name].shape == tuple(ts[name].shape)
                np.testing.assert_allclose(fs[name].numpy(), ts[name].numpy(), **tol, err_msg=name)
                np.testing.assert_allclose(ns[name], ts[name].numpy(), **tol, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opts", CONFIGS, ids=[",".join(c) or "defaults" for c in CONFIGS])
def test_matches_torch(dtype, opts):
    out = _run(dtype, opts)
    _check(*out, dtype)
    # the params moved: the comparison is not of untouched arrays
    assert not np.allclose(out[2][3], _params(np.random.default_rng(0), dtype, SHAPES)[3])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("block_bytes", [64, 2048])
def test_blocked_paths_match_torch(dtype, block_bytes, monkeypatch):
    """Small blocks: row ranges of one matrix (columns summed over blocks), whole matrices per block, and
    vectors in pieces; the same numbers as torch."""
    shapes = [(37, 53), (6, 5, 7), (4, 1, 40), (301,), (1, 129)]
    out = _run(dtype, {"weight_decay": 0.1, "d": 1.3}, shapes=shapes, steps=20, seed=1,
               monkeypatch=monkeypatch, block_bytes=block_bytes)
    _check(*out, dtype)


def test_strided_params_torch_front_end():
    """A transposed weight and a channels_last conv weight are updated in place, rows and columns as torch's."""
    rng = np.random.default_rng(2)
    base = [rng.standard_normal((9, 5)), rng.standard_normal((2, 3, 4, 5))]
    mk = [lambda a: torch.tensor(a.T.copy()).t(),
          lambda a: torch.tensor(a).contiguous(memory_format=torch.channels_last)]
    ref = [torch.nn.Parameter(f(a)) for f, a in zip(mk, base)]
    ours = [torch.nn.Parameter(f(a)) for f, a in zip(mk, base)]
    assert not ours[0].is_contiguous() and not ours[1].is_contiguous()
    ptrs = [p.data_ptr() for p in ours]
    topt, fopt = torch.optim.Adafactor(ref, weight_decay=0.1), ftorch.Adafactor(ours, weight_decay=0.1)
    for _ in range(20):
        for r, o in zip(ref, ours):
            g = torch.tensor(rng.standard_normal(tuple(r.shape)))
            r.grad, o.grad = g.clone(), g.clone()
        topt.step()
        fopt.step()
    for r, o, ptr in zip(ref, ours, ptrs):
        assert o.data_ptr() == ptr and o.stride() == r.stride()
        np.testing.assert_allclose(o.detach().numpy(), r.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_factored_state_is_m_plus_n_floats():
    m, n = 768, 301
    opt = fastopt.Adafactor([np.zeros((m, n), np.float32), np.zeros((4, m, n), np.float32)])
    opt.step([np.ones((m, n), np.float32), np.ones((4, m, n), np.float32)])
    s0, s1 = opt.state[0], opt.state[1]
    assert set(s0) == {"step", "row_var", "col_var"}
    assert s0["row_var"].shape == (m, 1) and s0["col_var"].shape == (1, n)
    assert s0["row_var"].size + s0["col_var"].size == m + n
    assert s1["row_var"].size + s1["col_var"].size == 4 * (m + n)
    # the workspace is a block, not a param-sized temporary
    assert max(a.nbytes for a in opt._workspace._arrays.values()) <= core.BLOCK_BYTES + 4 * n


def test_empty_param_advances_without_update():
    """torch raises ZeroDivisionError on a param with no elements; here its step advances, nothing else."""
    e = torch.zeros(0, 5, requires_grad=True)
    e.grad = torch.zeros(0, 5)
    with pytest.raises(ZeroDivisionError):
        torch.optim.Adafactor([e]).step()
    p = np.ones((3, 4))
    opt = fastopt.Adafactor([np.zeros((0, 5)), p, np.zeros(0)])
    opt.step([np.zeros((0, 5)), np.ones((3, 4)), np.zeros(0)])
    assert opt.state[0]["step"] == 1 and opt.state[0]["col_var"].shape == (1, 5)
    assert not np.any(opt.state[0]["col_var"]) and opt.state[2]["variance"].shape == (0,)
    assert np.all(p < 1)


def _numpy_sd_to_torch(sd):
    return {"state": {i: {k: torch.from_numpy(np.array(v)) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": [dict(g, foreach=None) for g in sd["param_groups"]]}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_interchange_mid_training(dtype):
    """torch -> NumPy class -> torch and torch <-> fastopt.torch, 10 steps each: identical to torch
    training straight through."""
    rng = np.random.default_rng(3)
    shapes = [(6, 4), (5,), (2, 3, 4), ()]
    init = _params(rng, dtype, shapes)
    grads = [[_grad(rng, s, dtype, t) for s in shapes] for t in range(30)]
    opts = dict(lr=0.05, weight_decay=0.1, eps=(1e-4, 1e-3))

    def torch_steps(ps, opt, ts):
        for t in ts:
            for p, g in zip(ps, grads[t]):
                p.grad = torch.tensor(g.copy())
            opt.step()

    straight = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    sopt = torch.optim.Adafactor([{"params": straight[:2]}, {"params": straight[2:], "lr": 0.02}], **opts)
    torch_steps(straight, sopt, range(30))

    tp = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    topt = torch.optim.Adafactor([{"params": tp[:2]}, {"params": tp[2:], "lr": 0.02}], **opts)
    torch_steps(tp, topt, range(10))
    npp = [p.detach().numpy().copy() for p in tp]
    nopt = fastopt.Adafactor([{"params": npp[:2]}, {"params": npp[2:]}])
    nopt.load_state_dict(topt.state_dict())  # tensors in, hyperparameters from the dict
    assert nopt.param_groups[1]["lr"] == 0.02 and nopt.param_groups[0]["eps"] == (1e-4, 1e-3)
    for t in range(10, 20):
        nopt.step(grads[t])
    tp2 = [torch.tensor(a.copy(), requires_grad=True) for a in npp]
    fopt = ftorch.Adafactor([{"params": tp2[:2]}, {"params": tp2[2:]}])
    fopt.load_state_dict(_numpy_sd_to_torch(nopt.state_dict()))
    torch_steps(tp2, fopt, range(20, 25))
    tp3 = [p.detach().clone().requires_grad_() for p in tp2]
    topt3 = torch.optim.Adafactor([{"params": tp3[:2]}, {"params": tp3[2:]}])
    topt3.load_state_dict(fopt.state_dict())
    torch_steps(tp3, topt3, range(25, 30))
    for k, (a, b) in enumerate(zip(tp3, straight)):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), **TOL[dtype], err_msg=str(k))
    assert float(topt3.state[tp3[0]]["step"]) == 30


BAD_HP = [
    ("lr", -0.1, ValueError, "Learning rate should be >= 0 but is: -0.1"),
    ("beta2_decay", 0.5, ValueError, "beta2_decay should be <= 0 but is: 0.5"),
    ("eps", (-1.0, 1e-3), ValueError, "epsilon1 should be >= 0 but is: -1.0"),
    ("eps", (None, -2.0), ValueError, "epsilon2 should be >= 0 but is: -2.0"),
    ("d", 0.5, ValueError, "Clipping threshold d should be >= 1 but is: 0.5"),
    ("weight_decay", -1.0, ValueError, "weight_decay should be >= 0 but is: -1.0"),
    ("weight_decay", float("nan"), ValueError, "weight_decay should be >= 0 but is: nan"),
]


@pytest.mark.parametrize("name,value,exc,msg", BAD_HP)
def test_constructor_errors_are_torchs(name, value, exc, msg):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(exc) as want:
        torch.optim.Adafactor([p], **{name: value})
    assert str(want.value) == msg
    for make in (lambda: ftorch.Adafactor([p], **{name: value}),
                 lambda: fastopt.Adafactor([np.zeros(3)], **{name: value})):
        with pytest.raises(exc) as got:
            make()
        assert str(got.value) == msg


def test_non_finite_and_wrong_types_refused():
    with pytest.raises(ValueError, match="Learning rate should be finite but is: inf"):
        fastopt.Adafactor([np.zeros(3)], lr=float("inf"))
    with pytest.raises(TypeError, match="maximize must be a bool, got 'yes'"):
        ftorch.Adafactor([torch.zeros(3, requires_grad=True)], maximize="yes")
    with pytest.raises(TypeError, match="eps must be a pair"):
        fastopt.Adafactor([np.zeros(3)], eps=1e-3)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        ftorch.Adafactor([torch.zeros(3, requires_grad=True)], lr=torch.ones(2))
    with pytest.raises(TypeError, match="int64"):
        fastopt.Adafactor([np.zeros(3, np.int64)])


def _snapshot(arrays):
    return [np.array(a, copy=True).tobytes() for a in arrays]


def _numpy_bad_steps(p, g):
    """(mutation of the optimizer or None, grads, exception, message part)."""
    ro = np.zeros(5)
    ro.flags.writeable = False
    return [
        (None, g[:2], ValueError, "grads has 2 entries"),
        (None, [g[0], g[1].astype(np.float32), g[2]], TypeError, "grads[1] has dtype float32"),
        (None, [g[0], g[1], g[2][:, :2]], ValueError, "grads[2] has shape (3, 2)"),
        (None, [g[0], g[1], p[2]], ValueError, "share memory"),
        (None, [g[0], g[1], p[2][::-1]], ValueError, "share memory"),
        (lambda o: o.param_groups[1].update(lr=-1.0), g, ValueError, "Learning rate should be >= 0 but is: -1.0"),
        (lambda o: o.param_groups[1].update(eps=(None, float("nan"))), g, ValueError,
         "epsilon2 should be >= 0 but is: nan"),
        (lambda o: o.param_groups[1].update(maximize=1), g, TypeError, "maximize must be a bool, got 1"),
        (lambda o: o.param_groups[0]["params"].__setitem__(0, ro), g, ValueError, "params[0] is read-only"),
        (lambda o: o.param_groups[0]["params"].append(np.zeros(2)), g, ValueError, "must stay a list of 2"),
        (lambda o: o.state[2].__setitem__("col_var", np.zeros((1, 7))), g, ValueError, "'col_var' has shape"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_step_changes_nothing_numpy(case):
    rng = np.random.default_rng(4)
    p = [rng.standard_normal(5), rng.standard_normal(4), rng.standard_normal((3, 4))]
    g = [rng.standard_normal(5), rng.standard_normal(4), rng.standard_normal((3, 4))]
    opt = fastopt.Adafactor([{"params": p[:2]}, {"params": p[2:], "weight_decay": 0.1}])
    opt.step(g)
    mutate, grads, exc, msg = _numpy_bad_steps(p, g)[case]
    if mutate is not None:
        mutate(opt)
    params, states = list(opt.params), [s[k] for s in opt.state.values() for k in s if k != "step"]
    before, steps = _snapshot(p + params + states), [s["step"] for s in opt.state.values()]
    with pytest.raises(exc, match=re.escape(msg)):
        opt.step(grads)
    assert _snapshot(p + params + states) == before
    assert [s["step"] for s in opt.state.values()] == steps


def test_bad_step_changes_nothing_torch():
    """A bad lr in the second group, or a loaded state of the wrong shape: raised before any write (torch
    would have updated the first group already)."""
    rng = np.random.default_rng(5)
    ps = [torch.tensor(rng.standard_normal(s), requires_grad=True) for s in [(4,), (3, 5)]]
    opt = ftorch.Adafactor([{"params": ps[:1]}, {"params": ps[1:]}])
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()

    def snap():
        return [t.detach().numpy().tobytes() for p in ps for t in (p, *opt.state[p].values())]

    before = snap()
    opt.param_groups[1]["lr"] = -0.5
    with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -0.5"):
        opt.step()
    assert snap() == before
    opt.param_groups[1]["lr"] = 1e-2
    opt.state[ps[1]]["col_var"] = torch.zeros(1, 4, dtype=torch.float64)
    before = snap()
    with pytest.raises(ValueError, match="'col_var' has shape"):
        opt.step()
    assert snap() == before


def test_torch_front_end_autograd_schedulers_tensor_lr():
    """Version counters bumped (a graph that saved the param raises), an lr scheduler and a Tensor lr give
    torch's numbers, and a grad-less param is skipped with its step count."""
    p = torch.ones(3, 4, requires_grad=True)
    opt = ftorch.Adafactor([p])
    y = (p * p).sum()
    p.grad = torch.ones(3, 4)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()

    rng = np.random.default_rng(6)
    init = [rng.standard_normal((4, 6)), rng.standard_normal(5)]
    ref = [torch.tensor(a, requires_grad=True) for a in init]
    ours = [torch.tensor(a, requires_grad=True) for a in init]
    # a Tensor lr: torch keeps it a float32 tensor in its step-size arithmetic (the step coefficient and
    # the decay factor rounded to float32, with float64 params); fastopt.torch does the same
    topt = torch.optim.Adafactor(ref, lr=torch.tensor(0.2), weight_decay=0.3)
    fopt = ftorch.Adafactor(ours, lr=torch.tensor(0.2), weight_decay=0.3)
    tsch = torch.optim.lr_scheduler.StepLR(topt, 3, gamma=0.5)
    fsch = torch.optim.lr_scheduler.StepLR(fopt, 3, gamma=0.5)
    for t in range(12):
        for k, (r, o) in enumerate(zip(ref, ours)):
            g = None if (k == 1 and t % 4 == 0) else torch.tensor(rng.standard_normal(tuple(r.shape)))
            r.grad, o.grad = g, None if g is None else g.clone()
        topt.step()
        fopt.step()
        tsch.step()
        fsch.step()
    lr = fopt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(0.0125)
    for r, o in zip(ref, ours):
        np.testing.assert_allclose(o.detach().numpy(), r.detach().numpy(), rtol=1e-9, atol=1e-12)
        assert float(fopt.state[o]["step"]) == float(topt.state[r]["step"])
    assert float(fopt.state[ours[1]]["step"]) == 9


def test_spec_and_exports():
    spec = fastopt.specs.COMPOSITE["adafactor"]
    assert spec.class_name == "Adafactor" == spec.torch_class
    assert spec.defaults == {k: v for k, v in BASE.items()}
    assert fastopt.Adafactor is core.Adafactor and ftorch.Adafactor.__module__ == "fastopt.torch.adafactor"
    assert issubclass(ftorch.Adafactor, torch.optim.Optimizer)
    import inspect
    ours, theirs = (inspect.signature(c.__init__).parameters for c in (ftorch.Adafactor, torch.optim.Adafactor))
    # torch's, then fastopt's two keyword-only extras (tests/test_composite_guard.py)
    assert [(q.name, q.kind, q.default) for q in ours.values()] == \
        [(q.name, q.kind, q.default) for q in theirs.values()] + [
            ("clip_grad_norm", inspect.Parameter.KEYWORD_ONLY, None),
            ("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, False)]
    p = torch.ones(3, requires_grad=True)
    topt = ftorch.Adafactor([p])
    calls = []
    topt.register_step_pre_hook(lambda *a: calls.append("pre"))
    topt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones(3)
    topt.step()
    assert calls == ["pre", "post"] and list(topt.state_dict()["param_groups"][0]) == \
        list(torch.optim.Adafactor([p]).state_dict()["param_groups"][0])
    opt = fastopt.Adafactor([np.zeros(2)], lr=0.1)
    assert opt.zero_grad() is None and "lr: 0.1" in repr(opt)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps", [(None, 1e-3), (1e-3, 1e-3)])
def test_clamps_and_non_finite_match_torch(dtype, eps):
    """Zero rows and columns (factors 0: the eps1 clamps), tiny gradients (V below eps1^2), and a NaN/inf
    gradient step that propagates as in torch (NaN where torch has NaN)."""
    shapes = [(6, 5), (2, 4, 3), (9,), ()]
    rng = np.random.default_rng(7)
    init = _params(rng, dtype, shapes)
    ref = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    npp = [a.copy() for a in init]
    fto = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    topt = torch.optim.Adafactor(ref, eps=eps)
    nopt = fastopt.Adafactor(npp, eps=eps)
    fopt = ftorch.Adafactor(fto, eps=eps)
    for t in range(8):
        grads = []
        for s in shapes:
            g = np.asarray(rng.standard_normal(s) * (1e-5 if t % 2 else 1.0), dtype=dtype)
            if len(s) > 1:
                g[..., 0, :] = 0  # a zero row
                g[..., :, 1] = 0  # a zero column
            if t == 6 and len(s) == 1:
                g[3] = np.nan
            if t == 7 and len(s) == 3:
                g[0, 0, 0] = np.inf
            grads.append(g)
        for ps in (ref, fto):
            for p, g in zip(ps, grads):
                p.grad = torch.tensor(g.copy())
        topt.step()
        fopt.step()
        nopt.step(grads)
        for k, (r, n, f) in enumerate(zip(ref, npp, fto)):
            want = r.detach().numpy()
            np.testing.assert_array_equal(np.isnan(n), np.isnan(want), err_msg=f"step {t} param {k}")
            np.testing.assert_allclose(n, want, **TOL[dtype], err_msg=f"step {t} param {k}")
            np.testing.assert_allclose(f.detach().numpy(), want, **TOL[dtype], err_msg=f"step {t} param {k}")
    assert np.isnan(npp[2]).any() and not np.isnan(npp[0]).any()  # the NaN step was taken


def test_mixed_dtype_group_takes_the_first_params_eps1():
    """eps1=None: torch takes finfo(dtype).eps of the group's first param with a grad for the whole group;
    with tiny gradients that eps1 decides the float64 param's update."""
    rng = np.random.default_rng(8)
    init = [np.asarray(rng.standard_normal((3, 4)), np.float32), rng.standard_normal((4, 5)),
            rng.standard_normal(6)]
    ref = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    npp = [a.copy() for a in init]
    topt, nopt = torch.optim.Adafactor(ref), fastopt.Adafactor(npp)
    for t in range(6):
        grads = [np.asarray(rng.standard_normal(a.shape) * 1e-6, a.dtype) for a in init]
        for p, g in zip(ref, grads):
            p.grad = torch.tensor(g.copy())
        topt.step()
        nopt.step(grads)
    for k, (r, n) in enumerate(zip(ref, npp)):
        np.testing.assert_allclose(n, r.detach().numpy(), **TOL[n.dtype.type], err_msg=str(k))
    # the float64 params did take float32's eps1: with their own (2.2e-16) they would move differently
    alone = [a.copy() for a in init[1:]]
    solo = fastopt.Adafactor(alone)
    rng = np.random.default_rng(8)
    rng.standard_normal((3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(6)
    for t in range(6):
        grads = [np.asarray(rng.standard_normal(a.shape) * 1e-6, a.dtype) for a in init]
        solo.step(grads[1:])
    assert not np.allclose(alone[0], npp[1], rtol=1e-9, atol=0)


def test_numpy_state_dict_round_trip_and_bad_dicts():
    rng = np.random.default_rng(9)
    shapes = [(4, 3), (5,)]
    p = _params(rng, np.float64, shapes)
    opt = fastopt.Adafactor([{"params": p[:1]}, {"params": p[1:], "d": 2.0}], weight_decay=0.1)
    for _ in range(3):
        opt.step([rng.standard_normal(s) for s in shapes])
    sd = opt.state_dict()
    assert sd["state"][0]["step"].dtype == np.float32 and float(sd["state"][0]["step"]) == 3
    assert sd["param_groups"][1]["params"] == [1] and sd["param_groups"][1]["d"] == 2.0
    q = [a.copy() for a in p]
    other = fastopt.Adafactor([{"params": q[:1]}, {"params": q[1:]}])
    other.load_state_dict(sd)
    g = [rng.standard_normal(s) for s in shapes]
    opt.step(g)
    other.step(g)
    for a, b in zip(p, q):
        assert a.tobytes() == b.tobytes()  # the same arithmetic from the same state: bit for bit
    before = [a.tobytes() for s in other.state.values() for k, a in s.items() if k != "step"]
    groups = [dict(gr) for gr in other.param_groups]
    bad = other.state_dict()
    bad["state"][0]["col_var"] = np.zeros((1, 4))
    with pytest.raises(ValueError, match=re.escape("'col_var' has shape (1, 4), expected (1, 3)")):
        other.load_state_dict(bad)
    bad = other.state_dict()
    bad["param_groups"][1]["lr"] = -1.0
    with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -1.0"):
        other.load_state_dict(bad)
    bad = other.state_dict()
    bad["state"][1]["step"] = 2.5
    with pytest.raises(ValueError, match="step must be a whole number"):
        other.load_state_dict(bad)
    bad = other.state_dict()
    bad["state"][0]["step"] = 10 ** 400  # OverflowError from float() before
    with pytest.raises(ValueError, match="state of param 0: step is too large for a float: 1000"):
        other.load_state_dict(bad)
    bad = other.state_dict()
    bad["param_groups"][1] = [1]  # AttributeError ('list' has no 'get') before
    with pytest.raises(ValueError, match="param group 1 of state_dict must be a dict, got list"):
        other.load_state_dict(bad)
    assert [a.tobytes() for s in other.state.values() for k, a in s.items() if k != "step"] == before
    assert [dict(gr) for gr in other.param_groups] == groups


@pytest.mark.parametrize("seed", [11, 12])
def test_random_cases_match_torch(seed, monkeypatch):
    """Random shapes (0-d to 4-D, sizes 1-8), options, block sizes and gradient scales, zero rows, 1e25,
    1e-30, inf and nan gradients: both classes equal torch (nan where torch has nan)."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        nd = int(rng.integers(0, 5))
        shape = tuple(int(x) for x in rng.integers(1, 9, nd))
        dtype = [np.float32, np.float64][int(rng.integers(2))]
        monkeypatch.setattr(core, "BLOCK_BYTES", int(rng.choice([8, 64, 4096, 256 << 10])))
        eps1 = None if rng.random() < 0.5 else float(rng.choice([1e-3, 1e-8, 0.0]))
        hp = dict(lr=float(rng.choice([1e-2, 0.3])), beta2_decay=float(rng.choice([-0.8, -0.3, 0.0])),
                  eps=(eps1, float(rng.choice([1e-3, 0.0]))), d=float(rng.choice([1.0, 1.5])),
                  weight_decay=float(rng.choice([0.0, 0.1])), maximize=bool(rng.random() < 0.5))
        p0 = np.asarray(rng.standard_normal(shape) * rng.choice([1, 1e-3, 100]), dtype)
        tp, fp = (torch.tensor(p0.copy(), requires_grad=True) for _ in range(2))
        q = p0.copy()
        topt, fopt, nopt = torch.optim.Adafactor([tp], **hp), ftorch.Adafactor([fp], **hp), fastopt.Adafactor([q], **hp)
        for t in range(10):
            scale = rng.choice([1, 1e-6, 0.0, 1e3, 1e25, 1e-30, np.inf, np.nan]) if t > 5 else 1.0
            g = np.asarray(rng.standard_normal(shape) * scale, dtype)
            if nd >= 2 and rng.random() < 0.3:
                g[..., int(rng.integers(shape[-2])), :] = 0
            tp.grad, fp.grad = torch.tensor(g.copy()), torch.tensor(g.copy())
            topt.step()
            fopt.step()
            nopt.step([g])
        want = tp.detach().numpy()
        finite = want[np.isfinite(want)]
        big = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        tol = dict(rtol=1e-9, atol=1e-12 * big) if dtype == np.float64 else dict(rtol=3e-5, atol=3e-6 * big)
        for got in (q, fp.detach().numpy()):
            np.testing.assert_allclose(got, want, **tol, err_msg=f"{shape} {dtype.__name__} {hp}")


# ---- 16-bit params (DESIGN.md "Precision": float32 math and state, params rounded to nearest even) ---------

ml_dtypes = pytest.importorskip("ml_dtypes")
from fastopt.precision import store_rounded, widen  # noqa: E402

SHAPES16 = [(), (1,), (7,), (0,), (5, 9), (3, 4, 6), (1, 7), (33, 17)]
DTYPES16 = {"bfloat16": (ml_dtypes.bfloat16, torch.bfloat16, 2.0 ** -7),
            "float16": (np.float16, torch.float16, 2.0 ** -10)}


def _ulps(x, y, eps):
    """|x - y| in units of the 16-bit ulp of max(|x|, |y|) (float32 arrays of 16-bit values)."""
    mag = np.maximum(np.abs(x), np.abs(y))
    ulp = np.exp2(np.floor(np.log2(np.maximum(mag, 2.0 ** -14)))) * eps
    return np.abs(x - y) / ulp


@pytest.mark.parametrize("name", DTYPES16)
@pytest.mark.parametrize("grad32", [False, True])
@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1, "maximize": True, "d": 2.0, "lr": 0.05}])
def test_16bit_is_float32_math_then_rounded(name, grad32, opts):
    """Every step of a 16-bit run equals the float32 run of the same class from the same (widened) values,
    rounded to nearest even, bit for bit; the state is float32 and equals the float32 run's exactly. Grads
    in the params' dtype or float32; eps1 None is finfo of the 16-bit dtype (torch's rule)."""
    dt, _, eps = DTYPES16[name]
    rng = np.random.default_rng(int(rng_seed := np.random.SeedSequence().entropy % 2 ** 32))
    p16 = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in SHAPES16]
    p32 = [widen(p).copy() for p in p16]
    start = [p.copy() for p in p16]
    a = fastopt.Adafactor([{"params": p16[:4]}, {"params": p16[4:], "lr": 0.02}], **opts)
    b = fastopt.Adafactor([{"params": p32[:4]}, {"params": p32[4:], "lr": 0.02}], eps=(eps, 1e-3), **opts)
    for t in range(20):
        g32 = [(rng.standard_normal(s) * (t % 3)).astype(np.float32) for s in SHAPES16]  # zeros: eps floors
        g16 = [g.astype(dt) for g in g32]
        for q, p in zip(p32, p16):
            q[...] = widen(p)
        a.step(g32 if grad32 else g16)
        b.step([widen(g) for g in g16] if not grad32 else g32)
        for i, (p, q) in enumerate(zip(p16, p32)):
            want = np.empty_like(p)
            store_rounded(want, q)
            assert p.dtype == dt
            np.testing.assert_array_equal(p.view(np.uint16), want.view(np.uint16), err_msg=f"seed {rng_seed}")
            for k, v in a.state[i].items():
                if k != "step":
                    assert v.dtype == np.float32
                    np.testing.assert_array_equal(v, b.state[i][k])
    # the run moved the params: every array of several elements (a one-element bfloat16 param can keep its
    # value over 20 small steps, each below half an ulp: a fresh-clone CI run had two of them unmoved)
    assert all(not np.array_equal(p.view(np.uint16), s.view(np.uint16)) for p, s in zip(p16, start) if p.size > 1)


@pytest.mark.parametrize("name", DTYPES16)
@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1, "maximize": True}, {"eps": (1e-3, 1e-2), "d": 2.0},
                                  {"lr": 0.3, "beta2_decay": -0.5}])
def test_16bit_torch_front_end_vs_torch_optim(name, opts):
    """fastopt.torch.Adafactor on 16-bit params against torch.optim.Adafactor, 20 steps.
    (1) torch in float32 (with the 16-bit dtype's eps1) on the same values each step, rounded to the 16-bit
    dtype: equal bit for bit (measured: all but about one element in 10^4; asserted: >= 99%, the rest within
    one ulp or, near 0, a few float32 ulps of the operands: our float32 arithmetic differs from torch's by a
    few float32 ulps). (2) torch's own 16-bit run (state and every intermediate rounded to 16 bits), one step
    from our params and state each time: the fraction of elements within one 16-bit ulp of it, per step.
    Measured (2026-12-04, 20 steps a run, both dtypes, 750 seeded runs at lr = 0.3 and 1,600 without): the
    lowest step of a run had 0.833 to 0.893 at lr = 0.3 (median 0.86; 1-2% of runs below 0.85) and 0.983 to
    0.994 without; asserted: 0.80 and 0.97. Where an element differs more, torch's 16-bit run differs as much from its own float32 run: our
    values are pinned by (1), which implies |ours - torch16| <= |torch32 - torch16| + 2 ulps (an element
    bound against torch16 alone, ulp + 4 eps of the step, failed in ~1% of float16 runs at lr = 0.3)."""
    _, tdt, eps = DTYPES16[name]
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2 ** 31))
    init = [torch.randn(s, generator=gen).to(tdt) for s in SHAPES16 if 0 not in s]
    ours = [x.clone().requires_grad_() for x in init]
    ref16 = [x.clone().requires_grad_() for x in init]
    ref32 = [x.float().requires_grad_() for x in init]
    # the float32 run with the 16-bit dtype's eps1 (eps1 None: finfo of the param's dtype, in both)
    opts32 = dict(opts) if "eps" in opts else dict(opts, eps=(eps, 1e-3))
    oo, r16, r32 = ftorch.Adafactor(ours, **opts), torch.optim.Adafactor(ref16, **opts), \
        torch.optim.Adafactor(ref32, **opts32)
    fractions = []
    for t in range(20):
        grads = [torch.randn(x.shape, generator=gen).to(tdt) for x in init]
        old = [q.detach().clone() for q in ours]
        with torch.no_grad():
            for p, q in zip(ref16, ours):
                p.copy_(q)
            for p, q in zip(ref32, ours):
                p.copy_(q.float())
        if t:
            for p, q in zip(ref16, ours):
                for k, v in oo.state[q].items():
                    if k != "step":
                        assert v.dtype == torch.float32
                        r16.state[p][k].copy_(v)
        for group in (ours, ref16):
            for p, g in zip(group, grads):
                p.grad = g.clone()
        for p, g in zip(ref32, grads):
            p.grad = g.float()
        oo.step(), r16.step(), r32.step()
        mine = np.concatenate([q.detach().float().numpy().reshape(-1) for q in ours])
        f32 = np.concatenate([p.detach().to(tdt).float().numpy().reshape(-1) for p in ref32])
        b16 = np.concatenate([p.detach().float().numpy().reshape(-1) for p in ref16])
        before = np.concatenate([q.float().numpy().reshape(-1) for q in old])
        step = np.abs(mine - before)
        d32 = _ulps(mine, f32, eps)
        # where they differ: one 16-bit ulp, or (a result near 0, where the ulp is tiny) a few float32 ulps
        # of the operands
        assert np.mean(d32 == 0) >= 0.99
        assert np.all((d32 <= 1) | (np.abs(mine - f32) <= 2.0 ** -20 * (np.abs(before) + step))), (t, opts)
        fractions.append(np.mean(_ulps(mine, b16, eps) <= 1))
    assert min(fractions) >= (0.80 if "lr" in opts else 0.97), fractions


@pytest.mark.parametrize("name", DTYPES16)
def test_16bit_state_dicts_with_torch(name):
    """A 16-bit param's state is float32 in both classes; our state dict loads into torch.optim (its state
    rounded to the param's dtype, as torch casts) and torch's (16-bit state) loads here widened to float32;
    our own state dict round-trips without rounding the float32 state."""
    dt, tdt, _ = DTYPES16[name]
    p = torch.randn(6, 5).to(tdt).requires_grad_()
    p.grad = torch.randn(6, 5).to(tdt)
    opt = ftorch.Adafactor([p])
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["row_var"].dtype == torch.float32
    again = ftorch.Adafactor([p])
    again.load_state_dict(sd)
    assert torch.equal(again.state[p]["row_var"], opt.state[p]["row_var"])
    assert again.state[p]["row_var"].dtype == torch.float32
    q = p.detach().clone().requires_grad_()
    ref = torch.optim.Adafactor([q])
    ref.load_state_dict(sd)
    assert ref.state[q]["row_var"].dtype == tdt
    mine = ftorch.Adafactor([p])
    mine.load_state_dict(ref.state_dict())
    assert mine.state[p]["col_var"].dtype == torch.float32
    assert torch.equal(mine.state[p]["col_var"], ref.state[q]["col_var"].float())
    # the NumPy class: the same state dict (tensors) loads into float32 state
    arr = p.detach().float().numpy().astype(dt)
    npo = fastopt.Adafactor([arr])
    npo.load_state_dict(ref.state_dict())
    assert npo.state[0]["row_var"].dtype == np.float32
    np.testing.assert_array_equal(npo.state[0]["row_var"], ref.state[q]["row_var"].float().numpy())


def test_16bit_bad_input_names_the_dtype_and_changes_nothing():
    """A float64 grad of a bfloat16 param, an int param, a 16-bit state where float32 is kept: TypeError naming
    the dtypes; params and state unchanged."""
    p = np.ones((4, 3), ml_dtypes.bfloat16)
    q = np.ones(5, np.float16)
    opt = fastopt.Adafactor([p, q])
    opt.step([np.ones((4, 3), np.float32), np.ones(5, np.float16)])
    before = [p.tobytes(), q.tobytes()] + [v.tobytes() for s in opt.state.values() for k, v in s.items() if k != "step"]

    def snap():
        return [p.tobytes(), q.tobytes()] + [v.tobytes() for s in opt.state.values() for k, v in s.items()
                                             if k != "step"]
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float64, params\[1\] float16"):
        opt.step([np.ones((4, 3), ml_dtypes.bfloat16), np.ones(5, np.float64)])
    assert snap() == before
    opt.state[0]["row_var"] = opt.state[0]["row_var"].astype(ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="'row_var' has dtype bfloat16, expected float32"):
        opt.step([np.ones((4, 3), ml_dtypes.bfloat16), None])
    assert p.tobytes() == before[0]
    with pytest.raises(TypeError, match="has dtype int32: Adafactor takes float32, float64, float16 or bfloat16"):
        fastopt.Adafactor([np.ones(3, np.int32)])


def test_one_blas_thread_same_bits_and_restored():
    """A NumPy step runs its block products on one BLAS thread (fastopt.blas: cheaper than the hand-off for
    cache-sized blocks): the same bits as with BLAS's own two threads, and the count is restored after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fastopt.blas import blas_controllers
    assert blas_controllers()
    rng = np.random.default_rng(3)
    shapes = [(64, 128), (300, 200), (128,), (6, 40, 30)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    out = []
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        for single in (True, False):
            ps = [a.copy() for a in init]
            opt = fastopt.Adafactor(ps, lr=0.05, weight_decay=0.1)
            for g in grads:
                if single:
                    opt.step(g)
                else:  # BLAS's own threads: the step's one-thread context made a no-op
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr(core, "one_blas_thread_on_host", lambda p: contextlib.nullcontext())
                        opt.step(g)
                assert all(lib.get_num_threads() == 2 for lib in blas_controllers())
            out.append(ps)
    for a, b, s in zip(out[0], out[1], init):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, s)
