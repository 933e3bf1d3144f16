"""fastopt.LBFGS (NumPy) and fastopt.torch.LBFGS against torch.optim.LBFGS: trajectories, state, errors."""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
import fastopt.lbfgs as lbfgs_mod  # noqa: E402
import fastopt.torch as ft  # noqa: E402

SHAPES = [(3, 5), (7,), (1,), (2, 1, 3), (0,), (4,)]
N = sum(int(np.prod(s)) for s in SHAPES)

# (steps, options): small max_iter keeps the history going across many step() calls. A fixed step (no line
# search) amplifies rounding differences by ~10x per 10 iterations (the dot products' summation orders differ
# from torch's MKL), so these stay within ~40 iterations per run for the 1e-9 comparison
CONFIGS = [
    (15, dict(max_iter=2, history_size=3)),
    (2, dict()),                                                      # torch's defaults (40 iterations)
    (5, dict(max_iter=5, history_size=2, max_eval=6, lr=0.5)),
    (3, dict(max_iter=10, tolerance_grad=1e-3, tolerance_change=1e-4, history_size=7)),
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch's autograd on these tiny problems is 20x slower with two threads on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seed(kind, rng, fixed):
    """A fresh seed (conftest's rng: FASTOPT_TEST_SEED pins it) for the logistic regression (L2 0.1: well
    conditioned; 120 fresh seeds over CONFIGS: within 6e-12 of torch); a fixed one for Rosenbrock, where
    torch against itself with the start perturbed by 1e-16 already drifts apart by up to ~1e-6 within 30
    fixed-step iterations for some starts (chaos, not a mismatch; with L2 0.01 the logistic regression
    drifts too: 6e-9 for one start in a few hundred)."""
    return int(rng.integers(2 ** 31)) if kind == "logreg" else fixed


def _objective(kind, seed, dtype):
    """f(list of tensors) -> loss tensor, and the initial values (torch tensors)."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    if kind == "rosenbrock":
        scale = torch.rand(N - 1, generator=g, dtype=dtype) + 0.5

        def f(ps):
            x = torch.cat([p.reshape(-1) for p in ps])
            return (scale * ((1 - x[:-1]) ** 2 + 10 * (x[1:] - x[:-1] ** 2) ** 2)).sum()
    else:  # L2-regularised logistic regression, a bias and the other params as odd-shaped weight blocks
        X = torch.randn(60, N, generator=g, dtype=dtype)
        y = (torch.rand(60, generator=g, dtype=dtype) < 0.5).to(dtype)

        def f(ps):
            w = torch.cat([p.reshape(-1) for p in ps])
            z = X @ w
            return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.1 * (w * w).sum()
    return f, init


def _numpy_closure(f, arrays, unused=()):
    """The NumPy class's closure: loss and grads of f at the arrays' current values (via torch autograd)."""
    def closure():
        ps = [torch.tensor(a, requires_grad=True) for a in arrays]
        loss = f(ps)
        loss.backward()
        return loss.item(), [None if i in unused else p.grad.numpy() for i, p in enumerate(ps)]
    return closure


def _torch_closure(opt, f, ps):
    def closure():
        opt.zero_grad()
        loss = f(ps)
        loss.backward()
        return loss
    return closure


def _count_kernel_calls(monkeypatch):
    """Count the calls of the compiled one-pass axpy (fastopt's sgd_step, as fastopt.lbfgs calls it)."""
    calls = []
    real = lbfgs_mod.sgd_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(lbfgs_mod, "sgd_step", counting)
    return calls


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _flat(arrays):
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])


def _same_counters(torch_state, state):
    assert torch_state["func_evals"] == state["func_evals"]
    assert torch_state["n_iter"] == state["n_iter"]


_CASES = [(steps, options, kind, ls, False) for steps, options in CONFIGS for kind in ("rosenbrock", "logreg")
          for ls in (None, "strong_wolfe")]
# the compiled one-pass axpy, forced on small vectors (AXPY_KERNEL_MIN = 0)
_CASES += [(steps, options, kind, ls, True) for steps, options in CONFIGS[::2] for kind in ("rosenbrock", "logreg")
           for ls in (None, "strong_wolfe")]


@pytest.mark.parametrize("steps,options,kind,line_search_fn,kernel", _CASES)
def test_numpy_class_matches_torch_float64(kind, line_search_fn, steps, options, kernel, monkeypatch, rng):
    if kernel:
        monkeypatch.setattr(lbfgs_mod, "AXPY_KERNEL_MIN", 0)   # the compiled one-pass axpy on small vectors
    kernel_calls = _count_kernel_calls(monkeypatch)
    f, init = _objective(kind, _seed(kind, rng, 1 + len(options) + steps), torch.float64)
    tp = [t.clone().requires_grad_() for t in init]
    topt = torch.optim.LBFGS(tp, line_search_fn=line_search_fn, **options)
    arrays = [t.numpy().copy() for t in init]
    opt = fastopt.LBFGS(arrays, line_search_fn=line_search_fn, **options)
    for _ in range(steps):
        lt = topt.step(_torch_closure(topt, f, tp))
        ln = opt.step(_numpy_closure(f, arrays))
        assert ln == pytest.approx(lt.item(), rel=1e-9, abs=1e-12)
        assert _rel(_flat(arrays), _flat([p.detach() for p in tp])) < 1e-9
        _same_counters(topt.state[tp[0]], opt.state[0])
    assert bool(kernel_calls) is kernel
    ts, s = topt.state[tp[0]], opt.state[0]
    assert list(ts) == list(s)                     # torch's keys, in torch's order
    assert len(ts["old_dirs"]) == len(s["old_dirs"]) <= options.get("history_size", 100)
    ref = ts["old_dirs"] + ts["old_stps"] + [ts["d"], ts["prev_flat_grad"]]
    # y = g - g_prev cancels near convergence: compared on the scale of the largest state vector
    scale = max(float(a.abs().max()) for a in ref)
    for a, b in zip(ref, s["old_dirs"] + s["old_stps"] + [s["d"], s["prev_flat_grad"]]):
        assert b.dtype == np.float64 and b.shape == (N,)
        assert np.max(np.abs(b - a.numpy())) <= 1e-7 * scale
    assert type(ts["t"]) is type(s["t"]) or (isinstance(ts["t"], torch.Tensor) and isinstance(s["t"], np.float64))


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("kind", ["rosenbrock", "logreg"])
@pytest.mark.parametrize("steps,options", CONFIGS[:3])
def test_torch_class_matches_torch_float64(kind, line_search_fn, steps, options, rng):
    f, init = _objective(kind, _seed(kind, rng, 100 + steps), torch.float64)
    tp = [t.clone().requires_grad_() for t in init]
    fp = [t.clone().requires_grad_() for t in init]
    topt = torch.optim.LBFGS(tp, line_search_fn=line_search_fn, **options)
    fopt = ft.LBFGS(fp, line_search_fn=line_search_fn, **options)
    versions = [p._version for p in fp]
    for _ in range(steps):
        lt = topt.step(_torch_closure(topt, f, tp))
        lf = fopt.step(_torch_closure(fopt, f, fp))
        assert isinstance(lf, torch.Tensor) and lf.item() == pytest.approx(lt.item(), rel=1e-9, abs=1e-12)
        assert _rel(_flat([p.detach() for p in fp]), _flat([p.detach() for p in tp])) < 1e-9
        _same_counters(topt.state[tp[0]], fopt.state[fp[0]])
    assert all(p._version > v for p, v in zip(fp, versions))
    ts, fs = topt.state_dict(), fopt.state_dict()
    assert ts["param_groups"] == fs["param_groups"]
    assert list(ts["state"]) == list(fs["state"]) == [0]
    assert list(ts["state"][0]) == list(fs["state"][0])
    for key, value in ts["state"][0].items():
        other = fs["state"][0][key]
        assert type(value) is type(other), key
        if isinstance(value, list):
            assert len(value) == len(other) and all(type(a) is type(b) for a, b in zip(value, other)), key


