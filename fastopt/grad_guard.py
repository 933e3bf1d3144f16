"""clip_grad_norm= and skip_nonfinite= for the composite optimizers (Muon, Adafactor, SparseAdam; the NumPy
classes and fastopt.torch's), whose updates are not registry kernels that take a grad_scale.

One function per concept:
    check_options(clip_grad_norm, skip_nonfinite)  the options, checked once (the NumPy registry classes' rule
        and messages; fastopt.torch's composites take fastopt.torch's: composite.GuardedComposite)
    coefficient(grads, clip_grad_norm, skip_nonfinite)  (factor(sum of squares, ...): the same from a sum)
        None: skip this step (skip_nonfinite and a NaN/Inf in the gradients); else the factor of the
        gradients: torch.nn.utils.clip_grad_norm_'s min(1, max_norm / (norm + 1e-6)) over the global L2 norm
        (float64 sums, every dtype and layout; NaN for a NaN norm, which then propagates as in torch), or 1.0
    scaled(g, coef)  g * coef as a new array (16-bit grads: float32 product rounded to nearest even); the
        caller's gradients are never written

For float32/float64 gradients this equals torch.nn.utils.clip_grad_norm_ followed by the step. For 16-bit
gradients the norm here is float64 and the factor float32, where torch computes both in the grads' dtype (a
bfloat16 norm: its factor, and so the scaled grads, differ in the last bits).

A factor of 1 (no clipping needed) uses the gradients as they are. The registry classes fuse the factor into
their kernels; here it costs one more read and write of the scaled gradients. The norm is read on the host
(for CuPy arrays a synchronisation, as the registry classes' host path). SparseAdam's norm is the coalesced
gradient's (repeated rows summed, the dense gradient's norm; torch's clip_grad_norm_ refuses sparse gradients)
and its scaled copies are the coalesced rows' (sums first, then the factor, as torch's coalesce then clip). LBFGS takes neither option: its step evaluates the closure many times
and its line search needs the loss's own gradient.
"""
from __future__ import annotations

import math

import numpy as np

from fastopt.arrays import array_module
from fastopt.backends.host_clip import clip_coefficient
from fastopt.clip import check_bound, global_norm
from fastopt.precision import is_16bit
from fastopt.specs import as_bool


def check_options(clip_grad_norm, skip_nonfinite) -> tuple[float | None, bool]:
    """(clip_grad_norm as a float >= 0 or None, skip_nonfinite as a bool), the NumPy classes' rule (0 clips every
    gradient to zero, as torch's clip_grad_norm_(max_norm=0)); ValueError / TypeError naming them."""
    if clip_grad_norm is not None:
        clip_grad_norm = check_bound("clip_grad_norm", clip_grad_norm)
    return clip_grad_norm, as_bool("skip_nonfinite", skip_nonfinite)


def sum_of_squares(arrays) -> float:
    """Sum of the squares of every element of every array (NumPy or CuPy, any float dtype and layout), in
    float64, in a fixed order: the arrays grouped by dtype, each group one fused reduction."""
    groups: dict = {}
    for a in arrays:
        if a.size:
            xp = array_module(a)
            contiguous = a if a.flags.c_contiguous else xp.ascontiguousarray(a)
            groups.setdefault((xp.__name__, a.dtype.str, a.dtype.name), []).append(contiguous.reshape(-1))
    total = 0.0
    for key in sorted(groups):
        total += float(global_norm(groups[key])) ** 2
    return total


def factor(sum_sq: float, clip_grad_norm, skip_nonfinite) -> float | None:
    """None to skip the step, else the factor for the gradients whose sum of squares is sum_sq."""
    total = math.sqrt(sum_sq)
    if skip_nonfinite and not math.isfinite(total):
        return None
    return 1.0 if clip_grad_norm is None else float(clip_coefficient(total, clip_grad_norm))


def coefficient(grads, clip_grad_norm, skip_nonfinite) -> float | None:
    """None to skip the step, else the factor for the gradients (see the module docstring)."""
    if clip_grad_norm is None and not skip_nonfinite:
        return 1.0
    return factor(sum_of_squares(grads), clip_grad_norm, skip_nonfinite)


def scaled(g, coef: float):
    """g * coef, a new array of g's dtype (math in float32 for 16-bit grads, else in g's dtype)."""
    if is_16bit(g.dtype):
        return (g.astype(np.float32) * np.float32(coef)).astype(g.dtype)
    return g * g.dtype.type(coef)


class GuardedSteps:
    """The two options as attributes of an optimizer, checked when assigned, and its skipped_steps count;
    guard(grads) at each step: the factor, or None (counted) for a step to skip. The class values are those of an
    optimizer pickled before the options existed."""

    _clip_grad_norm: float | None = None
    _skip_nonfinite = False
    skipped_steps = 0

    @staticmethod
    def _checked_options(clip_grad_norm, skip_nonfinite) -> tuple[float | None, bool]:
        return check_options(clip_grad_norm, skip_nonfinite)

    def _init_guard(self, clip_grad_norm, skip_nonfinite) -> None:
        self._clip_grad_norm, self._skip_nonfinite = self._checked_options(clip_grad_norm, skip_nonfinite)
        self.skipped_steps = 0

    @property
    def clip_grad_norm(self) -> float | None:
        """Max global L2 norm of a step's gradients (clip_grad_norm_ semantics), or None."""
        return self._clip_grad_norm

    @clip_grad_norm.setter
    def clip_grad_norm(self, value) -> None:
        self._clip_grad_norm = self._checked_options(value, False)[0]

    @property
    def skip_nonfinite(self) -> bool:
        """Skip a step whose gradients hold a NaN/Inf (nothing written; counted in skipped_steps)."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value) -> None:
        self._skip_nonfinite = self._checked_options(None, value)[1]

    def guard(self, grads) -> float | None:
        """The factor for this step's gradients (arrays), or None for a step to skip (counted)."""
        return self.guard_sum(lambda: sum_of_squares(grads))

    def guard_sum(self, sum_sq) -> float | None:
        """guard() from sum_sq(), the gradients' sum of squares (called only when an option is set)."""
        if self._clip_grad_norm is None and not self._skip_nonfinite:
            return 1.0
        coef = factor(sum_sq(), self._clip_grad_norm, self._skip_nonfinite)
        if coef is None:
            self.skipped_steps += 1
        return coef
