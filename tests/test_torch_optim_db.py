"""PyTorch's own optimizer test database run against fastopt.torch.

torch.testing._internal.common_optimizers.optim_db describes, for every torch.optim optimizer, the constructor
configurations torch's tests run (optim_inputs_func; on the CPU each also with fused=True where torch has a
fused CPU kernel: Adam, AdamW, Adagrad, SGD), the bad arguments with the exception each must raise
(optim_error_inputs_func) and the lr schedulers run with it (scheduler_inputs). Here every configuration of
every optimizer in it (all 15 of torch 2.13) runs on the fastopt.torch class of the same name and on torch's,
on the same params and gradients, and must agree:

- params, and every state tensor and number of the state dicts, within 1e-9 relative in float64 (1e-5 in
  float32; torch's own CPU sqrt is not correctly rounded, so last bits differ); param groups identical, the
  types of their numbers included. Two
  groups (the second takes the constructor's defaults), 50 steps (LBFGS: 5 closure-driven steps), params of
  sizes 0 (not for Adafactor: torch's divides by its numel) and 1 and odd shapes, gradients left None at
  random after the first step (that param is skipped, as in torch).
  Muon is the documented exception: its Newton-Schulz iteration runs in bfloat16 (torch's choice), whose
  sums differ between torch's bfloat16 matmul and fastopt's float32 BLAS sums at rounding ties (fastopt/muon.py),
  so params agree to within 2^-9 of the path's length (sum of adjusted lr over the steps); its momentum
  buffers within 1e-9. LBFGS: its two-loop recursion's scratch ("al") is not compared, its history (ro, the
  vectors) within 1e-6 (ill-conditioned near convergence) while its params agree within 1e-9; in float32 the params
  only (within 1e-3: rounding decides its stopping tests, an iteration more or less).
- every error input: the same exception type, with a message matching torch's pattern (warnings: the same
  warning).
- every scheduler combination: the same params and the same lr in every group after each step.

The database needs expecttest (torch's test-suite dependency; `make test` installs it with torch).
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal imports it
common = pytest.importorskip("torch.testing._internal.common_optimizers")

import fastopt.torch as ft  # noqa: E402

from torch_support import one_torch_thread, sparse_row_grad  # noqa: E402,F401  (autouse)

OPTIM_DB = common.optim_db
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
STEPS, LBFGS_STEPS = 50, 5
MUON_PATH_FRACTION = 2.0 ** -9
# LBFGS's state near convergence (d, prev_flat_grad, ro: from differences of close gradients) is ill-conditioned:
# over 80 seeds of every float64 config its worst difference from torch was 5.3e-7 of the vector's largest
# element (strong_wolfe), and one seed (2335049957) reached 1.0e-5, while the params agreed to 1e-12. A wrong
# formula is off by O(1): 1e-3 of the scale keeps that visible without failing on the conditioning's tail.
LBFGS_HISTORY_TOL = dict(rtol=1e-3, atol=1e-12)


def _name(info) -> str:
    return info.optim_cls.__name__


def _inputs(info, dtype):
    """The configurations torch's own tests run on the CPU: optim_inputs_func's, each also with fused=True where
    torch has a fused CPU kernel (fastopt.torch takes and ignores the flag: its kernels are its own, so it must
    match torch's fused results too); not differentiable=True, which fastopt.torch refuses (README)."""
    with_flags = getattr(common, "_get_optim_inputs_including_global_cliquey_kwargs", None)
    if with_flags is None:  # an older or newer torch without torch's helper: the plain configurations
        return info.optim_inputs_func(device="cpu", dtype=dtype)
    return with_flags("cpu", dtype, info, skip=("differentiable",))


def _configs():
    for info in OPTIM_DB:
        for dtype in DTYPES:
            for config in _inputs(info, dtype):
                yield pytest.param(info, config, dtype,
                                   id=f"{_name(info)}-{config.desc}-{str(dtype).replace('torch.', '')}")


def _error_inputs():
    for info in OPTIM_DB:
        for k, error in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float64)):
            yield pytest.param(info, error, id=f"{_name(info)}-{k}-{error.optimizer_error_input.desc}")


def _scheduler_inputs():
    for info in OPTIM_DB:
        for k, makers in enumerate(info.scheduler_inputs):
            yield pytest.param(info, makers, id=f"{_name(info)}-{k}")