@pytest.mark.parametrize("options", [dict(line_search_fn="strong_wolfe"), dict(lr=0.5)])
def test_fifty_steps_of_one_iteration(options, rng):
    """max_iter=1 (one iteration per step(), the stochastic-style use): 50 steps, the history carried from
    step to step, both classes against torch. (A fixed step of lr=1 drifts from torch by rounding here.)"""
    options = dict(max_iter=1, history_size=5, **options)
    f, init = _objective("logreg", int(rng.integers(2 ** 31)), torch.float64)
    tp = [t.clone().requires_grad_() for t in init]
    fp = [t.clone().requires_grad_() for t in init]
    arrays = [t.numpy().copy() for t in init]
    topt, fopt, opt = torch.optim.LBFGS(tp, **options), ft.LBFGS(fp, **options), fastopt.LBFGS(arrays, **options)
    for _ in range(50):
        topt.step(_torch_closure(topt, f, tp))
        fopt.step(_torch_closure(fopt, f, fp))
        opt.step(_numpy_closure(f, arrays))
        ref = _flat([p.detach() for p in tp])
        assert _rel(_flat(arrays), ref) < 1e-9 and _rel(_flat([p.detach() for p in fp]), ref) < 1e-9
    _same_counters(topt.state[tp[0]], opt.state[0])
    assert len(opt.state[0]["old_dirs"]) == len(topt.state[tp[0]]["old_dirs"]) <= 5


def test_float32_within_rounding(rng):
    """float32: both classes follow torch while the iterates are far from the tolerances (the dot products'
    summation orders differ, so the trajectories agree to float32 rounding, amplified a little)."""
    for line_search_fn in (None, "strong_wolfe"):
        f, init = _objective("logreg", int(rng.integers(2 ** 31)), torch.float32)
        options = dict(max_iter=3, history_size=3, line_search_fn=line_search_fn)
        tp = [t.clone().requires_grad_() for t in init]
        fp = [t.clone().requires_grad_() for t in init]
        arrays = [t.numpy().copy() for t in init]
        topt, fopt, opt = torch.optim.LBFGS(tp, **options), ft.LBFGS(fp, **options), fastopt.LBFGS(arrays, **options)
        for _ in range(3):
            lt = topt.step(_torch_closure(topt, f, tp)).item()
            lf = fopt.step(_torch_closure(fopt, f, fp)).item()
            ln = opt.step(_numpy_closure(f, arrays))
            # (40 seeds: params within 1.1e-5, losses within 3.2e-6 of torch's)
            assert lf == pytest.approx(lt, rel=5e-5) and ln == pytest.approx(lt, rel=5e-5)
            ref = _flat([p.detach() for p in tp])
            assert _rel(_flat([p.detach() for p in fp]), ref) < 1e-4
            assert _rel(_flat(arrays), ref) < 1e-4
            _same_counters(topt.state[tp[0]], opt.state[0])
        assert opt.state[0]["d"].dtype == np.float32 and isinstance(opt.state[0]["ro"][0], np.float32)
        assert fopt.state[fp[0]]["d"].dtype == torch.float32 and fopt.state[fp[0]]["ro"][0].dtype == torch.float32


def test_large_vector_uses_one_pass_kernel(monkeypatch):
    """n >= AXPY_KERNEL_MIN: the compiled axpy (fastopt's SGD kernel) for the two-loop recursion and the
    update, chosen by size; still torch's trajectory."""
    n = lbfgs_mod.AXPY_KERNEL_MIN
    g = torch.Generator().manual_seed(3)
    c = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, generator=g, dtype=torch.float64)

    def f(ps):
        x = ps[0]
        return 0.5 * (c * x * x).sum() - (b * x).sum() + 0.05 * (x ** 4).sum()
    tp = [x0.clone().requires_grad_()]
    arrays = [x0.numpy().copy()]
    topt = torch.optim.LBFGS(tp, max_iter=4, history_size=3, line_search_fn="strong_wolfe")
    opt = fastopt.LBFGS(arrays, max_iter=4, history_size=3, line_search_fn="strong_wolfe")
    calls = _count_kernel_calls(monkeypatch)
    for _ in range(2):
        lt = topt.step(_torch_closure(topt, f, tp))
        ln = opt.step(_numpy_closure(f, arrays))
        assert ln == pytest.approx(lt.item(), rel=1e-9)
        assert _rel(arrays[0], tp[0].detach().numpy()) < 1e-9
    assert len(calls) > 10   # the two-loop recursion's axpys and the updates
    # one element fewer: NumPy's two passes
    del calls[:]
    small = [x0[:-1].numpy().copy()]
    opt = fastopt.LBFGS(small, max_iter=3)   # (max_eval 3: two iterations, so one history pair)
    opt.step(lambda: (0.5 * float(np.sum((small[0] - 1) ** 2)), [small[0] - 1]))
    assert not calls and len(opt.state[0]["old_dirs"]) == 1


def test_grad_none_and_non_contiguous_params():
    """A param whose gradient is None is a zero gradient (torch's _gather_flat_grad); a Fortran-ordered
    NumPy param is updated in logical order."""
    f0, init = _objective("logreg", 11, torch.float64)
    unused = 3

    def f(ps):
        return f0([p if i != unused else p.detach() * 0 + 1 for i, p in enumerate(ps)])
    tp = [t.clone().requires_grad_() for t in init]
    fp = [t.clone().requires_grad_() for t in init]
    arrays = [np.asfortranarray(t.numpy().copy()) for t in init]
    assert not arrays[0].flags.c_contiguous
    topt = torch.optim.LBFGS(tp, max_iter=4, history_size=3)
    fopt = ft.LBFGS(fp, max_iter=4, history_size=3)
    opt = fastopt.LBFGS(arrays, max_iter=4, history_size=3)
    for _ in range(5):
        topt.step(_torch_closure(topt, f, tp))
        fopt.step(_torch_closure(fopt, f, fp))
        opt.step(_numpy_closure(f, arrays, unused=(unused,)))
        assert tp[unused].grad is None and fp[unused].grad is None
        ref = _flat([p.detach() for p in tp])
        assert _rel(_flat([p.detach() for p in fp]), ref) < 1e-9
        assert _rel(_flat(arrays), ref) < 1e-9
    assert np.array_equal(arrays[unused], init[unused].numpy())  # a zero gradient never moves it


