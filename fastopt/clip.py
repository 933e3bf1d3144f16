"""Gradient clipping, in place, with PyTorch's semantics. Norms are deterministic (fixed-order sums in
float64 on the CPU) and on the GPU come back as 0-d device arrays (no host synchronisation).

    clip_by_value(grads, c):           g = clip(g, -c, c)
    clip_by_norm(grads, max_norm):     per array: g = g * min(1, max_norm / (||g|| + 1e-6)); returns ||g||
    global_norm(grads):                sqrt(sum over arrays of ||g||^2)
    clip_by_global_norm(grads, max_norm): g = g * min(1, max_norm / (total + 1e-6)) for every array;
                                       returns total (torch.nn.utils.clip_grad_norm_)

Each function finds the backend of the arrays and calls its part of the backend interface
(fastopt/backends/interface.py): one sums-of-squares pass (sumsq_per_tensor), then the backend's
global_norm / clip_by_norm / clip_by_global_norm / clamp_ on those sums; host backends share
fastopt/backends/host_clip.py, GPU backends keep the norms and coefficients on the device.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from fastopt.array_types import Arrays, Scalar
from fastopt.backends import host_clip
from fastopt.backends.dispatch import backend_for, check_empty_call
from fastopt.specs import as_float

__all__ = ["clip_by_value", "clip_by_norm", "global_norm", "clip_by_global_norm", "clip_coefficient"]


def check_bound(name, value) -> float:
    """A clipping bound as a Python float: finite and >= 0."""
    value = as_float(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid {name}: {value}")
    return value


def clip_coefficient(total_norm: Scalar, max_norm: float) -> Scalar:
    """min(1, max_norm / (total_norm + 1e-6)); a NaN norm gives NaN (torch.clamp(max=1) semantics).
    A norm on the GPU (a 0-d device array from a GPU backend) gives a 0-d device array, computed there by
    the backend that owns it, without reading the norm back: pass it on as `grad_scale=` to fuse
    clipping into the update."""
    if isinstance(total_norm, (numbers.Real, np.ndarray)):
        return host_clip.clip_coefficient(total_norm, max_norm)
    return backend_for(total_norm, None, "total_norm").clip_coefficient(total_norm, max_norm)


def clip_by_value(grads: Arrays, clip_value: float, *, backend: str | None = None) -> None:
    """g = clip(g, -clip_value, clip_value), in place, for one array or a list."""
    clip_value = check_bound("clip_value", clip_value)
    be = _backend(grads, backend)
    if be is not None:
        be.clamp_(grads, clip_value)


def _backend(grads, backend):
    """The backend of `grads` (one array or a list); None for an empty list."""
    be = backend_for(grads, backend, "grads")
    if be is None:
        check_empty_call((grads,), ("grads",))
    return be


def global_norm(grads: Arrays, *, backend: str | None = None) -> Scalar:
    """L2 norm over all arrays: sqrt(sum of squares), accumulated in float64 in a fixed order."""
    be = _backend(grads, backend)
    if be is None:
        return np.float64(0.0)
    return be.global_norm(be.sumsq_per_tensor(grads))


def clip_by_norm(grads: Arrays, max_norm: float, *, backend: str | None = None) -> Scalar | list:
    """Per array: g = g * min(1, max_norm / (||g|| + 1e-6)), in place. Returns the norm of each array
    (a list for a list, one scalar for one array; 0-d device arrays on a GPU)."""
    max_norm = check_bound("max_norm", max_norm)
    be = _backend(grads, backend)
    if be is None:
        return []
    return be.clip_by_norm(grads, be.sumsq_per_tensor(grads), max_norm)


def clip_by_global_norm(grads: Arrays, max_norm: float, *, backend: str | None = None) -> Scalar:
    """Scale every array by min(1, max_norm / (total + 1e-6)), in place; returns the total norm
    (torch.nn.utils.clip_grad_norm_ semantics: a non-finite norm propagates into the grads)."""
    max_norm = check_bound("max_norm", max_norm)
    be = _backend(grads, backend)
    if be is None:
        return np.float64(0.0)
    return be.clip_by_global_norm(grads, be.sumsq_per_tensor(grads), max_norm)
