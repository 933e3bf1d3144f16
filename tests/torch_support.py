"""Helpers of the fastopt.torch tests: registry hyperparameters as torch arguments, the oracle of each
class (torch.optim where torch has the optimizer, else fastopt's functional API on NumPy copies with
per-param step counts), random problems with params that sometimes have no grad."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

try:
    import ml_dtypes  # bfloat16 NumPy arrays (to_numpy_16); the tests that need it skip without it
except ImportError:  # pragma: no cover - a test dependency
    ml_dtypes = None

import fastopt


def torch_classes() -> list:
    """The names of fastopt.torch's optimizer classes: every torch.optim.Optimizer subclass it exports but
    the base TorchOptimizer (the registry's, the composites and LBFGS)."""
    import fastopt.torch as ft
    return sorted(name for name in ft.__all__ if isinstance(getattr(ft, name), type)
                  and issubclass(getattr(ft, name), torch.optim.Optimizer) and name != "TorchOptimizer")


def torch_kwargs(spec, hp: dict) -> dict:
    """Registry hyperparameters as keyword arguments of the torch/fastopt.torch constructor."""
    out = dict(hp)
    for key, names in spec.torch_groups.items():  # betas, Rprop's etas and step_sizes: tuples in torch
        if all(n in out for n in names):
            out[key] = tuple(out.pop(n) for n in names)
    return out


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: the results do not depend on it, and a shared 2-core machine oversubscribed
    by torch's pool runs these tests many times slower. Autouse in every test module that imports it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def default_dtype(dtype):
    """torch keeps its scalar state (step, NAdam's mu_product) in the default dtype: float64 runs compare
    against torch computing those in float64 too."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class FunctionalOracle:
    """The update of a registry optimizer through fastopt's functional API on NumPy copies (for the
    classes torch does not have), one call per param with its own step count, like torch."""

    def __init__(self, spec, groups):
        self.spec = spec
        self.groups = [(dict(hp), [p.detach().numpy().copy() for p in params]) for hp, params in groups]
        self.states = {}
        self.steps = {}

    def step(self, grads_per_group):
        fn = getattr(fastopt, self.spec.function_name)
        for gi, ((hp, params), grads) in enumerate(zip(self.groups, grads_per_group)):
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is None:
                    continue
                key = (gi, i)
                options = {k: hp[k] for k in self.spec.state_options}
                state = self.states.setdefault(key, fastopt.init_state(self.spec.name, p, **options))
                t = self.steps[key] = self.steps.get(key, 0) + 1
                kw = dict(hp)
                if self.spec.uses_step:
                    kw["step"] = t
                fn(p, g.numpy(), **state, **kw)

    def params(self):
        return [p for _, params in self.groups for p in params]


def random_groups(rng, dtype, spec, hp, lrs=(1.0, 0.5)):
    """Two param groups of odd shapes (sizes 1, odd, 2-D, 3-D), the second with a smaller lr."""
    shapes = [[(1,), (7,), (5, 3)], [(2, 3, 4), (33,)]]
    groups = []
    for shapes_of_group, scale in zip(shapes, lrs):
        params = [torch.tensor(rng.standard_normal(s), dtype=dtype, requires_grad=True) for s in shapes_of_group]
        ghp = dict(hp)
        ghp["lr"] = hp["lr"] * scale
        groups.append((ghp, params))
    return groups


def sparse_row_grad(gen, shape, dtype, nnz: int):
    """A sparse COO gradient of `nnz` random rows of a param of `shape`, repeats included (torch coalesces them)."""
    rows = torch.randint(0, shape[0], (nnz,), generator=gen)
    return torch.sparse_coo_tensor(rows[None], torch.randn((nnz, *shape[1:]), generator=gen, dtype=dtype), shape)


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def to_numpy_16(t) -> np.ndarray:
    """A detached copy of a CPU tensor as NumPy; bfloat16 as ml_dtypes.bfloat16 (same bits)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def moving_hp(spec) -> dict:
    """The registry defaults with lr set: a few steps move every param by many 16-bit ulps."""
    hp = dict(spec.defaults)
    hp["lr"] = 1e-2 if spec.name not in ("adadelta", "rprop") else hp["lr"]
    if spec.name == "sgd":
        hp["momentum"] = 0.9
    return hp


def carried_start(spec, hp) -> dict:
    """torch's state carried from step to step (spec.torch_carry: NAdam's mu_product, schedule-free's lr_max
    and weight_sum) before the first step, as fastopt.torch keeps it: in float32 for torch's optimizers (torch's
    scalar dtype), in float64 for the others (schedule-free: Python floats in the schedulefree package)."""
    dtype = np.float32 if spec.torch_class else np.float64
    return {n: dtype(f(hp, 0)) for n, f in spec.torch_extra_state.items() if n in spec.torch_carry}


def functional_step(spec, p, g, state: dict, hp: dict, count, carried: dict, options: dict, key_step):
    """One step of fastopt's functional API on NumPy copies, as fastopt.torch takes it (the oracle of the
    precision-mode tests): `state` maps the spec's states (and "kahan_comp") to arrays; `options` holds
    stochastic_rounding / seed. apply_update recomputes carried scalars from the step count (NAdam's
    mu_product, schedule-free's weight_sum in closed form); fastopt.torch, like torch and the schedulefree
    package, advances them step by step (float32 for NAdam, float64 for schedule-free), which can differ in the
    last bit. So with `carried`
    non-empty the update runs on the carried values, which are then advanced as fastopt.torch advances them."""
    from fastopt.backends.dispatch import backend_for
    from fastopt.functional import apply_update, with_kahan
    from fastopt.precision import StochasticRounding
    st = dict(state)
    comp = st.pop("kahan_comp", None)
    stochastic = options.get("stochastic_rounding", False)
    if not carried:
        apply_update(spec, p, g, tuple(st.get(s) for s in spec.states), dict(hp), count, kahan_comp=comp,
                     stochastic_rounding=stochastic, seed=options.get("seed", 0), key_step=key_step)
        return
    hp2, step = spec.validate(dict(hp), count)
    hp2.update(carried)
    tail, names = spec.plan_call(hp2, st.get)
    if comp is not None:
        tail, names = with_kahan(tail, names, comp)
    extra = {"stochastic": StochasticRounding(options["seed"], key_step)} if stochastic else {}
    backend_for(p).step(spec, (p, g, *tail), names, hp2, step, None, **extra)
    for name in carried:
        carried[name] = np.float32(spec.torch_carry[name](hp2, step, carried[name]))


def step_alike(first, second, steps: int, move=lambda g: g.clone()) -> None:
    """`steps` steps of two optimizers over params of the same shapes, on the same random grads: each param of
    `first` gets torch.randn, its twin in `second` move(that grad) (a copy, or .cuda())."""
    for _ in range(steps):
        for p, q in zip((p for g in first.param_groups for p in g["params"]),
                        (q for g in second.param_groups for q in g["params"])):
            p.grad = torch.randn(p.shape)
            q.grad = move(p.grad)
        first.step()
        second.step()
