"""The plain-NumPy backend: fastopt.reference applied per array, after the same validation as the
compiled backend. Used when the Cython extension is missing, or on request (backend="numpy")."""
from __future__ import annotations

import numpy as np

from fastopt import reference
from fastopt.backends.validate import host_scale, validate_arrays

NAME = "numpy"
AVAILABLE = True


def step(spec, arrays, names, hp, step, grad_scale):
    gs = host_scale(grad_scale)
    params, grads, *states = validate_arrays(arrays, names)
    fn = reference.STEPS[spec.name]
    kwargs = dict(hp, grad_scale=gs)
    if spec.uses_step:
        kwargs["step"] = step
    for i in range(len(params)):
        fn(params[i], grads[i], *[s[i] if s is not None else None for s in states], **kwargs)


def sumsq_per_tensor(grads):
    (grads,) = validate_arrays((grads,), ("grads",), read_only_slot=0)
    return np.array([reference.sumsq(g) for g in grads], dtype=np.float64)


def scale_(grads, coef):
    for g in validate_arrays((grads,), ("grads",), read_only_slot=-1)[0]:
        reference.scale_(g, coef)


def clamp_(grads, clip_value):
    for g in validate_arrays((grads,), ("grads",), read_only_slot=-1)[0]:
        reference.clamp_(g, clip_value)
