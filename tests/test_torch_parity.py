"""fastopt against torch.optim itself (float64, 30 steps, every option torch has).

torch writes some updates differently (exp_avg.lerp_ for the first moment, addcdiv, NAdam's running
product of mu in a scalar tensor), which rounds differently in the last bits: we allow 1e-10 relative
(float64 has 1e-16; 30 steps of ~10 operations stay far below)."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.specs import REGISTRY

from conftest import option_combinations

torch = pytest.importorskip("torch")

TORCH_NAMES = {"beta1": None, "beta2": None}  # folded into betas=(beta1, beta2)


def _torch_kwargs(spec, hp):
    kw = {k: v for k, v in hp.items() if k not in TORCH_NAMES}
    if "beta1" in hp:
        kw["betas"] = (hp["beta1"], hp["beta2"])
    if spec.name in ("adam", "adamw") or spec.torch_class in ("NAdam", "RAdam", "SGD", "Adagrad", "RMSprop"):
        kw["foreach"] = False
    return kw


def _cases():
    for spec in REGISTRY.values():
        if spec.torch_class is None:
            continue
        for hp in option_combinations(spec):
            yield pytest.param(spec, hp, id=f"{spec.name}-" + ",".join(f"{k}={v}" for k, v in hp.items()
                                                                       if spec.defaults.get(k) != v))


@pytest.mark.parametrize("spec,hp", list(_cases()))
def test_matches_torch_optim(spec, hp, rng):
    torch.set_default_dtype(torch.float64)  # torch keeps NAdam's mu product in the default dtype
    try:
        shapes = [(17,), (4, 5)]
        params = [rng.standard_normal(s) for s in shapes]
        tparams = [torch.nn.Parameter(torch.tensor(p)) for p in params]
        opt = getattr(torch.optim, spec.torch_class)(tparams, **_torch_kwargs(spec, hp))
        state = fastopt.init_state(spec.name, params, **{k: v for k, v in hp.items() if k != "lr"})
        fn = getattr(fastopt, spec.function_name)
        for t in range(1, 31):
            grads = [rng.standard_normal(s) for s in shapes]
            for tp, g in zip(tparams, grads):
                tp.grad = torch.tensor(g)
            opt.step()
            fn(params, grads, **state, **hp, **({"step": t} if spec.uses_step else {}))
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)
        # state arrays carry torch's names and values
        for name, arrays in state.items():
            for a, tp in zip(arrays, tparams):
                np.testing.assert_allclose(a, opt.state[tp][spec.torch_state_names.get(name, name)].numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    finally:
        torch.set_default_dtype(torch.float32)