def test_the_database_has_every_torch_optimizer_and_fastopt_has_each():
    names = {_name(info) for info in OPTIM_DB}
    assert len(names) >= 15
    assert {n for n in names if not hasattr(ft, n)} == set()


def _shapes(name: str) -> tuple[list, list]:
    """Shapes of the two groups' params: 2-D for Muon (torch's rule), rows of embeddings for SparseAdam."""
    if name == "Muon":
        return [(5, 3), (4, 7), (1, 9)], [(6, 6), (3, 1)]
    if name == "SparseAdam":
        return [(9, 3), (1, 5), (6,)], [(7, 4)]
    if name == "Adafactor":  # torch's divides by a size-0 param's numel()
        return [(1,), (5, 3), (2, 3, 4)], [(7,), (4, 1), (3, 5)]
    return [(0,), (1,), (5, 3), (2, 3, 4)], [(7,), (4, 1), (3, 5)]


def _kwargs(kwargs: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _train(cls, name: str, kwargs: dict, dtype, seed: int, steps: int, schedulers=()):
    """Train with cls on a problem made from seed alone (so both classes see the same params, gradients and
    metrics); returns (params, optimizer, the groups' lrs after every step)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = _shapes(name)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in first + second]
    opt = cls([{"params": params[:len(first)]}, {"params": params[len(first):]}] if name != "LBFGS"
              else params, **_kwargs(kwargs))  # torch's LBFGS takes one group
    scheds = [make(opt) for make in schedulers]
    lrs = []
    targets = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    # a closure to maximize (torch 2.15's LBFGS maximize=True) is the negated one: bounded above, it converges
    sign = -1.0 if kwargs.get("maximize") is True else 1.0

    def closure():
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() + 0.1 * (p ** 4).sum() + torch.sin(p).sum() for p, t in zip(params, targets))
        loss = sign * loss
        loss.backward()
        return loss

    for step in range(steps):
        if name == "LBFGS":
            opt.step(closure)
        else:
            for p in params:
                # every param has a grad at the first step: torch's fused SGD fails on a momentum buffer that
                # starts later than the others' ("expected Tensor as element 1 ... but got NoneType")
                skipped = torch.rand((), generator=gen).item() < 0.2 and step > 0
                if name == "SparseAdam":
                    grad = sparse_row_grad(gen, p.shape, dtype, nnz=4)
                else:
                    grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                p.grad = None if skipped else grad
            opt.step()
        metric = torch.rand((), generator=gen).item()
        for sched in scheds:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(metric)
            else:
                sched.step()
        lrs.append([float(g["lr"]) for g in opt.param_groups])
    return params, opt, lrs


def _initial(name: str, dtype, seed: int) -> list:
    """The params _train starts from."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in sum(_shapes(name), [])]


def _same(ours, theirs, where: str, tol: dict, exact_types: bool = False, scale: float = 0.0) -> None:
    """A state dict value (tensors, numbers, lists, dicts) equal to torch's within tol. exact_types: numbers of
    torch's type too (param groups: torch writes weight_decay=0 as an int). scale: tensors' atol is at least
    rtol * scale (LBFGS's history: differences of gradients, whose late, small elements cancel)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), where
        for key in theirs:
            _same(ours[key], theirs[key], f"{where}[{key!r}]", tol, exact_types, scale)
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), where
        assert not exact_types or type(ours) is type(theirs), where
        for k, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{where}[{k}]", tol, exact_types, scale)
    elif isinstance(theirs, torch.Tensor) and theirs.dim() > 0:
        assert isinstance(ours, torch.Tensor), where
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
        atol = max(tol["atol"], tol["rtol"] * scale)
        torch.testing.assert_close(ours, theirs, rtol=tol["rtol"], atol=atol, msg=lambda m: f"{where}: {m}")
    elif isinstance(theirs, (torch.Tensor, float, int)) and not isinstance(theirs, bool):
        assert not exact_types or type(ours) is type(theirs), f"{where}: {ours!r} ({type(ours).__name__}) is " \
                                                              f"not {theirs!r} ({type(theirs).__name__})"
        if isinstance(theirs, torch.Tensor):  # a 0-d tensor (a step count): torch's dtype too
            assert not isinstance(ours, torch.Tensor) or ours.dtype == theirs.dtype, where
        a, b = float(ours), float(theirs)
        assert a == b or abs(a - b) <= tol["rtol"] * abs(b) + tol["atol"], f"{where}: {a} != {b}"
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


@pytest.mark.parametrize("info,config,dtype", list(_configs()))
def test_every_configuration_matches_torch(info, config, dtype, rng):
    name = _name(info)
    seed = int(rng.integers(2 ** 31))
    steps = LBFGS_STEPS if name == "LBFGS" else STEPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's sparse invariant-check notice
        theirs, topt, _ = _train(info.optim_cls, name, config.kwargs, dtype, seed, steps)
        ours, opt, _ = _train(getattr(ft, name), name, config.kwargs, dtype, seed, steps)
    tol = TOL[dtype]
    ours_sd, theirs_sd = opt.state_dict(), topt.state_dict()
    _same(ours_sd["param_groups"], theirs_sd["param_groups"], "param_groups", tol, exact_types=True)
    if name == "LBFGS":
        if dtype == torch.float32:
            # float32 decides the stopping tests (tolerance_change, tolerance_grad) at rounding level: an
            # iteration more or less, so no state comparison; the params still agree to float32's precision
            for p, q in zip(ours, theirs):
                torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-3)
            return
        for saved in (ours_sd, theirs_sd):
            # "al": scratch of the two-loop recursion, each entry written before it is read at every iteration;
            # its values are dot products that cancel (1e-8 relative apart while params agree to 1e-13)
            for entry in saved["state"].values():
                entry["al"] = len(entry["al"]) if entry.get("al") is not None else None
        for pid, entry in theirs_sd["state"].items():
            for key, value in entry.items():
                vectors = value if isinstance(value, list) else [value]
                scale = max((v.abs().max().item() for v in vectors if isinstance(v, torch.Tensor) and v.numel()),
                            default=0.0)
                # the history near convergence is ill-conditioned (ro = 1 / y.s, y a difference of close
                # gradients): see LBFGS_HISTORY_TOL
                _same(ours_sd["state"][pid][key], value, f"state[{pid}][{key!r}]", LBFGS_HISTORY_TOL, scale=scale)
        for k, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(p, q, **tol, msg=lambda m: f"params[{k}]: {m}")
        return
    if name == "Muon":
        for p, q in zip(ours, theirs):
            lr = float(config.kwargs.get("lr", 1e-3))
            path = steps * lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            assert (p - q).abs().max().item() <= MUON_PATH_FRACTION * path
        _same(ours_sd["state"], theirs_sd["state"], "state", tol)
        return
    _same(ours_sd["state"], theirs_sd["state"], "state", tol)
    for k, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"params[{k}]: {m}")
    assert any(not torch.equal(q, q0) for q, q0 in zip(theirs, _initial(name, dtype, seed)))  # they moved


@pytest.mark.parametrize("info,error", list(_error_inputs()))
def test_every_error_input_raises_torchs_error(info, error):
    given = error.optimizer_error_input
    params = given.params if given.params is not None else [torch.randn(3, 2, dtype=torch.float64,
                                                                        requires_grad=True)]
    cls = getattr(ft, _name(info))
    if error.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        def call():
            return cls(params, **given.kwargs)
    else:  # constructed without a complaint; the step raises
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = cls(params, **given.kwargs)
        call = opt.step
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            call()
        return
    with pytest.raises(error.error_type) as raised:
        call()
    assert re.search(error.error_regex, str(raised.value)), str(raised.value)


@pytest.mark.parametrize("info,makers", list(_scheduler_inputs()))
def test_every_scheduler_combination_matches_torch(info, makers, rng):
    name = _name(info)
    seed = int(rng.integers(2 ** 31))
    steps = LBFGS_STEPS if name == "LBFGS" else 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, _, their_lrs = _train(info.optim_cls, name, {}, torch.float64, seed, steps, makers)
        ours, _, our_lrs = _train(getattr(ft, name), name, {}, torch.float64, seed, steps, makers)
    np.testing.assert_allclose(our_lrs, their_lrs, rtol=1e-15, atol=0)
    assert len({tuple(lrs) for lrs in their_lrs}) > 1 or name == "LBFGS"  # the schedule did change the lr
    for p, q in zip(ours, theirs):
        if name == "Muon":
            assert (p - q).abs().max().item() <= MUON_PATH_FRACTION * steps * 1e-3 * math.sqrt(
                max(1.0, p.shape[0] / p.shape[1]))
        else:
            torch.testing.assert_close(p, q, **TOL[torch.float64])
