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
from fastopt.torch import arguments


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
