"""Weight averaging as fused multi-tensor ops: the kernels behind EMA and SWA models.

    fastopt.ema_update(averages, params, decay)        # averages <- decay * averages + (1 - decay) * params
    fastopt.swa_update(averages, params, n_averaged)   # averages <- running mean, n_averaged models so far

torch.optim.swa_utils semantics (AveragedModel with its default averaging functions): EMA is torch's
`lerp(average, param, 1 - decay)` (get_ema_multi_avg_fn) with its two branches, each rounded twice (no FMA,
as everywhere in fastopt, so that every backend and the reference agree bit for bit; torch's CPU lerp fuses
the multiply-add, so its results can differ by one ulp), SWA is `average + (param - average) / (n + 1)`
(get_swa_avg_fn, AveragedModel's default on the CPU) and a copy when n_averaged is 0 (AveragedModel's first
update). `averages` is written, `params` only read; both are one array or equal-length lists (one launch),
on any backend, with the functional API's contract: every check (hyperparameter, kinds, dtypes, shapes,
layout, writability, memory overlap) runs before the first write. `ema_decay` is the warm-up schedule of
EMA models (TensorFlow's ExponentialMovingAverage with num_updates).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from fastopt.array_types import Arrays
from fastopt.backends.dispatch import backend_for, check_empty_call
from fastopt.specs import AVERAGE_COPY, AVERAGE_EMA, AVERAGE_SWA, WEIGHT_AVERAGE, as_bool, shown

__all__ = ["ema_update", "swa_update", "ema_decay", "lerp_", "lerp_all_"]

_NAMES = ("averages", "params")


def _decay(decay) -> float:
    if isinstance(decay, (bool, np.bool_)) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a real number, got {shown(decay)} ({type(decay).__name__})")
    try:
        value = float(decay)
    except (OverflowError, ValueError):
        raise ValueError(f"Invalid decay value {shown(decay)} provided (too large for a float)") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too; torch's words
        raise ValueError(f"Invalid decay value {value} provided. Please provide a value in [0,1] range.")
    return value


def _count(n_averaged) -> int:
    """A count of averaged models: an int, or a 0-d integer array/tensor (AveragedModel.n_averaged)."""
    given = n_averaged
    if hasattr(n_averaged, "shape") and getattr(n_averaged, "shape", None) == () and hasattr(n_averaged, "item"):
        n_averaged = n_averaged.item()  # a 0-d NumPy/CuPy array or torch tensor
    if isinstance(n_averaged, (bool, np.bool_)) or not isinstance(n_averaged, numbers.Integral):
        kind = type(given).__name__ + (f" of dtype {given.dtype}" if given is not n_averaged else "")
        raise TypeError(f"n_averaged must be an integer (the number of models averaged so far), got "
                        f"{shown(n_averaged)} ({kind})")
    n = int(n_averaged)
    if not 0 <= n < 2 ** 53:  # n + 1 exact in float64
        raise ValueError(f"Invalid n_averaged: {shown(n)} (a count in [0, 2**53))")
    return n


def _run(averages, params, hp, backend):
    arrays = (averages, params)
    be = backend_for(averages, backend, "averages")
    if be is None:  # an empty list: nothing to average, but the call must be well formed
        check_empty_call(arrays, _NAMES)
        return
    # hp["lr"]: the host backends read it for LAMB's trust ratio; unused by this kernel
    be.step(WEIGHT_AVERAGE, arrays, _NAMES, dict(hp, lr=0.0), 1, None)


def ema_update(averages: Arrays, params: Arrays, decay: float, *, backend: str | None = None) -> None:
    """averages <- decay * averages + (1 - decay) * params, in place (torch's lerp(averages, params,
    1 - decay), as torch.optim.swa_utils.get_ema_multi_avg_fn). decay in [0, 1]. One fused pass: reads
    averages and params, writes averages. TypeError / ValueError naming the argument, before any write.

    The averages start as a copy of the params: torch's AveragedModel copies them at its first
    update_parameters and averages from the second on; here the first call already averages, so copy first
    (`averages = [p.copy() for p in params]`, or `swa_update(averages, params, 0)`)."""
    weight = 1.0 - _decay(decay)
    _run(averages, params, {"mode": AVERAGE_EMA, "weight": weight, "divisor": 1.0}, backend)


def lerp_(arrays: Arrays, ends: Arrays, weight: float, *, backend: str | None = None) -> None:
    """arrays <- arrays + weight * (ends - arrays), in place, by torch.lerp's formula (ends - (ends - arrays) *
    (1 - weight) where |weight| >= 0.5) without FMA (torch's CPU lerp fuses it: one ulp apart at most), for any finite
    weight (schedule-free's eval()/train() switch lerps by 1 - 1/beta1 < 0): the kernel behind ema_update.
    TypeError / ValueError naming the argument, before any write."""
    _run(arrays, ends, {"mode": AVERAGE_EMA, "weight": _weight(weight), "divisor": 1.0}, backend)


def lerp_all_(calls, names=_NAMES, *, backend: str | None = None) -> None:
    """lerp_ of several calls, each (arrays, ends, weight, indices), as one operation: every weight and array
    checked, and no call's written memory shared with another's, before the first write (schedule-free's
    eval()/train(): one call per group and dtype). names: the two lists' names in messages, indices the arrays'
    numbers there (None: 0, 1, ...)."""
    prepared, by_backend = [], {}
    for arrays, ends, weight, indices in calls:
        hp = {"mode": AVERAGE_EMA, "weight": _weight(weight), "divisor": 1.0, "lr": 0.0}
        be = backend_for(arrays, backend, names[0])
        if be is None:
            check_empty_call((arrays, ends), names)
            continue
        call = be.prepare((arrays, ends), names, indices)
        prepared.append((be, call, hp))
        by_backend.setdefault(be, []).append(call)
    for be, calls_of_backend in by_backend.items():
        if len(calls_of_backend) > 1:
            be.check_disjoint(calls_of_backend)
    for be, call, hp in prepared:
        be.run(call, WEIGHT_AVERAGE, hp, 1, None)


def _weight(weight) -> float:
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, numbers.Real):
        raise TypeError(f"weight must be a real number, got {shown(weight)}")
    try:
        finite = math.isfinite(float(weight))
    except OverflowError:  # an int beyond float's range
        finite = False
    if not finite:
        raise ValueError(f"Invalid weight: {shown(weight)} (a finite number)")
    return float(weight)


def swa_update(averages: Arrays, params: Arrays, n_averaged: int, *, backend: str | None = None) -> None:
    """The running mean of the models seen: averages <- averages + (params - averages) / (n_averaged + 1),
    in place, and averages <- params when n_averaged is 0 (torch.optim.swa_utils.AveragedModel's default
    update). The caller counts: pass 0 for the first model, then 1, 2, ... TypeError / ValueError naming the
    argument, before any write."""
    n = _count(n_averaged)
    mode = AVERAGE_COPY if n == 0 else AVERAGE_SWA
    _run(averages, params, {"mode": mode, "weight": 0.0, "divisor": float(n + 1)}, backend)


def ema_decay(step: int, decay: float = 0.9999, *, warmup: bool = True) -> float:
    """The decay to pass to ema_update at update number `step` (1-based) of an EMA model with target
    `decay`: min(decay, (1 + step) / (10 + step)) with warm-up (TensorFlow's ExponentialMovingAverage with
    num_updates), so early averages follow the model instead of its random initialization; `decay` itself
    without."""
    value = _decay(decay)
    warmup = as_bool("warmup", warmup)
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer (the 1-based number of this update), got {shown(step)} "
                        f"({type(step).__name__})")
    if not 1 <= int(step) <= 2 ** 53:
        raise ValueError(f"Invalid step: {shown(step)} (the first update is 1; at most 2**53)")
    if not warmup:
        return value
    step = int(step)
    return min(value, (1.0 + step) / (10.0 + step))
