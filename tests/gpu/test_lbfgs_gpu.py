"""LBFGS on a real GPU (skipped without one): fastopt.LBFGS on CuPy arrays follows the same class on NumPy
arrays (float64: the dot products' summation orders differ, so within 1e-9), with the compiled axpy forced and
not; a failing closure restores the CuPy params; fastopt.torch.LBFGS on CUDA tensors follows
torch.optim.LBFGS on CUDA, and its state dict loads into torch's."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import fastopt
import fastopt.lbfgs as lbfgs_mod



SHAPES = [(3, 5), (7,), (1,), (0,), (4, 2)]
N = sum(int(np.prod(s)) for s in SHAPES)


def _problem(xp, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((40, N))
    b = rng.standard_normal(40)
    init = [rng.standard_normal(s) for s in SHAPES]
    A_, b_ = xp.asarray(A), xp.asarray(b)

    def closure_for(params):
        def closure():
            x = xp.concatenate([p.reshape(-1) for p in params])
            r = A_ @ x - b_
            loss = 0.5 * float((r * r).sum()) + 0.05 * float((x ** 4).sum())
            g = A_.T @ r + 0.2 * x ** 3
            grads, o = [], 0
            for p in params:
                grads.append(g[o:o + p.size].reshape(p.shape).astype(p.dtype))
                o += p.size
            return loss, grads
        return closure
    return init, closure_for


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_cupy_follows_numpy(cp, line_search_fn, kernel, monkeypatch):
    if kernel:
        monkeypatch.setattr(lbfgs_mod, "AXPY_KERNEL_MIN", 0)
    init, _ = _problem(np)
    host = [a.copy() for a in init]
    dev = [cp.asarray(a) for a in init]
    _, host_closure = _problem(np)
    _, dev_closure = _problem(cp)
    options = dict(max_iter=4, history_size=3, line_search_fn=line_search_fn)
    h_opt, d_opt = fastopt.LBFGS(host, **options), fastopt.LBFGS(dev, **options)
    for _ in range(6):
        lh = h_opt.step(host_closure(host))
        ld = d_opt.step(dev_closure(dev))
        assert ld == pytest.approx(lh, rel=1e-9)
        for h, d in zip(host, dev):
            np.testing.assert_allclose(cp.asnumpy(d), h, rtol=1e-9, atol=1e-12)
        assert h_opt.state[0]["func_evals"] == d_opt.state[0]["func_evals"]
    sd = d_opt.state_dict()   # host copies
    assert isinstance(sd["state"][0]["d"], np.ndarray)


def test_cupy_failing_closure_restores_params(cp):
    init, closure_for = _problem(cp)
    dev = [cp.asarray(a) for a in init]
    opt = fastopt.LBFGS(dev, max_iter=5)
    opt.step(closure_for(dev))
    before = [cp.asnumpy(d).tobytes() for d in dev]
    good, calls = closure_for(dev), []

    def bad():
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("boom")
        return good()
    with pytest.raises(KeyError):
        opt.step(bad)
    assert [cp.asnumpy(d).tobytes() for d in dev] == before


def test_torch_cuda_follows_torch_optim(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import fastopt.torch as ft
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g, dtype=torch.float64).cuda() for s in SHAPES]
    A = torch.randn(40, N, generator=g, dtype=torch.float64).cuda()
    b = torch.randn(40, generator=g, dtype=torch.float64).cuda()

    def f(ps):
        x = torch.cat([p.reshape(-1) for p in ps])
        r = A @ x - b
        return 0.5 * (r * r).sum() + 0.05 * (x ** 4).sum()
    for line_search_fn in (None, "strong_wolfe"):
        tp = [t.clone().requires_grad_() for t in init]
        fp = [t.clone().requires_grad_() for t in init]
        topt = torch.optim.LBFGS(tp, max_iter=4, history_size=3, line_search_fn=line_search_fn)
        fopt = ft.LBFGS(fp, max_iter=4, history_size=3, line_search_fn=line_search_fn)

        def closure_for(opt, ps):
            def closure():
                opt.zero_grad()
                loss = f(ps)
                loss.backward()
                return loss
            return closure
        for _ in range(5):
            topt.step(closure_for(topt, tp))
            fopt.step(closure_for(fopt, fp))
            for a, c in zip(fp, tp):
                torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
        state = fopt.state[fp[0]]
        assert state["d"].is_cuda and all(t.is_cuda for t in state["old_dirs"])
        topt.load_state_dict(copy.deepcopy(fopt.state_dict()))
        topt.step(closure_for(topt, tp))