def test_complex_param_torch_class():
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(4, generator=g, dtype=torch.complex128)
    w0 = torch.randn(3, generator=g, dtype=torch.float64)
    target = torch.randn(4, generator=g, dtype=torch.complex128)

    def f(ps):
        z, w = ps
        return ((z - target).abs() ** 2).sum() + (w ** 2).sum() * (1 + (z.real ** 2).sum())
    tp = [z0.clone().requires_grad_(), w0.clone().requires_grad_()]
    fp = [z0.clone().requires_grad_(), w0.clone().requires_grad_()]
    topt = torch.optim.LBFGS(tp, max_iter=5, line_search_fn="strong_wolfe")
    fopt = ft.LBFGS(fp, max_iter=5, line_search_fn="strong_wolfe")
    for _ in range(3):
        topt.step(_torch_closure(topt, f, tp))
        fopt.step(_torch_closure(fopt, f, fp))
        for a, b in zip(fp, tp):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_mixed_dtypes_lr_scheduler_and_group_dict():
    """float32 and float64 params: one float64 flat vector (torch.cat's promotion), each param rounded back
    once; an lr scheduler drives fastopt.torch.LBFGS as torch's; the NumPy class takes one group dict."""
    g = torch.Generator().manual_seed(8)
    init = [torch.randn(5, generator=g, dtype=torch.float32), torch.randn(4, 3, generator=g, dtype=torch.float64)]
    A = torch.randn(30, 17, generator=g, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)

    def f(ps):
        x = torch.cat([p.reshape(-1).double() for p in ps])
        r = A @ x - b
        return 0.5 * (r * r).sum() + 0.1 * (x ** 4).sum()
    tp = [t.clone().requires_grad_() for t in init]
    fp = [t.clone().requires_grad_() for t in init]
    arrays = [t.numpy().copy() for t in init]
    topt = torch.optim.LBFGS(tp, max_iter=4, line_search_fn="strong_wolfe")
    fopt = ft.LBFGS(fp, max_iter=4, line_search_fn="strong_wolfe")
    opt = fastopt.LBFGS([{"params": arrays, "max_iter": 4}], line_search_fn="strong_wolfe")
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (topt, fopt)]

    def numpy_closure():
        ps = [torch.tensor(a, requires_grad=True) for a in arrays]
        loss = f(ps)
        loss.backward()
        return loss.item(), [p.grad.numpy() for p in ps]
    for k in range(5):
        topt.step(_torch_closure(topt, f, tp))
        fopt.step(_torch_closure(fopt, f, fp))
        opt.step(numpy_closure)
        for sched in schedulers:
            sched.step()
        opt.param_groups[0]["lr"] = topt.param_groups[0]["lr"]
        for mine, array, ref in zip(fp, arrays, tp):
            assert mine.dtype == ref.dtype and array.dtype == np.dtype(str(ref.dtype).split(".")[1])
            assert _rel(mine.detach(), ref.detach()) < 1e-9 and _rel(array, ref.detach()) < 1e-9
    assert fopt.param_groups[0]["lr"] == topt.param_groups[0]["lr"] == 0.25
    assert opt.state[0]["d"].dtype == np.float64 and fopt.state[fp[0]]["d"].dtype == torch.float64


def _tensors_to_numpy(value):
    if isinstance(value, list):
        return [_tensors_to_numpy(v) for v in value]
    return value.numpy() if isinstance(value, torch.Tensor) and value.dim() else (
        value.numpy()[()] if isinstance(value, torch.Tensor) else value)


