"""The compiled CPU backend: a thin launcher over kernels/cpu/_cpu_fast.pyx, which validates the arrays
and runs one parallel region over all chunks of all arrays."""
from __future__ import annotations

from fastopt.backends.validate import host_scale

NAME = "cython"

try:
    from fastopt.kernels.cpu import _cpu_fast
except ImportError:  # not built: dispatch falls back to the numpy backend with one warning
    _cpu_fast = None
AVAILABLE = _cpu_fast is not None


def step(spec, arrays, names, hp, step, grad_scale):
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    _cpu_fast.update(spec.kernel, spec.variant(hp, step), arrays, names, scalars, hp["lr"])


def sumsq_per_tensor(grads):
    return _cpu_fast.sumsq_per_tensor(grads)


def scale_(grads, coef):
    _cpu_fast.scale_(grads, coef)


def clamp_(grads, clip_value):
    _cpu_fast.clamp_(grads, clip_value)
