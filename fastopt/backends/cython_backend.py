"""The compiled CPU backend: a thin launcher over kernels/cpu/_cpu_fast.pyx, which validates the arrays
and runs one parallel region over all chunks of all arrays."""
from __future__ import annotations

import sys

from fastopt.backends import host_clip
from fastopt.backends.validate import host_scale

NAME = "cython"

# Why the extension did not load (not built, built for another Python, a missing symbol...): dispatch falls
# back to the numpy backend and its one warning quotes this text.
IMPORT_ERROR: str | None = None
try:
    from fastopt.kernels.cpu import _cpu_fast
except ImportError as e:
    _cpu_fast = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
AVAILABLE = _cpu_fast is not None


def prepare(arrays, names, indices=None):
    """Check the arrays of one update (nothing is written); run() applies it."""
    return _cpu_fast.prepare(arrays, names, indices)


def prepare_fixed(calls):
    """Check an optimizer's params and states once (compiled twin of validate.prepare_fixed)."""
    return _cpu_fast.prepare_fixed(calls)


def bind_grads(fixed, grads_per_call):
    """The prepared calls of one step (compiled twin of validate.bind_grads)."""
    return _cpu_fast.bind_grads(fixed, grads_per_call)


def check_disjoint(prepared):
    """ValueError when the prepared calls of one optimizer step share memory that one of them writes."""
    _cpu_fast.check_disjoint(list(prepared))


def check_rounding(prepared, stochastic) -> None:
    """ValueError unless stochastic rounding (a precision.StochasticRounding, or None) fits the call:
    16-bit params, no Kahan compensation."""
    _cpu_fast.check_rounding(prepared, stochastic is not None)


def run(prepared, spec, hp, step, grad_scale, stochastic=None):
    """The update in place; the new 16-bit params stored to nearest even, with the call's Kahan
    compensation (arrays[5]), or stochastically (`stochastic`: a precision.StochasticRounding)."""
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    if stochastic is None:
        _cpu_fast.run(prepared, spec.kernel, spec.variant(hp, step), scalars, hp["lr"])
    else:
        _cpu_fast.run(prepared, spec.kernel, spec.variant(hp, step), scalars, hp["lr"], True, stochastic.key,
                      stochastic.index_offset)


def step(spec, arrays, names, hp, step, grad_scale, stochastic=None):
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    if stochastic is None:
        _cpu_fast.update(spec.kernel, spec.variant(hp, step), arrays, names, scalars, hp["lr"])
    else:
        _cpu_fast.update(spec.kernel, spec.variant(hp, step), arrays, names, scalars, hp["lr"], True,
                         stochastic.key, stochastic.index_offset)


def sumsq_per_tensor(grads):
    return _cpu_fast.sumsq_per_tensor(grads)


def prepare_grads(grads, name="grads", indices=None):
    """Check arrays for an in-place operation (nothing written); the functions below take the result."""
    return _cpu_fast.prepare_grads(grads, name, indices)


def scale_(grads, coef):
    _cpu_fast.scale_(grads, coef)


def scale_each_(grads, coefs):
    _cpu_fast.scale_each_(grads, coefs)


def clamp_(grads, clip_value):
    _cpu_fast.clamp_(grads, clip_value)


# Norms and clipping from the sums of squares: written once for both host backends (host_clip.py)
global_norm, clip_coefficient = host_clip.global_norm, host_clip.clip_coefficient
clip_by_norm, clip_by_global_norm = host_clip.clip_functions(sys.modules[__name__])