def _numpy_to_tensors(value):
    if isinstance(value, list):
        return [_numpy_to_tensors(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return torch.tensor(value)
    return value


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_state_dict_interchange_mid_run(line_search_fn):
    """torch -> fastopt.torch, fastopt.torch -> torch, torch -> fastopt (NumPy) and back, mid-run: each
    continuation follows the uninterrupted torch run."""
    f, init = _objective("rosenbrock", 21, torch.float64)
    options = dict(max_iter=3, history_size=4, line_search_fn=line_search_fn)

    def torch_run(steps, ps=None, sd=None):
        ps = ps if ps is not None else [t.clone().requires_grad_() for t in init]
        opt = torch.optim.LBFGS(ps, **options)
        if sd is not None:
            opt.load_state_dict(sd)
        for _ in range(steps):
            opt.step(_torch_closure(opt, f, ps))
        return ps, opt

    ref, _ = torch_run(8)
    ref = _flat([p.detach() for p in ref])
    # torch for 4 steps, then fastopt.torch for 4
    ps, topt = torch_run(4)
    fopt = ft.LBFGS(ps, **options)
    fopt.load_state_dict(copy.deepcopy(topt.state_dict()))
    for _ in range(4):
        fopt.step(_torch_closure(fopt, f, ps))
    assert _rel(_flat([p.detach() for p in ps]), ref) < 1e-9
    # fastopt.torch for 4 steps, then torch for 4
    ps = [t.clone().requires_grad_() for t in init]
    fopt = ft.LBFGS(ps, **options)
    for _ in range(4):
        fopt.step(_torch_closure(fopt, f, ps))
    ps, _ = torch_run(4, ps, copy.deepcopy(fopt.state_dict()))
    assert _rel(_flat([p.detach() for p in ps]), ref) < 1e-9
    # torch for 4 steps, then the NumPy class (it reads the CPU tensors) for 2, then torch again for 2
    ps, topt = torch_run(4)
    arrays = [p.detach().numpy().copy() for p in ps]
    opt = fastopt.LBFGS(arrays, **options)
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    for _ in range(2):
        opt.step(_numpy_closure(f, arrays))
    sd = opt.state_dict()
    assert all(isinstance(a, np.ndarray) for a in sd["state"][0]["old_dirs"])
    sd = {"state": {0: {k: _numpy_to_tensors(v) for k, v in sd["state"][0].items()}},
          "param_groups": sd["param_groups"]}
    ps, _ = torch_run(2, [torch.tensor(a, requires_grad=True) for a in arrays], sd)
    assert _rel(_flat([p.detach() for p in ps]), ref) < 1e-9


def test_torch_class_leaves_dropped_state_tensors_alone():
    """The NumPy side recycles its buffers, but fastopt.torch's state tensors, once handed out (state_dict()
    is torch's shallow one), are never written again: torch never writes its dropped history either."""
    f, init = _objective("rosenbrock", 27, torch.float64)
    for line_search_fn in (None, "strong_wolfe"):
        ps = [t.clone().requires_grad_() for t in init]
        opt = ft.LBFGS(ps, max_iter=4, history_size=2, line_search_fn=line_search_fn)
        opt.step(_torch_closure(opt, f, ps))
        live = opt.state_dict()["state"][0]
        held = [live["d"], live["prev_flat_grad"], *live["old_dirs"], *live["old_stps"]]
        copies = [t.clone() for t in held]
        for _ in range(3):
            opt.step(_torch_closure(opt, f, ps))
        assert all(torch.equal(a, b) for a, b in zip(held, copies))
        assert not any(a is b for a in held for b in opt.state[ps[0]]["old_dirs"])


def test_numpy_state_dict_is_a_copy_and_round_trips():
    f, init = _objective("logreg", 31, torch.float64)
    arrays = [t.numpy().copy() for t in init]
    opt = fastopt.LBFGS(arrays, max_iter=3, history_size=3)
    assert opt.state_dict() == {"state": {}, "param_groups": [{**opt.defaults, "params": list(range(len(SHAPES)))}]}
    for _ in range(3):
        opt.step(_numpy_closure(f, arrays))
    sd = opt.state_dict()
    sd["state"][0]["d"][:] = 123.0   # a copy: the optimizer's state is not touched
    assert not np.any(opt.state[0]["d"] == 123.0)
    sd = opt.state_dict()
    arrays2 = [a.copy() for a in arrays]
    opt2 = fastopt.LBFGS(arrays2, max_iter=1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["max_iter"] == 3 and opt2.param_groups[0]["params"][0] is arrays2[0]
    for _ in range(3):
        opt.step(_numpy_closure(f, arrays))
        opt2.step(_numpy_closure(f, arrays2))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, arrays2))
    assert opt.zero_grad() is None


def test_repr_lists_the_group_as_torch_optim_does():
    opt = fastopt.LBFGS([np.zeros(3)], lr=0.5, history_size=7, line_search_fn="strong_wolfe")
    lines = repr(opt).splitlines()
    assert lines[:2] == ["LBFGS (", "Parameter Group 0"] and lines[-1] == ")"
    assert set(lines[2:-1]) == {f"    {k}: {v}" for k, v in opt.param_groups[0].items() if k != "params"}
    assert "    lr: 0.5" in lines and "    history_size: 7" in lines and "    line_search_fn: strong_wolfe" in lines


def _bytes(arrays):
    return [np.asarray(a).tobytes() for a in arrays]


def test_bad_arguments_raise_like_torch():
    p = [np.zeros(3)]
    t = [torch.zeros(3, requires_grad=True)]
    for cls, params in ((torch.optim.LBFGS, t), (ft.LBFGS, t), (fastopt.LBFGS, p)):
        with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
            cls(params, lr=-0.5)
        other = [np.zeros(2)] if cls is fastopt.LBFGS else [torch.zeros(2, requires_grad=True)]
        with pytest.raises(ValueError, match=r"LBFGS doesn't support per-parameter options \(parameter groups\)"):
            cls([{"params": params}, {"params": other}])
    for cls in (torch.optim.LBFGS, ft.LBFGS):
        with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
            cls(t, lr=torch.ones(2))
    # torch accepts a bogus line search at construction and refuses it in step(): so does fastopt.torch, before
    # calling the closure; the NumPy class refuses it at once, naming the argument
    calls = []

    def closure():
        calls.append(1)
        loss = (t[0] - 1).pow(2).sum()
        loss.backward()
        return loss
    fopt = ft.LBFGS(t, line_search_fn="bogus")
    with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
        fopt.step(closure)
    assert calls == [] and not fopt.state and torch.equal(t[0], torch.zeros(3))
    with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
        torch.optim.LBFGS(t, line_search_fn="bogus").step(closure)
    with pytest.raises(ValueError, match="line_search_fn: 'bogus'"):
        fastopt.LBFGS(p, line_search_fn="bogus")
    for name, value, error in (("max_iter", 0, ValueError), ("history_size", 0, ValueError),
                               ("max_eval", -1, ValueError), ("max_iter", 2.5, TypeError),
                               ("tolerance_grad", float("nan"), ValueError), ("lr", "1", TypeError)):
        with pytest.raises(error, match=name if name != "lr" else "lr must be a real number"):
            fastopt.LBFGS(p, **{name: value})
        fopt = ft.LBFGS(t)
        fopt.param_groups[0][name] = value
        calls.clear()
        with pytest.raises(error):
            fopt.step(closure)
        assert calls == [] and not fopt.state[t[0]]
    with pytest.raises(ValueError, match="empty parameter list"):
        fastopt.LBFGS([])
    with pytest.raises(TypeError, match="floating-point"):
        fastopt.LBFGS([np.zeros(3, np.int64)])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastopt.LBFGS([ro])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("bad_call", [1, 2, 4])
@pytest.mark.parametrize("bad", ["count", "shape", "dtype", "not-a-pair", "loss", "raises"])
def test_bad_closure_result_leaves_everything_unchanged(bad, bad_call, line_search_fn):
    """A malformed closure result (or an exception) at the first call or later in the step, after the
    params moved: the params come back byte for byte, the state is the one before the step."""
    f, init = _objective("rosenbrock", 41, torch.float64)
    arrays = [t.numpy().copy() for t in init]
    opt = fastopt.LBFGS(arrays, max_iter=4, history_size=3, line_search_fn=line_search_fn)
    good = _numpy_closure(f, arrays)
    opt.step(good)
    before, state_before = _bytes(arrays), opt.state_dict()
    calls = []

    def closure():
        calls.append(1)
        loss, grads = good()
        if len(calls) < bad_call:
            return loss, grads
        if bad == "count":
            return loss, grads[:-1]
        if bad == "shape":
            return loss, grads[:2] + [grads[2].reshape(1, 1)] + grads[3:]
        if bad == "dtype":
            return loss, [g.astype(np.float32) for g in grads]
        if bad == "not-a-pair":
            return loss
        if bad == "loss":
            return "x", grads
        raise KeyError("user error")
    with pytest.raises((TypeError, ValueError, KeyError)) as info:
        opt.step(closure)
    assert len(calls) == bad_call
    assert bad != "raises" or info.type is KeyError
    assert _bytes(arrays) == before
    after = opt.state_dict()
    assert after["state"][0].keys() == state_before["state"][0].keys()
    for key, value in state_before["state"][0].items():
        other = after["state"][0][key]
        if isinstance(value, list):
            assert len(value) == len(other) and all(
                (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b or a is b) for a, b in zip(value, other))
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, other)
        else:
            assert value == other
    opt.step(good)   # and it goes on


