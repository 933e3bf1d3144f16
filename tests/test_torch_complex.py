"""Complex params in fastopt.torch, as torch.optim takes them: each element a pair of independent reals
(torch.view_as_real of param, grad and state), the state complex like the param.

Every elementwise registry optimizer over every option combination: the complex run equals, bit for bit, the
same class on the params' real views, and, where torch has the optimizer, torch.optim on the complex params
(complex64 and complex128, several groups, some params without grads, sizes 0 and 1 among them)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt.specs import REGISTRY  # noqa: E402

from conftest import combo_id, option_combinations  # noqa: E402
from torch_support import default_dtype, one_torch_thread, torch_kwargs  # noqa: E402,F401

STEPS = 12
ELEMENTWISE = [s for s in REGISTRY.values() if not s.norms_per_tensor]
REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def _cases():
    for spec in ELEMENTWISE:
        for hp in option_combinations(spec):
            yield pytest.param(spec, hp, id=f"{spec.name}-{combo_id(hp, spec)}")


def _shapes(rng):
    """Two groups of odd shapes; size 0 and 1 among them."""
    return [[(int(rng.integers(1, 9)), int(rng.integers(1, 7))), (1,), (0, 3)],
            [(int(rng.integers(2, 40)),), (3, 1, 2)]]


def _complex(rng, shape, dtype):
    parts = [torch.tensor(rng.standard_normal(shape), dtype=REAL_OF[dtype]) for _ in range(2)]
    return torch.complex(*parts)


def _run(cls, kwargs_per_group, params_per_group, grads_per_step):
    """Step `cls` over the params (clones), the grads of each step set (None: no grad that step)."""
    ours = [[p.clone().requires_grad_() for p in ps] for ps in params_per_group]
    opt = cls([{"params": ps, **kw} for ps, kw in zip(ours, kwargs_per_group)])
    for grads in grads_per_step:
        for ps, gs in zip(ours, grads):
            for p, g in zip(ps, gs):
                p.grad = None if g is None else g.clone()
        opt.step()
    return opt, [p.detach() for ps in ours for p in ps]


def _problem(rng, spec, hp, dtype):
    shapes = _shapes(rng)
    params = [[_complex(rng, s, dtype) for s in group] for group in shapes]
    steps = []
    for t in range(STEPS):
        # param (1,) has no grad on even steps: torch skips it, and its own step count falls behind
        steps.append([[None if (s == (1,) and t % 2 == 0) else _complex(rng, s, dtype) for s in group]
                      for group in shapes])
    kwargs = [torch_kwargs(spec, dict(hp, lr=hp["lr"] * scale)) for scale in (1.0, 0.5)]
    return params, steps, kwargs


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["complex64", "complex128"])
@pytest.mark.parametrize("spec,hp", list(_cases()))
def test_complex_params_are_pairs_of_reals(spec, hp, dtype, rng):
    hp = dict(hp, lr=0.01 if spec.name != "sgd" else 0.05)
    params, steps, kwargs = _problem(rng, spec, hp, dtype)
    cls = getattr(ft, spec.class_name)
    with default_dtype(REAL_OF[dtype]):
        opt, got = _run(cls, kwargs, params, steps)
        real = [[torch.view_as_real(p).clone() for p in ps] for ps in params]
        real_steps = [[[None if g is None else torch.view_as_real(g).clone() for g in gs] for gs in grads]
                      for grads in steps]
        _, want = _run(cls, kwargs, real, real_steps)
        for a, b in zip(got, want):
            assert a.dtype == dtype
            assert torch.equal(torch.view_as_real(a), b)
        for state in opt.state.values():  # torch's layout: the moments complex like their param
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert value.dtype == dtype, name
        if spec.torch_class is None:
            return
        _, theirs = _run(getattr(torch.optim, spec.torch_class), kwargs, params, steps)
    rtol, atol = (1e-12, 1e-12) if dtype == torch.complex128 else (2e-5, 2e-6)
    for a, b in zip(got, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "Rprop", "SGD"])
def test_complex_state_dict_interchange_with_torch_mid_training(name, rng):
    """A torch.optim state dict of complex params loads into the fastopt class (and back), and training goes
    on as torch's does."""
    dtype = torch.complex128
    spec = next(s for s in REGISTRY.values() if s.torch_class == name)
    hp = dict(spec.defaults, lr=0.01)
    if name == "SGD":
        hp["momentum"] = 0.9
    if name == "Adagrad":
        hp["initial_accumulator_value"] = 0.3
    kw = torch_kwargs(spec, hp)
    p0 = [_complex(rng, (5, 3), dtype), _complex(rng, (7,), dtype)]
    grads = [[_complex(rng, tuple(p.shape), dtype) for p in p0] for _ in range(8)]
    with default_dtype(torch.float64):
        theirs = [p.clone().requires_grad_() for p in p0]
        ref = getattr(torch.optim, name)(theirs, **kw)
        ours = [p.clone().requires_grad_() for p in p0]
        for t, gs in enumerate(grads):
            if t == 4:  # torch -> fastopt in the middle of training
                opt = getattr(ft, name)(ours, **kw)
                with torch.no_grad():
                    for a, b in zip(ours, theirs):
                        a.copy_(b)
                opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from a file: no shared tensors
            for p, g in zip(theirs, gs):
                p.grad = g.clone()
            ref.step()
            if t >= 4:
                for p, g in zip(ours, gs):
                    p.grad = g.clone()
                opt.step()
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-12, atol=1e-12)
        back = getattr(torch.optim, name)([p.detach().clone().requires_grad_() for p in ours], **kw)
        back.load_state_dict(copy.deepcopy(opt.state_dict()))
        for i, st in ref.state_dict()["state"].items():  # fastopt -> torch: the same state, to rounding
            for key, value in st.items():
                mine = torch.as_tensor(back.state_dict()["state"][i][key])
                assert mine.dtype == torch.as_tensor(value).dtype, key
                np.testing.assert_allclose(mine.numpy(), torch.as_tensor(value).numpy(), rtol=1e-12, atol=1e-14,
                                           err_msg=key)


