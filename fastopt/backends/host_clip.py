"""Norms and clipping for the host backends (cython, numpy), written once in terms of a backend's
prepare_grads / scale_ / scale_each_ and the sums of squares its sumsq_per_tensor returns. The GPU
backends do the same on the device with their own kernels (coefficient included).

Sums of squares are added in order in float64 (deterministic); norms are np.float64. Every grad is
checked as written (prepare_grads) before the first write, even when no scaling turns out needed.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["clip_coefficient", "global_norm", "clip_by_norm", "clip_by_global_norm", "clip_functions"]


def clip_coefficient(total_norm, max_norm):
    """min(1, max_norm / (total_norm + 1e-6)); a NaN norm gives NaN (torch.clamp(max=1) semantics). The
    one host copy of the formula (the kernels have theirs: kernels/cuda/clip.cuh, kernels/numba/math.py)."""
    coef = max_norm / (total_norm + 1e-6)
    return 1.0 if coef >= 1.0 else coef


def global_norm(sq):
    """sqrt(sum(sq)), the sums added in order in float64."""
    return np.float64(math.sqrt(sum(np.asarray(sq, dtype=np.float64).tolist())))


def clip_by_norm(backend, grads, sq, max_norm):
    """Per array: scale by clip_coefficient(||g||, max_norm) in place; the norms (np.float64 each, a list
    for a list)."""
    checked = backend.prepare_grads(grads)  # every array checked as written before the first write
    norms = [math.sqrt(s) for s in np.asarray(sq, dtype=np.float64).tolist()]
    coefs = [clip_coefficient(norm, max_norm) for norm in norms]
    if any(coef != 1.0 for coef in coefs):
        backend.scale_each_(checked, coefs)
    out = [np.float64(n) for n in norms]
    return out if isinstance(grads, (list, tuple)) else out[0]


def clip_by_global_norm(backend, grads, sq, max_norm):
    """Scale every array by clip_coefficient(total, max_norm) in place; the total norm."""
    checked = backend.prepare_grads(grads)  # checked as written even when no scaling turns out needed
    total = global_norm(sq)
    coef = clip_coefficient(float(total), max_norm)
    if coef != 1.0:
        backend.scale_(checked, coef)
    return total


def clip_functions(backend):
    """(clip_by_norm, clip_by_global_norm) of the backend interface for a host backend module: the two
    functions above with the backend bound."""
    def backend_clip_by_norm(grads, sq, max_norm):
        """Per array: g *= min(1, max_norm / (||g|| + 1e-6)) in place; the norms (a list for a list)."""
        return clip_by_norm(backend, grads, sq, max_norm)

    def backend_clip_by_global_norm(grads, sq, max_norm):
        """Every array: g *= min(1, max_norm / (total + 1e-6)) in place; the total norm."""
        return clip_by_global_norm(backend, grads, sq, max_norm)

    return backend_clip_by_norm, backend_clip_by_global_norm