def test_torch_closure_raising_mid_step_restores_params_and_state():
    f, init = _objective("rosenbrock", 51, torch.float64)
    fp = [t.clone().requires_grad_() for t in init]
    fopt = ft.LBFGS(fp, max_iter=4)
    fopt.step(_torch_closure(fopt, f, fp))
    before = [p.detach().clone() for p in fp]
    state = copy.deepcopy(fopt.state_dict())
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return _torch_closure(fopt, f, fp)()
    version = fp[0]._version
    with pytest.raises(RuntimeError, match="boom"):
        fopt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(fp, before))
    assert fp[0]._version > version          # the params were written (and put back)
    after = fopt.state_dict()["state"][0]
    assert after["func_evals"] == state["state"][0]["func_evals"]
    assert all(torch.equal(a, b) for a, b in zip(after["old_dirs"], state["state"][0]["old_dirs"]))
    assert torch.equal(after["d"], state["state"][0]["d"])


def test_load_state_dict_checks_before_changing():
    f, init = _objective("logreg", 61, torch.float64)
    arrays = [t.numpy().copy() for t in init]
    opt = fastopt.LBFGS(arrays, max_iter=2)
    opt.step(_numpy_closure(f, arrays))
    sd = opt.state_dict()
    good = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0]["old_dirs"] = [np.zeros(N + 1)]
    with pytest.raises(ValueError, match=r"state 'old_dirs'\[0\] must be a vector of %d elements" % N):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = [0]
    with pytest.raises(ValueError, match="1 params"):
        opt.load_state_dict(bad)
    now = opt.state_dict()
    assert now["param_groups"] == good["param_groups"]
    assert np.array_equal(now["state"][0]["prev_flat_grad"], good["state"][0]["prev_flat_grad"])


@pytest.mark.parametrize("edit, match", [
    (lambda st: st.pop("d"), "lacks 'd'"), (lambda st: st.__setitem__("d", None), "lacks 'd'"),
    (lambda st: st.pop("t"), "lacks 't'"), (lambda st: st.pop("prev_flat_grad"), "lacks 'prev_flat_grad'"),
    (lambda st: st.pop("H_diag"), "lacks 'H_diag'"),
    (lambda st: [st.pop(k) for k in ("old_dirs", "old_stps", "ro")], "lacks 'old_dirs', 'old_stps', 'ro'"),
])
def test_load_state_dict_refuses_a_state_the_next_step_cannot_read(edit, match):
    """A state past its first iteration without what the next step reads was loaded, and every later step
    failed with an unrelated error (UFuncTypeError, TypeError on None): refused at load, nothing changed."""
    f, init = _objective("logreg", 61, torch.float64)
    arrays = [t.numpy().copy() for t in init]
    opt = fastopt.LBFGS(arrays, max_iter=3, history_size=4)
    closure = _numpy_closure(f, arrays)
    for _ in range(2):
        opt.step(closure)
    bad = copy.deepcopy(opt.state_dict())
    edit(bad["state"][0])
    before = opt.state_dict()
    params = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    with pytest.raises(TypeError, match=r"state_dict\['state'\] must be a dict"):
        opt.load_state_dict({"state": [bad["state"][0]], "param_groups": bad["param_groups"]})
    now = opt.state_dict()
    assert now["state"][0]["n_iter"] == before["state"][0]["n_iter"]
    assert np.array_equal(now["state"][0]["d"], before["state"][0]["d"])
    assert all(np.array_equal(a, b) for a, b in zip(arrays, params))
    opt.step(closure)  # still usable


def test_a_state_saved_with_a_smaller_history_loads_into_a_larger_one():
    """`al` is scratch sized by history_size; a state saved with history_size=3 loaded into one with 6 failed
    at the step (IndexError). It is padded; too many history pairs for the new size are refused."""
    f, init = _objective("logreg", 61, torch.float64)
    arrays = [t.numpy().copy() for t in init]
    small = fastopt.LBFGS(arrays, max_iter=4, history_size=3)
    closure = _numpy_closure(f, arrays)
    small.step(closure)
    sd = small.state_dict()
    assert len(sd["state"][0]["old_dirs"]) == 3
    sd["param_groups"][0]["history_size"] = 6
    larger = fastopt.LBFGS([a.copy() for a in arrays], max_iter=4, history_size=6)
    larger.load_state_dict(sd)
    for _ in range(3):
        larger.step(_numpy_closure(f, larger.param_groups[0]["params"]))
    sd["param_groups"][0]["history_size"] = 2
    with pytest.raises(ValueError, match="3 history pairs, more than history_size=2"):
        larger.load_state_dict(sd)
    small.param_groups[0]["history_size"] = 5  # raised between steps: the step makes room too
    for _ in range(2):
        small.step(closure)
    assert len(small.state_dict()["state"][0]["old_dirs"]) == 5


def test_autograd_version_counter():
    """A graph that saved a param before the step raises instead of giving a wrong gradient, as with torch."""
    f, init = _objective("logreg", 71, torch.float64)
    for cls in (torch.optim.LBFGS, ft.LBFGS):
        ps = [t.clone().requires_grad_() for t in init]
        opt = cls(ps, max_iter=2)
        saved = (ps[0] * ps[0]).sum()
        opt.step(_torch_closure(opt, f, ps))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()
        # a step that returns at once (max|g| <= tolerance_grad) writes nothing and bumps nothing
        opt = cls(ps, tolerance_grad=1e9)
        versions = [p._version for p in ps]
        opt.step(_torch_closure(opt, f, ps))
        assert [p._version for p in ps] == versions


