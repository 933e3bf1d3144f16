"""The plain-NumPy backend: fastopt.reference applied per array, after the same validation as the
compiled backend. Used when the Cython extension is missing, or on request (backend="numpy")."""
from __future__ import annotations

import functools
import sys

import numpy as np

from fastopt import reference
from fastopt.backends import host_clip
from fastopt.backends import validate
from fastopt.backends.validate import Checked, check_prepared_disjoint, host_scale
from fastopt.precision import INT8_REFUSED, is_16bit, rounded_as, step_16bit, step_rounded, store_rounded

NAME = "numpy"
AVAILABLE = True


def prepare(arrays, names, indices=None) -> Checked:
    """Check the arrays of one update (nothing is written); run() applies it."""
    return validate.prepare(arrays, names, indices=indices)


def prepare_fixed(calls):
    """Check an optimizer's params and states once (validate.prepare_fixed); bind_grads adds the grads."""
    return validate.prepare_fixed(calls)


def bind_grads(fixed, grads_per_call):
    """The prepared calls of one step (validate.bind_grads): the grads checked, the rest re-checked cheaply."""
    return validate.bind_grads(fixed, grads_per_call)


check_disjoint = check_prepared_disjoint  # across the prepared calls of one optimizer step


def step(spec, arrays, names, hp, step, grad_scale, stochastic=None, tensor_coefs=None):
    run(prepare(arrays, names), spec, hp, step, grad_scale, stochastic, tensor_coefs)


def check_rounding(prepared, stochastic) -> None:
    """ValueError unless stochastic rounding (a precision.StochasticRounding, or None) fits the call:
    16-bit params, no Kahan compensation (the compiled backend's _cpu_fast.check_rounding)."""
    if stochastic is None or not prepared.lists[0]:
        return
    dtype = prepared.lists[0][0].dtype
    if not is_16bit(dtype):
        raise ValueError(f"stochastic_rounding=True is for float16 or bfloat16 params; these are {dtype}")
    if len(prepared.lists) > validate.COMP and prepared.lists[validate.COMP] is not None:
        raise ValueError("kahan and stochastic_rounding are mutually exclusive: a Kahan compensation "
                         "(kahan_comp) and stochastic_rounding=True in one call")


def run(prepared, spec, hp, step, grad_scale, stochastic=None, tensor_coefs=None):
    """The reference update of every array of a prepared call: float32 math for 16-bit params or states
    (widened exactly, stored to nearest even), the new 16-bit params stored with the Kahan compensation
    (arrays[5]) or stochastically (`stochastic`, a precision.StochasticRounding) when asked.
    tensor_coefs: given per-tensor coefficients (validate.check_tensor_coefs) instead of the arrays' norms."""
    check_rounding(prepared, stochastic)
    check_int8(prepared, spec)
    coefs = validate.check_tensor_coefs(spec, tensor_coefs, len(prepared.lists[0]))
    if coefs is not None and spec.name not in _GIVEN_COEF:
        raise ValueError(f"tensor_coefs: the NumPy backend has no reference of {spec.function_name} with given "
                         f"coefficients")
    gs = host_scale(grad_scale)
    params, grads, *states = prepared.lists
    comps = states[validate.COMP - 2] if len(states) > validate.COMP - 2 else None
    states = states[:validate.COMP - 2] + states[validate.COMP - 1:]  # a fourth state (Adan) after the compensation
    kwargs = dict(hp, grad_scale=gs)
    if spec.uses_step:
        kwargs["step"] = step
    for i in range(len(params)):
        fn = reference.STEPS[spec.name] if coefs is None else functools.partial(_GIVEN_COEF[spec.name],
                                                                                coef=float(coefs[i]))
        arrays = (params[i], grads[i]) + tuple(s[i] if s is not None else None for s in states)
        while len(arrays) > 2 and arrays[-1] is None:  # the reference takes a configuration's states only
            arrays = arrays[:-1]
        quantized = [k for k in range(2, len(arrays)) if validate.is_quantized(arrays[k])]
        if quantized:  # 8-bit state: dequantized to float32, the float32 update, requantized
            wide = list(arrays)
            for k in quantized:
                wide[k] = arrays[k].dequantize()
            _update(fn, tuple(wide), spec, None if comps is None else comps[i], stochastic, kwargs)
            for k in quantized:
                arrays[k].store(wide[k])
            continue
        _update(fn, arrays, spec, None if comps is None else comps[i], stochastic, kwargs)


