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


def run(prepared, spec, hp, step, grad_scale):
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    _cpu_fast.run(prepared, spec.kernel, spec.variant(hp, step), scalars, hp["lr"])


def step(spec, arrays, names, hp, step, grad_scale):
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    _cpu_fast.update(spec.kernel, spec.variant(hp, step), arrays, names, scalars, hp["lr"])


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