def test_conjugated_complex_grad_is_read_by_value(rng):
    """A lazily conjugated grad (x.conj(), the conj bit set) is read by its values (torch.optim raises for one:
    view_as_real refuses it; compared here with torch given the resolved grad)."""
    p0 = _complex(rng, (6,), torch.complex64)
    g = _complex(rng, (6,), torch.complex64)
    ours, theirs = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    opt, ref = ft.Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for _ in range(3):
        ours.grad = g.conj()
        assert ours.grad.is_conj()
        theirs.grad = g.conj().resolve_conj()
        opt.step()
        ref.step()
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if s.norms_per_tensor], ids=lambda s: s.name)
def test_norm_based_optimizers_refuse_complex_params(spec):
    p = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="complex"):
        getattr(ft, spec.class_name)([p], lr=0.1)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
def test_complex_params_keep_their_own_state_dtype(state_dtype):
    p = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        ft.Adam([p], lr=0.1, state_dtype=state_dtype)


def test_complex_grad_of_another_dtype_is_refused_and_nothing_changes(rng):
    """A real grad shaped like the param's real view (..., 2) is refused (torch.optim's view_as_real refuses it
    too), not read as the pairs of reals."""
    p = _complex(rng, (5,), torch.complex64).requires_grad_()
    opt = ft.Adam([p], lr=0.1)
    for _ in range(4):  # past the first steps: the steady path (fastopt/torch/steady.py) checks the next grad
        p.grad = _complex(rng, (5,), torch.complex64)
        opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = None
    p.grad = _complex(rng, (5,), torch.complex64)
    p.grad.data = torch.view_as_real(p.grad.detach()).clone()  # a float32 (5, 2) grad
    with pytest.raises((TypeError, ValueError), match=r"grad"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    for k, v in opt.state[p].items():
        assert torch.equal(v, before[1][k]), k


def test_loaded_complex_state_of_another_precision_is_converted_and_real_state_refused(rng):
    p0 = _complex(rng, (5, 2), torch.complex128)
    theirs = p0.clone().requires_grad_()
    ref = torch.optim.Adam([theirs], lr=0.1)
    for _ in range(3):
        theirs.grad = _complex(rng, (5, 2), torch.complex128)
        ref.step()
    p = theirs.detach().to(torch.complex64).requires_grad_()
    opt = ft.Adam([p], lr=0.1)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # complex128 state: cast to complex64 as torch casts
    g = _complex(rng, (5, 2), torch.complex128)
    p.grad, theirs.grad = g.to(torch.complex64), g
    opt.step()
    ref.step()
    assert opt.state[p]["exp_avg"].dtype == torch.complex64
    np.testing.assert_allclose(p.detach().numpy(), theirs.detach().numpy(), rtol=1e-5, atol=1e-6)

    sd = copy.deepcopy(ref.state_dict())
    sd["state"][0]["exp_avg"] = torch.zeros(5, 2, dtype=torch.float64)
    q = p0.clone().requires_grad_()
    other = ft.Adam([q], lr=0.1)
    other.load_state_dict(sd)
    before = q.detach().clone()
    q.grad = _complex(rng, (5, 2), torch.complex128)
    with pytest.raises(TypeError, match="exp_avg"):
        other.step()
    assert torch.equal(q.detach(), before)
    assert torch.equal(other.state[q]["exp_avg"], torch.zeros(5, 2, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_complex_params_in_any_dense_layout(layout, rng):
    """A transposed complex weight and a channels_last complex conv weight: viewed in place (flat span, then
    view_as_real), the state in the param's layout, torch.optim's results."""
    if layout == "transposed":
        base, dtype = _complex(rng, (6, 4), torch.complex64).t(), torch.complex64
    else:
        base = _complex(rng, (2, 3, 4, 5), torch.complex128).to(memory_format=torch.channels_last)
        dtype = torch.complex128
    assert not base.is_contiguous()
    ours = base.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    theirs = base.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    opt = ft.Adam([ours], lr=0.1, weight_decay=0.1)
    ref = torch.optim.Adam([theirs], lr=0.1, weight_decay=0.1)
    for _ in range(6):
        g = _complex(rng, tuple(base.shape), dtype)
        ours.grad = torch.empty_like(ours).copy_(g)
        theirs.grad = torch.empty_like(theirs).copy_(g)
        opt.step()
        ref.step()
    assert ours.stride() == base.stride() and opt.state[ours]["exp_avg"].stride() == base.stride()
    rtol, atol = (1e-12, 1e-12) if dtype == torch.complex128 else (2e-5, 2e-6)
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=rtol, atol=atol)