def _lars_given_coef(p, g, momentum_buffer=None, *, coef, weight_decay=0.0, grad_scale=None, maximize=False,
                     exclude_1d=True, trust_coefficient=1e-3, eps=0.0, **rest):
    """reference.lars_step with the trust ratio given (`coef`; negative: not adapted, as the kernels'
    !(coef < 0) test) instead of computed from this array's norms (a piece of a param takes the whole param's
    ratio): the gradient scaled, decayed and multiplied by the ratio as lars_step does (the same expressions,
    so the same bits), then lars_step itself on 1-D views for the momentum and the step (with exclude_1d a
    1-D array takes no ratio or decay again). exclude_1d, trust_coefficient and eps are in the ratio."""
    g = reference.scaled_grad(g, grad_scale, maximize)
    if not coef < 0.0:
        if weight_decay != 0:
            g = g + weight_decay * p
        g = g * coef
    buf = None if momentum_buffer is None else momentum_buffer.reshape(-1)
    reference.lars_step(p.reshape(-1), g.reshape(-1), buf, weight_decay=0.0, exclude_1d=True, **rest)


_GIVEN_COEF = {"lars": _lars_given_coef}  # spec.tensor_coefs families: their reference with the coefficient given


def _two_phase_call(prepared, spec, hp, step, grad_scale, entry):
    """(params, grads, states, comps, kwargs) of a prepared two-phase call (spec.two_phase: LAMB), after the
    checks run() makes; ValueError naming `entry` for another optimizer."""
    if not spec.two_phase:
        raise ValueError(f"{entry}: {spec.function_name} is not a two-phase update (only spec.two_phase: LAMB)")
    check_int8(prepared, spec)
    params, grads, *states = prepared.lists
    comps = states[validate.COMP - 2] if len(states) > validate.COMP - 2 else None
    kwargs = dict(hp, grad_scale=host_scale(grad_scale), step=step)
    return params, grads, states[:len(spec.states)], comps, kwargs


def run_phase1(prepared, spec, hp, step, grad_scale, stochastic=None):
    """A two-phase update's first pass (reference.lamb_phase1 per array: the moments written, float32 math
    for 16-bit arrays); returns float64 (narrays, 2): sum p^2 and sum u^2 of each array, which a caller
    holding pieces of tensors adds up per tensor before run_phase2. `stochastic` is checked only (it rounds
    the params, which phase 2 writes)."""
    check_rounding(prepared, stochastic)
    params, grads, states, _, kwargs = _two_phase_call(prepared, spec, hp, step, grad_scale, "run_phase1")
    fn = reference.TWO_PHASE[spec.name][0]
    out = np.zeros((len(params), 2), dtype=np.float64)
    for i in range(len(params)):
        arrays = (params[i], grads[i]) + tuple(s[i] for s in states)
        sums = []
        if any(is_16bit(a.dtype) for a in arrays):  # the moments stored to nearest even, the sums from float32
            step_16bit(lambda *a, **k: sums.append(fn(*a, **k)), arrays, range(2, len(arrays)), **kwargs)
        else:
            sums.append(fn(*arrays, **kwargs))
        out[i] = sums[0]
    return out