def test_spec_and_exports():
    spec = fastopt.specs.COMPOSITE["lbfgs"]
    assert spec.class_name == "LBFGS" and spec.torch_class == "LBFGS"
    torch_sig = inspect.signature(torch.optim.LBFGS.__init__)
    theirs = [(k, v.default, v.kind) for k, v in torch_sig.parameters.items()]
    if not TORCH_HAS_MAXIMIZE:  # torch < 2.15: fastopt's keyword-only maximize=False is the only addition
        theirs.append(("maximize", False, inspect.Parameter.KEYWORD_ONLY))
    assert {k: d for k, d, _ in theirs if k not in ("self", "params")} == spec.defaults
    ours = inspect.signature(ft.LBFGS.__init__).parameters
    assert [(k, v.default, v.kind) for k, v in ours.items()] == theirs
    numpy_sig = inspect.signature(fastopt.LBFGS.__init__).parameters
    assert [(k, v.default, v.kind) for k, v in numpy_sig.items()] == theirs
    assert issubclass(ft.LBFGS, torch.optim.Optimizer)
    assert "LBFGS" in fastopt.__all__ and "LBFGS" in ft.__all__


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_16bit_add_rounds_its_python_float_as_torch(tdtype):
    """params += t d with a Python float t: torch turns t into 16 bits through float32, NumPy in one rounding.
    They differ where t rounds to a float32 that is a tie of the 16-bit type: t just above 1 + half a 16-bit
    ulp goes to the tie in float32, then to even (1.0); straight to 16 bits it rounds up. (A random t of the
    test below hit such a value about once in 300 runs.)"""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tdt = getattr(torch, tdtype)
    npdt = np.dtype(ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16)
    tie = 1.0 + 2.0 ** -(8 if tdtype == "bfloat16" else 11)
    for t in (tie + 2.0 ** -30, -(tie + 2.0 ** -30)):
        assert npdt.type(t) != npdt.type(np.float32(t))  # the case that matters
        vec = lbfgs_mod.ParamVector([np.zeros(5, npdt)])
        x = torch.linspace(0.5, 1.5, 5).to(tdt)
        vec.add(t, x.view(torch.int16).numpy().view(npdt).copy())
        want = torch.zeros(5, dtype=tdt).add_(x, alpha=t)
        assert vec.params[0].view(np.int16).tolist() == want.view(torch.int16).tolist()


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_16bit_vector_operations_round_as_torch(tdtype, rng):
    """The flat-vector operations of a 16-bit L-BFGS step round as torch's CPU ops on the same bits: y += a x
    (torch's add_ with alpha: below its vector width, the product rounded to 16 bits, then the sum), a * t for a
    Python float t (torch: in float32, t rounded to float32; NumPy's float16 loop would round t to float16
    first, which made one seed in ~50 leave torch's trajectory), a - b, the params' update, and sum |a| (torch
    sums 16-bit values in float32; NumPy's bfloat16 sum rounds every partial sum: about 1 sum in 2 differed)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tdt = getattr(torch, tdtype)
    npdt = ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16

    def to_numpy(t):
        return t.view(torch.int16).numpy().view(npdt).copy()

    def bits(a):
        return np.asarray(a).view(np.int16)
    for n in (1, 6, 17, 31):  # L-BFGS's 16-bit vectors in the tests; torch's vector loop starts at 32
        vec = lbfgs_mod.ParamVector([np.zeros(n, npdt)])
        for _ in range(20):
            a, x = torch.randn(n).to(tdt), torch.randn(n).to(tdt)
            t = float(rng.standard_normal() * 3)
            alpha = torch.randn(()).to(tdt)
            np.testing.assert_array_equal(bits(vec.mul(to_numpy(a), t)), bits(to_numpy(torch.mul(a, t))))
            np.testing.assert_array_equal(bits(vec.sub(to_numpy(a), to_numpy(x))), bits(to_numpy(a - x)))
            total = vec.abs_sum(to_numpy(a))
            assert total.dtype == npdt and bits(total) == bits(to_numpy(a.abs().sum().reshape(1)))[0]
            y = to_numpy(a)
            vec.axpy(y, to_numpy(alpha.reshape(1))[0], to_numpy(x))
            np.testing.assert_array_equal(bits(y), bits(to_numpy(a.clone().add_(x, alpha=alpha))))
            vec.params[0][...] = to_numpy(a)
            vec.add(t, to_numpy(x))
            np.testing.assert_array_equal(bits(vec.params[0]), bits(to_numpy(a.clone().add_(x, alpha=t))))


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_16bit_params_follow_torch(tdtype, line_search_fn, rng):
    """16-bit params work the way torch.optim.LBFGS runs them (flat vectors and history in the params' dtype,
    no float32 upcast of the user's params: L-BFGS's state is not elementwise, DESIGN.md "Precision" leaves it
    to torch's semantics): fastopt.torch.LBFGS equals torch bit for bit (measured: 400 seeds, both line searches,
    both dtypes), and the NumPy class on float16 / ml_dtypes bfloat16 arrays (grads in the same dtype) gives the
    same params."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tdt = getattr(torch, tdtype)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    A, b = torch.randn(9, 6, generator=gen).to(tdt), torch.randn(9, generator=gen).to(tdt)

    def f(ps):
        return ((A @ ps[0] - b) ** 2).sum()
    options = dict(lr=0.5, max_iter=4, history_size=3, line_search_fn=line_search_fn)
    tp, fp = [torch.zeros(6, dtype=tdt, requires_grad=True)], [torch.zeros(6, dtype=tdt, requires_grad=True)]
    npdt = ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16
    arrays = [np.zeros(6, npdt)]
    topt, fopt, opt = torch.optim.LBFGS(tp, **options), ft.LBFGS(fp, **options), fastopt.LBFGS(arrays, **options)

    def numpy_closure():
        x = torch.from_numpy(arrays[0].view(np.int16).copy()).view(tdt).requires_grad_()
        loss = f([x])
        loss.backward()
        return loss.item(), [x.grad.view(torch.int16).numpy().view(npdt)]
    for _ in range(4):
        lt = topt.step(_torch_closure(topt, f, tp)).item()
        lf = fopt.step(_torch_closure(fopt, f, fp)).item()
        opt.step(numpy_closure)
        # equal bit for bit, except the sign of a NaN (about 1 float16 run in 30 breaks down to NaN, torch's
        # +NaN where x86's invalid operations give -NaN): assert_array_equal takes NaN as equal to NaN
        np.testing.assert_array_equal(lf, lt)
        for mine, theirs in ((fp[0].detach(), tp[0].detach()), (torch.from_numpy(arrays[0].view(np.int16)).view(tdt),
                                                                 fp[0].detach())):
            numbers = ~torch.isnan(theirs)
            np.testing.assert_array_equal(mine.view(torch.int16)[numbers].numpy(), theirs.view(torch.int16)[numbers].numpy())
            np.testing.assert_array_equal(torch.isnan(mine).numpy(), torch.isnan(theirs).numpy())
    assert arrays[0].dtype == npdt and fopt.state[fp[0]]["d"].dtype == tdt
    assert not torch.equal(tp[0], torch.zeros(6, dtype=tdt))


# ---- maximize (torch 2.15's keyword-only option) -----------------------------------------------------------

TORCH_HAS_MAXIMIZE = "maximize" in inspect.signature(torch.optim.LBFGS).parameters
_NEEDS_MAXIMIZE = pytest.mark.skipif(not TORCH_HAS_MAXIMIZE, reason=f"torch {torch.__version__}'s LBFGS has no "
                                     "maximize (torch >= 2.15 has it): nothing to compare with")


def _negated(f):
    """-f, the objective to maximize: its maximum is f's minimum."""
    return lambda ps: -f(ps)


