"""Edge values against torch.optim (the oracle): gradients with NaN and inf, hyperparameters at the ends of
their ranges. Each case steps torch.optim, fastopt.torch and the functional `*_step` on every host backend
from the same data, and the results must match torch's, NaN and inf positions included.

Found by an audit against torch 2.13: Rprop turned a NaN gradient (torch.sign(NaN) is 0) or an inf one on
the first step (inf times a zero prev) into NaN params; RMSprop with alpha = 1 and Adadelta with rho = 1
gave NaN where g * g overflows (torch multiplies (1 - alpha) * g first); Rprop refused step_sizes=(0, inf).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")
from torch_support import torch_classes  # noqa: E402

INF, NAN = math.inf, math.nan

# (optimizer, options, the gradients of successive steps, rtol for float64): every value of p0 below is
# stepped with each gradient row in turn
CASES = [
    ("Rprop", {}, [[NAN, INF, -INF, 1.0, 0.0, -0.0, 2.0]] * 1 + [[1.0, 1.0, 1.0, NAN, INF, 1.0, -2.0]] * 3),
    ("Rprop", {"lr": 0.3, "etas": (0.25, 2.0)}, [[INF, NAN, 1.0, -1.0, 3.0, -INF, 0.5],
                                                [1.0, -1.0, NAN, NAN, -3.0, INF, -0.5],
                                                [-1.0, 1.0, 2.0, 1.0, NAN, -1.0, 0.5]]),
    ("Rprop", {"step_sizes": (0.0, INF), "etas": (0.5, 4.0)}, [[1.0, -1.0, 2.0, NAN, 1.0, 1.0, 3.0]] * 12),
    ("RMSprop", {"alpha": 1.0}, [[1e200, -1e200, 1.0, 1e-200, 3e154, 0.0, 2.0]] * 3),
    ("RMSprop", {"alpha": 1.0, "centered": True, "momentum": 0.5}, [[1e200, -1e200, 1.0, 1e-200, 3e154, 0.0, 2.0]] * 3),
    ("Adadelta", {"rho": 1.0}, [[1e200, -1e200, 1.0, 1e-200, 3e154, 0.0, 2.0]] * 3),
    ("Adadelta", {"rho": 0.5}, [[1e200, -1e200, 1.0, 1e-200, 3e154, 0.0, 2.0]] * 3),
]
P0 = [0.5, -0.25, 1.0, 0.0, -0.0, 2.0, -3.0]


def _torch_run(name, options, grads, dtype):
    p = torch.tensor(P0, dtype=dtype, requires_grad=True)
    opt = getattr(torch.optim, name)([p], **options)
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return p.detach().numpy(), {k: v.numpy() for k, v in opt.state[p].items() if k != "step"}


def _fastopt_torch_run(name, options, grads, dtype):
    p = torch.tensor(P0, dtype=dtype, requires_grad=True)
    opt = getattr(ft, name)([p], **options)
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return p.detach().numpy(), {k: v.numpy() for k, v in opt.state[p].items() if k != "step"}


def _functional_run(name, options, grads, dtype, backend):
    """The functional step with torch's options mapped to the registry's names (fastopt.torch's mapping)."""
    spec = fastopt.specs.REGISTRY[name.lower()]
    hp = {}
    for key, value in options.items():
        pair = spec.torch_tuples.get(key) if spec.torch_tuples else None
        hp.update(zip(pair, value) if pair else [(key, value)])
    hp.setdefault("lr", {"Rprop": 0.01, "RMSprop": 0.01, "Adadelta": 1.0}[name])
    p = np.array(P0, dtype=dtype)
    state = fastopt.init_state(spec.name, p, **{k: v for k, v in hp.items() if k in ("centered", "momentum")})
    if "step_size" in state:
        state["step_size"][...] = hp["lr"]  # torch fills a new step_size with lr
    step = getattr(fastopt, f"{spec.name}_step")
    for t, g in enumerate(grads, 1):
        kwargs = dict(hp, backend=backend)
        if spec.uses_step:
            kwargs["step"] = t
        with np.errstate(all="ignore"):  # the reference's inf * 0 and float32's 1e200 -> inf, as torch's
            step(p, np.array(g, dtype=dtype), **state, **kwargs)
    return p, state


def _same(a, b, rtol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: NaN positions {a} vs torch {b}"
    assert np.array_equal(np.where(np.isinf(a), a, 0), np.where(np.isinf(b), b, 0)), f"{what}: inf {a} vs torch {b}"
    ok = np.isfinite(a)
    np.testing.assert_allclose(a[ok], b[ok], rtol=rtol, atol=0, err_msg=what)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_edge_values_match_torch(case, dtype):
    name, options, grads = CASES[case]
    tdtype = getattr(torch, dtype)
    rtol = 1e-12 if dtype == "float64" else 2e-6
    expect, expect_state = _torch_run(name, options, grads, tdtype)
    got, got_state = _fastopt_torch_run(name, options, grads, tdtype)
    _same(got, expect, rtol, f"fastopt.torch.{name} params")
    for key, value in expect_state.items():
        _same(got_state[key], value, rtol, f"fastopt.torch.{name} state {key}")
    for backend in ("numpy", "cython"):
        got, _ = _functional_run(name, options, grads, dtype, backend)
        _same(got, expect, rtol, f"fastopt.{name.lower()}_step ({backend}) params")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_value_only_the_params_dtype_can_refuse_is_judged_on_the_params(dtype):
    """Adagrad's initial_accumulator_value=1e300: torch fills it into float64 params' state and refuses it for
    float32 ones (its state is made in the constructor). fastopt.torch runs torch's constructor checks first, on
    a stand-in param: a float32 stand-in refused it for float64 params too."""
    p = torch.tensor(P0, dtype=dtype, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    if dtype == torch.float32:
        with pytest.raises(RuntimeError, match="overflow"):
            torch.optim.Adagrad([q], initial_accumulator_value=1e300)
        with pytest.raises(RuntimeError, match="overflow"):
            ft.Adagrad([p], initial_accumulator_value=1e300)
        return
    opts = [ft.Adagrad([p], initial_accumulator_value=1e300), torch.optim.Adagrad([q], initial_accumulator_value=1e300)]
    for t in range(3):
        p.grad = q.grad = torch.full_like(p, t + 1.0)
        for opt in opts:
            opt.step()
    _same(p.detach().numpy(), q.detach().numpy(), 1e-12, "params")
    _same(opts[0].state[p]["sum"].numpy(), opts[1].state[q]["sum"].numpy(), 1e-12, "sum")


def test_rprop_accepts_an_unbounded_step_size_and_still_refuses_nan():
    p = np.zeros(3)
    opt = fastopt.Rprop([p], step_size_min=0.0, step_size_max=INF, etaplus=4.0)
    moves = []
    for _ in range(8):  # the step size 0.01 * 4 ** 7 = 163.84 at the last step: past the default max of 50
        before = p.copy()
        opt.step([np.ones(3)])
        moves.append(float(before[0] - p[0]))
    assert moves[-1] == pytest.approx(0.01 * 4 ** 7, rel=1e-12)
    with pytest.raises(ValueError, match="Invalid step_size_max value: nan"):
        fastopt.Rprop([p], step_size_max=NAN)
    with pytest.raises(ValueError, match="Invalid step_size_min value: inf"):
        fastopt.Rprop([p], step_size_min=INF)
    with pytest.raises(ValueError, match="Invalid step_size_max value: -inf"):
        fastopt.Rprop([p], step_size_max=-INF)


SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 1e-40, -1e-310, math.inf, -math.inf, math.nan, 3e38]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["rprop", "lion", "yogi"])
def test_signs_of_special_values_bit_for_bit_as_the_reference(name, dtype):
    """The optimizers that take a sign, on every pair of special values (signed zeros, subnormals, inf, NaN) in
    the param, the gradient and each state: the compiled backend gives the reference's bits (its sign gave -0
    for -0, where np.sign and torch.sign give +0: Rprop moved a -0.0 param to +0.0)."""
    spec = fastopt.specs.REGISTRY[name]
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 32))
    n = len(SPECIAL) ** 2
    p = np.array([a for a in SPECIAL for _ in SPECIAL], dtype)
    g = np.array([b for _ in SPECIAL for b in SPECIAL], dtype)
    state = {k: v for k, v in fastopt.init_state(name, p).items()}
    for k, v in state.items():
        v[...] = rng.permutation(np.resize(np.array(SPECIAL, dtype), n))
        if k == "step_size":
            v[...] = np.abs(v)
    runs = {}
    for backend in ("numpy", "cython"):
        arrays = {"p": p.copy(), **{k: v.copy() for k, v in state.items()}}
        kwargs = {"lr": 0.01, "backend": backend}
        if spec.uses_step:
            kwargs["step"] = 3
        with np.errstate(all="ignore"):
            getattr(fastopt, f"{name}_step")(arrays["p"], g, **{k: arrays[k] for k in state}, **kwargs)
        runs[backend] = {k: a.tobytes() for k, a in arrays.items()}
    assert runs["cython"] == runs["numpy"]


