"""Sparse (COO) gradients in fastopt.torch, as torch.optim takes them: SGD and Adagrad update with them
(made dense for the kernels, one warning; the values are torch's sparse update's), with torch's
RuntimeError where torch refuses them (weight_decay with sparse gradients; every other optimizer), nothing
written then; torch.optim.SGD's sparse momentum buffer loads."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from fastopt.specs import REGISTRY  # noqa: E402

from torch_support import one_torch_thread, sparse_row_grad  # noqa: E402,F401  (autouse)

CASES = [("SGD", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9}),
         ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
         ("SGD", {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "maximize": True}),
         ("Adagrad", {"lr": 0.1}),
         ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.2, "maximize": True})]
SHAPES = [(9, 4), (6,), (1, 3)]


def _sparse_grad(gen, shape, dtype):
    """Rows with repeats (summed by the update, as torch coalesces), and now and then no row at all."""
    return sparse_row_grad(gen, shape, dtype, nnz=int(torch.randint(0, 6, (), generator=gen)))


def _dense(t):
    return t.to_dense() if t.is_sparse else t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_sgd_and_adagrad_take_sparse_gradients_as_torch(name, options, dtype, rng):
    seed = int(rng.integers(2 ** 31))
    runs = []
    for cls in (getattr(torch.optim, name), getattr(ft, name)):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]
        opt = cls(params, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(30):
                for p in params:
                    p.grad = _sparse_grad(gen, p.shape, dtype)
                opt.step()
        runs.append((params, opt, [w for w in caught if issubclass(w.category, RuntimeWarning)]))
    (theirs, topt, _), (ours, opt, warned) = runs
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **tol)
        assert set(opt.state[p]) == set(topt.state[q])
        for key, value in topt.state[q].items():
            torch.testing.assert_close(_dense(opt.state[p][key]), _dense(value), **tol)
    assert not all(torch.equal(p, torch.zeros_like(p)) for p in theirs)
    # one warning per param, naming it, saying why
    assert len(warned) == len(SHAPES) and all("made dense" in str(w.message) for w in warned)


@pytest.mark.parametrize("name", [s.torch_class for s in REGISTRY.values() if s.torch_class])
def test_sparse_gradients_are_refused_with_torchs_error_and_nothing_written(name):
    spec = next(s for s in REGISTRY.values() if s.torch_class == name)
    options = {"weight_decay": 0.1} if spec.torch_sparse is not None else {}
    errors = []
    for cls in (getattr(torch.optim, name), getattr(ft, name)):
        torch.manual_seed(3)
        params = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
        opt = cls(params, lr=0.01, **options)
        params[0].grad = torch.randn(5, 3)
        params[1].grad = torch.randn(4)
        opt.step()
        params[0].grad = torch.randn(5, 3)
        params[1].grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1), (4,))
        before = [p.detach().clone() for p in params]
        state = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]
        with pytest.raises(RuntimeError) as raised:
            opt.step()
        errors.append(str(raised.value))
        if cls.__module__.startswith("fastopt"):
            for p, b, s in zip(params, before, state):
                assert torch.equal(p.detach(), b)
                for k, v in s.items():
                    assert torch.equal(opt.state[p][k], v), k
    if spec.torch_sparse is not None:  # torch's SGD fails inside grad.add(param); Adagrad names the option
        assert errors[1] == "weight_decay option is not compatible with sparse gradients"
    else:
        assert errors[1] == errors[0]


def test_torch_sgds_sparse_momentum_buffer_loads_and_training_continues():
    torch.manual_seed(5)
    p = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    theirs = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(6)
    grads = [_sparse_grad(gen, (7, 3), torch.float64) for _ in range(6)]
    for g in grads[:3]:
        p.grad = g
        theirs.step()
    assert theirs.state[p]["momentum_buffer"].is_sparse
    ours = ft.SGD([q], lr=0.1, momentum=0.9)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        q.copy_(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in grads[3:]:
            p.grad, q.grad = g, g.clone()
            theirs.step()
            ours.step()
    torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
    assert not ours.state[q]["momentum_buffer"].is_sparse
    np.testing.assert_allclose(ours.state[q]["momentum_buffer"].numpy(),
                               theirs.state[p]["momentum_buffer"].to_dense().numpy(), rtol=1e-12)


@pytest.mark.parametrize("options,match", [({"eps": 0.0}, "eps > 0"), ({"lr": 0.1}, "complex")],
                         ids=["eps0", "complex"])
def test_adagrad_refuses_sparse_gradients_where_the_dense_update_would_differ(options, match):
    """eps = 0: an element without a gradient would take 0 / (sqrt(0) + 0) = NaN in the dense update (torch leaves
    it alone); complex params: torch's sparse branch uses complex arithmetic, its dense one the real views."""
    dtype = torch.complex128 if match == "complex" else torch.float64
    p = torch.randn(5, 2, dtype=dtype, requires_grad=True)
    opt = ft.Adagrad([p], **options)
    p.grad = torch.randn(5, 2, dtype=dtype)
    opt.step()
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2, dtype=dtype), (5, 2))
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_sgd_takes_sparse_gradients_of_complex_params_as_torch():
    torch.manual_seed(8)
    p = torch.randn(6, 2, dtype=torch.complex128, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, theirs = ft.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            g = torch.sparse_coo_tensor(torch.tensor([[0, 3, 3]]), torch.randn(3, 2, dtype=torch.complex128), (6, 2))
            p.grad, q.grad = g, g.clone()
            ours.step()
            theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_sparse_gradient_of_a_transposed_param_warns_once_and_matches_torch():
    torch.manual_seed(9)
    p = torch.randn(3, 6, dtype=torch.float64).t().requires_grad_()  # (6, 3), transposed strides
    q = p.detach().clone().requires_grad_()
    ours, theirs = ft.Adagrad([p], lr=0.1), torch.optim.Adagrad([q], lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            g = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.randn(2, 3, dtype=torch.float64), (6, 3))
            p.grad, q.grad = g, g.clone()
            ours.step()
            theirs.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "made dense" in messages[0]  # not also the layout copy's warning
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert p.stride() == (1, 6)