@_NEEDS_MAXIMIZE
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("kind", ["rosenbrock", "logreg"])
@pytest.mark.parametrize("steps,options", CONFIGS[:3])
def test_maximize_matches_torch_float64(kind, line_search_fn, steps, options, rng):
    """maximize=True on -f: both classes follow torch 2.15's LBFGS(maximize=True) within the tolerances of the
    minimizing comparisons above; returned losses are the closure's (-f), state and groups torch's."""
    f, init = _objective(kind, _seed(kind, rng, 200 + steps), torch.float64)
    g = _negated(f)
    options = dict(options, line_search_fn=line_search_fn)
    tp = [t.clone().requires_grad_() for t in init]
    fp = [t.clone().requires_grad_() for t in init]
    arrays = [t.numpy().copy() for t in init]
    topt = torch.optim.LBFGS(tp, maximize=True, **options)
    fopt = ft.LBFGS(fp, maximize=True, **options)
    opt = fastopt.LBFGS(arrays, maximize=True, **options)
    first = None
    for _ in range(steps):
        lt = topt.step(_torch_closure(topt, g, tp))
        lf = fopt.step(_torch_closure(fopt, g, fp))
        ln = opt.step(_numpy_closure(g, arrays))
        first = lt.item() if first is None else first
        assert isinstance(lf, torch.Tensor) and lf.item() == pytest.approx(lt.item(), rel=1e-9, abs=1e-12)
        assert ln == pytest.approx(lt.item(), rel=1e-9, abs=1e-12)
        ref = _flat([p.detach() for p in tp])
        assert _rel(_flat([p.detach() for p in fp]), ref) < 1e-9
        assert _rel(_flat(arrays), ref) < 1e-9
        _same_counters(topt.state[tp[0]], fopt.state[fp[0]])
        _same_counters(topt.state[tp[0]], opt.state[0])
    assert lt.item() > first          # it went uphill on -f
    ts, fs = topt.state_dict(), fopt.state_dict()
    assert ts["param_groups"] == fs["param_groups"] and ts["param_groups"][0]["maximize"] is True
    assert opt.param_groups[0]["maximize"] is True
    tstate, fstate, nstate = ts["state"][0], fs["state"][0], opt.state[0]
    assert list(tstate) == list(fstate) == list(nstate)
    assert float(fstate["prev_loss"]) == pytest.approx(float(tstate["prev_loss"]), rel=1e-9, abs=1e-12)
    assert nstate["prev_loss"] == pytest.approx(float(tstate["prev_loss"]), rel=1e-9, abs=1e-12)
    ref = tstate["old_dirs"] + tstate["old_stps"] + [tstate["d"], tstate["prev_flat_grad"]]
    scale = max(float(a.abs().max()) for a in ref)
    for mine in (fstate, nstate):
        got = mine["old_dirs"] + mine["old_stps"] + [mine["d"], mine["prev_flat_grad"]]
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            assert np.max(np.abs(np.asarray(b) - a.numpy())) <= 1e-7 * scale


def _negated_grad_closures(f, arrays=None, opt=None, ps=None):
    """Closures of -f whose gradients are f's negated exactly (so that maximize on -f and minimize on f see
    values equal to the bit): for the NumPy class (arrays) or a torch class (opt, ps)."""
    if arrays is not None:
        inner = _numpy_closure(f, arrays)

        def closure():
            loss, grads = inner()
            return -loss, [-gr for gr in grads]
        return closure

    def closure():
        opt.zero_grad()
        loss = f(ps)
        loss.backward()
        for p in ps:
            p.grad.neg_()
        return -loss
    return closure


def _same_state(a, b):
    assert list(a) == list(b)
    for key in a:
        x, y = a[key], b[key]
        if key == "al":
            continue  # the two-loop recursion's scratch
        if isinstance(x, list):
            assert len(x) == len(y), key
            for u, v in zip(x, y):
                assert np.array_equal(np.asarray(u), np.asarray(v)), key
        elif x is None or type(x) in (int, float):
            assert x == y and type(x) is type(y), key
        else:
            assert np.array_equal(np.asarray(x), np.asarray(y)), key


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("cls", ["numpy", "torch"])
def test_maximize_is_minimizing_the_negation(cls, line_search_fn):
    """On any torch: maximize=True on -f takes exactly the steps of maximize=False on f (the negation is exact),
    with the same state (prev_loss is f's, the state holding -(-f)); step() returns the closure's loss, -f."""
    f, init = _objective("logreg", 41, torch.float64)
    options = dict(max_iter=4, history_size=3, line_search_fn=line_search_fn)
    if cls == "numpy":
        a_max, a_min = [t.numpy().copy() for t in init], [t.numpy().copy() for t in init]
        o_max = fastopt.LBFGS(a_max, maximize=True, **options)
        o_min = fastopt.LBFGS(a_min, **options)
        c_max, c_min = _negated_grad_closures(f, arrays=a_max), _numpy_closure(f, a_min)
        params = lambda: (a_max, a_min)                                           # noqa: E731
        state = lambda o: o.state[0]                                              # noqa: E731
        value = float
    else:
        p_max, p_min = [t.clone().requires_grad_() for t in init], [t.clone().requires_grad_() for t in init]
        o_max = ft.LBFGS(p_max, maximize=True, **options)
        o_min = ft.LBFGS(p_min, **options)
        c_max, c_min = _negated_grad_closures(f, opt=o_max, ps=p_max), _torch_closure(o_min, f, p_min)
        params = lambda: ([p.detach().numpy() for p in p_max], [p.detach().numpy() for p in p_min])  # noqa: E731
        state = lambda o: o.state[o.param_groups[0]["params"][0]]                 # noqa: E731
        value = lambda x: x.item()                                                # noqa: E731
        assert o_max.param_groups[0]["maximize"] is True   # on any torch
        assert ("maximize" in o_min.param_groups[0]) is TORCH_HAS_MAXIMIZE
    losses = []
    for _ in range(4):
        l_max, l_min = o_max.step(c_max), o_min.step(c_min)
        losses.append(value(l_min))
        assert value(l_max) == -value(l_min)     # the closure's own loss: -f where the other run returns f
        mx, mn = params()
        assert all(np.array_equal(a, b) for a, b in zip(mx, mn))
        _same_state(state(o_max), state(o_min))
    assert losses[-1] < losses[0]   # f went down, -f up (sanity)


def test_torch_class_groups_follow_the_installed_torch():
    """The param group has "maximize" exactly when torch.optim.LBFGS's has (torch >= 2.15), False by default;
    maximize=True is taken on any torch (then the group carries it); a non-bool maximize is refused."""
    ps = [torch.zeros(3, requires_grad=True)]
    for kw in ({}, {"line_search_fn": "strong_wolfe", "lr": 0.5}):
        assert ft.LBFGS(ps, **kw).state_dict() == torch.optim.LBFGS(ps, **kw).state_dict()
    if TORCH_HAS_MAXIMIZE:
        assert ft.LBFGS(ps, maximize=True).state_dict() == torch.optim.LBFGS(ps, maximize=True).state_dict()
    else:
        with pytest.raises(TypeError):
            torch.optim.LBFGS(ps, maximize=True)
        group = ft.LBFGS(ps, maximize=True).param_groups[0]
        assert group["maximize"] is True
        assert {k: v for k, v in group.items() if k != "maximize"} == torch.optim.LBFGS(ps).param_groups[0]
    assert fastopt.LBFGS([np.zeros(3)]).param_groups[0]["maximize"] is False
    assert "torch itself has no such option" in ft.LBFGS.__doc__ or "torch < 2.15" in ft.LBFGS.__doc__
    for cls, p in ((ft.LBFGS, ps), (fastopt.LBFGS, [np.zeros(3)])):
        with pytest.raises(TypeError, match="maximize must be a bool"):
            cls(p, maximize="yes")