def run_phase2(prepared, spec, hp, step, grad_scale, scaled_lr, stochastic=None):
    """A two-phase update's second pass (reference.lamb_phase2 per array) with scaled_lr[i] (lr times the
    whole tensor's trust ratio) for array i: the new params rounded as run() rounds them. scaled_lr is
    checked (one finite number per array) before anything is written."""
    check_rounding(prepared, stochastic)
    params, _, states, comps, kwargs = _two_phase_call(prepared, spec, hp, step, grad_scale, "run_phase2")
    lrs = validate.check_scaled_lr(scaled_lr, len(params))
    fn = reference.TWO_PHASE[spec.name][1]
    for i in range(len(params)):
        arrays = (params[i],) + tuple(s[i] for s in states)
        comp = None if comps is None else comps[i]
        if any(is_16bit(a.dtype) for a in arrays):
            # float32 math on the states as stored (widened exactly); only the param is written
            step_rounded(fn, arrays, [0], comp=comp, stochastic=stochastic, scaled_lr=float(lrs[i]), **kwargs)
        else:
            fn(*arrays, scaled_lr=float(lrs[i]), **kwargs)


def check_int8(prepared, spec) -> None:
    """ValueError when a call with 8-bit state (QuantizedState entries) is for an optimizer whose state
    stays exact (precision.INT8_REFUSED: LAMB, ASGD, schedule-free), before anything is written."""
    if spec.name in INT8_REFUSED and any(
            lst is not None and any(validate.is_quantized(a) for a in lst) for lst in prepared.lists[2:]):
        raise ValueError(f"{spec.function_name}: 8-bit state (state_dtype='int8') is not supported: "
                         f"{INT8_REFUSED[spec.name]}")


def _update(fn, arrays, spec, comp, stochastic, kwargs):
    """The reference update of one param's arrays (float32 math for 16-bit params or states)."""
    if any(a is not None and is_16bit(a.dtype) for a in arrays):  # float32 math (fastopt.precision)
        extra = {}
        if spec.two_phase and len(arrays) > 2 and is_16bit(arrays[2].dtype):
            extra["stored"] = rounded_as(arrays[2].dtype)  # the second pass reads the stored states
        step_rounded(fn, arrays, [k for k in range(len(arrays)) if k != 1],  # grads are only read
                     comp=comp, stochastic=stochastic, **kwargs, **extra)
    else:
        fn(*arrays, **kwargs)


def prepare_grads(grads, name="grads", indices=None) -> Checked:
    """Check arrays for an in-place operation (nothing written); the functions below take the result."""
    if isinstance(grads, Checked):
        if len(grads.lists) != 1:  # a prepared update: its params come first, not the grads
            raise ValueError("grads: the batch was not prepared by prepare_grads")
        return grads
    return validate.prepare((grads,), (name,), read_only_slot=-1, indices=indices)


def _read(grads):
    """The arrays to read: a prepare_grads batch's, a prepared update's grads, or checked raw arrays."""
    if isinstance(grads, Checked):
        return grads.lists[1] if len(grads.lists) > 1 else grads.lists[0]
    return validate.validate_arrays((grads,), ("grads",), read_only_slot=0)[0]


def sumsq_per_tensor(grads):
    return np.array([reference.sumsq(g) for g in _read(grads)], dtype=np.float64)


def _scale(g, coef):
    if is_16bit(g.dtype):  # the kernels: float32 product, rounded to nearest even
        store_rounded(g, g.astype(np.float32) * np.float32(coef))
    else:
        reference.scale_(g, coef)


def scale_(grads, coef):
    for g in prepare_grads(grads).lists[0]:
        _scale(g, coef)


def scale_each_(grads, coefs):
    grads = prepare_grads(grads).lists[0]
    if len(coefs) != len(grads):
        raise ValueError(f"{len(coefs)} coefficients for {len(grads)} arrays")
    for g, coef in zip(grads, coefs):
        _scale(g, coef)


def clamp_(grads, clip_value):
    for g in prepare_grads(grads).lists[0]:
        if is_16bit(g.dtype):  # clamped in float32 against float32(clip_value), rounded to nearest even
            g32 = g.astype(np.float32)
            reference.clamp_(g32, float(np.float32(clip_value)))
            store_rounded(g, g32)
        else:
            reference.clamp_(g, clip_value)


# Norms and clipping from the sums of squares: written once for both host backends (host_clip.py)
global_norm, clip_coefficient = host_clip.global_norm, host_clip.clip_coefficient
clip_by_norm, clip_by_global_norm = host_clip.clip_functions(sys.modules[__name__])