@pytest.mark.parametrize("name", [s.torch_class for s in fastopt.specs.REGISTRY.values() if s.torch_class])
def test_lazily_negated_grads_step_as_in_torch(name):
    """A grad with torch's negative bit (z.conj().imag, torch._neg_view; its memory holds the other sign) made
    step() fail with a bare RuntimeError from Tensor.numpy(), where torch.optim steps; now its values are used,
    on the first step and on the cached path of later ones."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    p0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    results = []
    for cls in (getattr(torch.optim, name), getattr(ft, name)):
        p = p0.clone().requires_grad_()
        opt = cls([p], lr=0.01)
        for g in grads:
            p.grad = torch._neg_view(-g)
            assert p.grad.is_neg()
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name, kind", [("SGD", "other layout"), ("SGD", "negative bit"), ("SGD", "conjugate bit"),
                                        ("Adam", "other layout"), ("Adam", "negative bit")])  # (torch's Adam refuses
def test_a_grad_copied_for_the_kernels_is_copied_again_when_its_values_change(name, kind):  # a conjugated grad)
    """A grad the kernels cannot read in place (another layout than its param, a lazy negation or conjugation)
    is copied; the view of that copy was kept for the grad tensor, so the same grad tensor with new values
    (zero_grad(set_to_none=False) and backward, or accumulation) was applied with its first values again:
    0.7 off torch after 6 SGD steps."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    complex_ = kind == "conjugate bit"
    dtype = torch.complex128 if complex_ else torch.float64
    p0 = torch.randn(4, 3, 2, 2, generator=gen, dtype=dtype)
    if kind == "other layout":
        p0 = p0.contiguous(memory_format=torch.channels_last)
    results = []
    for cls in (getattr(torch.optim, name), getattr(ft, name)):
        p = p0.clone(memory_format=torch.preserve_format).requires_grad_()
        opt = cls([p], lr=0.1)
        base = torch.zeros(4, 3, 2, 2, dtype=dtype)  # contiguous: another layout than a channels_last param
        p.grad = {"other layout": base, "negative bit": torch._neg_view(base), "conjugate bit": base.conj()}[kind]
        for step in range(6):
            base.copy_(torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(step), dtype=dtype))
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in torch_classes() if n != "SparseAdam"])
def test_every_class_reads_a_lazily_negated_grad_by_its_values(name):
    """LBFGS, Adafactor and Muon (their own step paths) failed on a grad with torch's negative bit with a bare
    RuntimeError from Tensor.numpy(), after the registry classes were fixed: every class now steps as with
    the same values in a plain tensor, bit for bit."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    p0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    results = []
    for negated in (False, True):
        p = p0.clone().requires_grad_()
        opt = getattr(ft, name)([p], lr=0.01)
        for g in grads:
            p.grad = torch._neg_view(-g) if negated else g.clone()
            opt.step((lambda: torch.tensor(1.0)) if name == "LBFGS" else None)
        results.append(p.detach())
    assert torch.equal(results[0], results[1])