def _maximize_state_dict(f, init, options, steps):
    """A state dict of an LBFGS run with maximize=True on -f after `steps` steps, and the params: torch's own
    where torch has maximize (a torch 2.15 state dict), else fastopt.torch's (the same layout)."""
    ps = [t.clone().requires_grad_() for t in init]
    cls = torch.optim.LBFGS if TORCH_HAS_MAXIMIZE else ft.LBFGS
    opt = cls(ps, maximize=True, **options)
    for _ in range(steps):
        opt.step(_torch_closure(opt, _negated(f), ps))
    return copy.deepcopy(opt.state_dict()), ps


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_maximize_state_dict_loads_and_keeps_maximizing(line_search_fn):
    """A (torch 2.15) state dict whose group has maximize=True loads into fastopt.torch.LBFGS and
    fastopt.LBFGS built without maximize, and both go on maximizing, as the uninterrupted run."""
    f, init = _objective("rosenbrock", 23, torch.float64)
    g = _negated(f)
    options = dict(max_iter=3, history_size=4, line_search_fn=line_search_fn)
    ref_sd, ref = _maximize_state_dict(f, init, options, 6)
    ref = _flat([p.detach() for p in ref])
    sd, ps = _maximize_state_dict(f, init, options, 3)
    assert sd["param_groups"][0]["maximize"] is True
    fopt = ft.LBFGS(ps, **options)
    fopt.load_state_dict(sd)
    assert fopt.param_groups[0]["maximize"] is True
    for _ in range(3):
        fopt.step(_torch_closure(fopt, g, ps))
    assert _rel(_flat([p.detach() for p in ps]), ref) < 1e-9
    sd, ps = _maximize_state_dict(f, init, options, 3)
    arrays = [p.detach().numpy().copy() for p in ps]
    opt = fastopt.LBFGS(arrays, **options)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is True
    for _ in range(3):
        opt.step(_numpy_closure(g, arrays))
    assert _rel(_flat(arrays), ref) < 1e-9
    # a group without the key (torch < 2.15's) minimizes, whatever the optimizer was built with
    minimize_sd = copy.deepcopy(sd)
    del minimize_sd["param_groups"][0]["maximize"]
    opt = fastopt.LBFGS([a.copy() for a in arrays], maximize=True, **options)
    opt.load_state_dict(minimize_sd)
    assert opt.param_groups[0]["maximize"] is False
    fopt = ft.LBFGS([p.detach().clone().requires_grad_() for p in ps], maximize=True, **options)
    fopt.load_state_dict(minimize_sd)
    assert fopt.param_groups[0].get("maximize", False) is False


@pytest.mark.parametrize("cls", ["numpy", "torch"])
@pytest.mark.parametrize("key, value, error", [
    ("maximize", "yes", TypeError), ("maximize", 1.0, TypeError), ("max_iter", 0, ValueError),
    ("history_size", 2.5, TypeError), ("tolerance_change", float("nan"), ValueError),
    ("line_search_fn", "bogus", (ValueError, RuntimeError)), ("future_option", True, ValueError)])
def test_load_state_dict_refuses_bad_groups_changing_nothing(cls, key, value, error):
    """A loaded param group with a bad hyperparameter raises before anything changes (groups, state and params
    as they were), not at the next step. A key the class does not know: the NumPy class refuses it; the torch
    class keeps it, as torch.optim does (a user's "name", what lr schedulers add), and its own state dict
    round-trips with it."""
    if cls == "torch" and key == "future_option":
        pytest.skip("the torch class keeps unknown keys, as torch.optim (checked below)")
    f, init = _objective("logreg", 63, torch.float64)
    if cls == "numpy":
        arrays = [t.numpy().copy() for t in init]
        opt = fastopt.LBFGS(arrays, max_iter=2)
        opt.step(_numpy_closure(f, arrays))
        params = arrays
        state = lambda: opt.state[0]                                              # noqa: E731
    else:
        ps = [t.clone().requires_grad_() for t in init]
        opt = ft.LBFGS(ps, max_iter=2)
        opt.step(_torch_closure(opt, f, ps))
        params = [p.detach().numpy() for p in ps]   # views: they see any write
        state = lambda: opt.state[ps[0]]                                          # noqa: E731
    before_groups = [dict(g) for g in opt.param_groups]
    before_state = dict(state())
    before_params = [p.copy() for p in params]
    other = ft.LBFGS([t.clone().requires_grad_() for t in init], max_iter=5, lr=0.25)
    bad = copy.deepcopy(other.state_dict())
    bad["param_groups"][0][key] = value
    with pytest.raises(error):
        opt.load_state_dict(bad)
    assert [dict(g) for g in opt.param_groups] == before_groups
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], before_groups[0]["params"]))
    now = state()
    assert list(now) == list(before_state) and all(now[k] is before_state[k] for k in now)
    assert all(np.array_equal(p, b) for p, b in zip(params, before_params))


def test_torch_class_keeps_extra_group_keys_as_torch():
    """torch.optim keeps any key of a param group (a user's "name", what lr schedulers add): so does
    fastopt.torch.LBFGS, through its own state dict and from torch's."""
    f, init = _objective("logreg", 5, torch.float64)
    ps = [t.clone().requires_grad_() for t in init]
    opt = ft.LBFGS([{"params": ps, "name": "all"}], max_iter=2)
    opt.step(_torch_closure(opt, f, ps))
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["name"] == "all"
    theirs = torch.optim.LBFGS([{"params": [t.clone().requires_grad_() for t in init], "name": "x"}], max_iter=5)
    sd = copy.deepcopy(theirs.state_dict())
    sd["param_groups"][0]["initial_lr"] = 0.25
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["name"] == "x" and opt.param_groups[0]["initial_lr"] == 0.25
    assert opt.param_groups[0]["max_iter"] == 5


def test_torch_class_has_torch_params_attribute_for_its_state():
    """Scripts log torch's LBFGS through opt.state[opt._params[0]] ("n_iter", "func_evals"); fastopt.torch.LBFGS
    had no _params (AttributeError)."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    logged = []
    for cls in (torch.optim.LBFGS, ft.LBFGS):
        ps = [torch.linspace(-1, 2, 3, dtype=torch.float64).requires_grad_(), torch.ones(2, dtype=torch.float64,
                                                                                       requires_grad=True)]
        opt = cls(ps, max_iter=4)

        def closure():
            opt.zero_grad()
            loss = sum(((p - 3) ** 4).sum() for p in ps)
            loss.backward()
            return loss

        opt.step(closure)
        assert opt._params[0] is ps[0]
        logged.append((opt.state[opt._params[0]]["n_iter"], opt.state[opt._params[0]]["func_evals"]))
    assert logged[0] == logged[1] and logged[0][0] == 4
