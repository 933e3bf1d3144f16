"""Per-element update math for the Numba CUDA backend: the same expressions, in the same order, as
kernels/cuda/<family>.cuh (read those for the formulas), as @cuda.jit(device=True) functions.

One function per kernel family (`spec.kernel` in fastopt/specs.py), found BY NAME by kernels.py, which
generates the launch kernels from the registry:

  <kernel>_math(p, g, a, b, c, h, s, variant) -> (p, a, b, c)       elementwise families
  <kernel>_moments_math(p, g, a, b, c, h, s, variant) -> (a, b, c, u)   two-phase families (LAMB):
  <kernel>_direction_math(p, a, b, c, h, variant) -> u                  phase 1 and phase 2

Numba passes no references: each function takes the param, the gradient, the three state slots (in
`spec.states` order; unused slots pass through), the scalars `h` (a tuple of the math type in
`spec.scalar_names` order), the device grad_scale `s` and the variant bits, and returns the new values.
Scalars are read by name: `h[H.adam.step_size]`. `H` is built at import from the registry (one
namespace per kernel family, one int per scalar name); Numba folds `H.<family>.<name>` into a
compile-time constant, so reading by name costs nothing.

Adding an elementwise optimizer on the Numba side: write `<kernel>_math` below (decorated with
`@family`). Nothing else in kernels/numba or the backend lists the families.

Everything is built per math dtype by `build(dtype)`: the constants (0, 1, -1) are captured as scalars
of that dtype, so float32 kernels never promote to float64 (CI checks their PTX for `.f64`). Nothing
here is compiled before a kernel that calls it is launched or compiled.
"""
from __future__ import annotations

import functools
import math
import types

import numpy as np
from numba import cuda  # module level: the simulator swaps it while a kernel runs

from fastopt.specs import (LARS_MOMENTUM, LARS_NESTEROV, RMSPROP_CENTERED, RMSPROP_MOMENTUM, SGD_FIRST_STEP, SGD_MOMENTUM,
                           SGD_NESTEROV, kernel_specs)

ADAM_AMSGRAD = 1     # specs._adam_spec: variant 1 when amsgrad
RADAM_RECTIFIED = 1  # specs._radam_variant: variant 1 when rho_t > 5


def _scalar_namespaces():
    """H.<kernel>.<scalar name> -> index of that scalar in the family's `h` tuple, from
    spec.scalar_names (every spec sharing a kernel must list the same scalars). Modules, because Numba
    reads a module attribute as a compile-time constant."""
    h = types.ModuleType(__name__ + ".H")
    names = {}
    for spec in kernel_specs():
        if spec.kernel in names:
            if names[spec.kernel] != tuple(spec.scalar_names):
                raise RuntimeError(f"specs sharing kernel {spec.kernel!r} list different scalar_names: "
                                   f"{names[spec.kernel]} and {spec.name}'s {spec.scalar_names}")
            continue
        names[spec.kernel] = tuple(spec.scalar_names)
        ns = types.ModuleType(f"{h.__name__}.{spec.kernel}")
        for i, name in enumerate(spec.scalar_names):
            setattr(ns, name, i)
        setattr(h, spec.kernel, ns)
    return h, names


H, SCALAR_NAMES = _scalar_namespaces()  # SCALAR_NAMES: kernel -> its scalar names, in index order


@functools.lru_cache(maxsize=None)
def build(dtype):
    """{name: device function} for math dtype `dtype` (float32 or float64): every `<kernel>_math`,
    `<kernel>_moments_math`, `<kernel>_direction_math`, and the helpers (trust_ratio, clamp,
    clip_coefficient), plus "zero" (the dtype's 0)."""
    dtype = np.dtype(dtype)
    ZERO, ONE = dtype.type(0), dtype.type(1)
    MINUS_ONE = dtype.type(-1)
    HALF = dtype.type(0.5)
    CAST = dtype.type
    found = {"zero": ZERO}

    def family(fn):
        """Compile lazily as a device function and register under its own name."""
        dev = cuda.jit(device=True)(fn)
        found[fn.__name__] = dev
        return dev

    @cuda.jit(device=True)
    def add_scaled(g, c, p):  # common.cuh fo_add_scaled: exactly g when c == 0
        return g + c * p if c != ZERO else g

    @cuda.jit(device=True)
    def max_nan(a, b):  # common.cuh fo_max_nan
        return a if (a != a or a > b) else b

    @cuda.jit(device=True)
    def sqrt(x):  # fo_sqrt in the math dtype: what CUDA computes; the simulator's math.sqrt returns a float64,
        return CAST(math.sqrt(x))  # rounded back here (exact: a float64 sqrt rounded to float32 is sqrtf's)

    @cuda.jit(device=True)
    def sign(x):  # common.cuh fo_sign
        if x > ZERO:
            return ONE
        if x < ZERO:
            return MINUS_ONE
        return ZERO if x == x else x  # +0 for -0 too, NaN stays NaN (np.sign)

    # ---- elementwise families ----------------------------------------------------------------------

    @family
    def sgd_math(p, g, a, b, c, h, s, variant):  # a: momentum_buffer
        g = g * (h[H.sgd.grad_scale] * s)
        g = add_scaled(g, h[H.sgd.weight_decay], p)
        if variant & SGD_MOMENTUM:
            if variant & SGD_FIRST_STEP:
                a = g
            else:
                a = h[H.sgd.momentum] * a + h[H.sgd.one_minus_dampening] * g
            if variant & SGD_NESTEROV:
                g = g + h[H.sgd.momentum] * a
            else:
                g = a
        p = p - h[H.sgd.lr] * g
        return p, a, b, c

    @family
    def adagrad_math(p, g, a, b, c, h, s, variant):  # a: state_sum
        g = g * (h[H.adagrad.grad_scale] * s)
        g = add_scaled(g, h[H.adagrad.weight_decay], p)
        a = a + g * g
        std = sqrt(a) + h[H.adagrad.eps]
        p = p - h[H.adagrad.clr] * (g / std)
        return p, a, b, c

    @family
    def rmsprop_math(p, g, a, b, c, h, s, variant):  # a: square_avg, b: grad_avg, c: momentum_buffer
        g = g * (h[H.rmsprop.grad_scale] * s)
        g = add_scaled(g, h[H.rmsprop.weight_decay], p)
        a = h[H.rmsprop.alpha] * a + (h[H.rmsprop.one_minus_alpha] * g) * g
        if variant & RMSPROP_CENTERED:
            b = h[H.rmsprop.alpha] * b + h[H.rmsprop.one_minus_alpha] * g
            avg = sqrt(a - b * b) + h[H.rmsprop.eps]
        else:
            avg = sqrt(a) + h[H.rmsprop.eps]
        if variant & RMSPROP_MOMENTUM:
            c = h[H.rmsprop.momentum] * c + g / avg
            p = p - h[H.rmsprop.lr] * c
        else:
            p = p - h[H.rmsprop.lr] * (g / avg)
        return p, a, b, c

    @family
    def adam_math(p, g, a, b, c, h, s, variant):  # a: exp_avg, b: exp_avg_sq, c: max_exp_avg_sq
        g = g * (h[H.adam.grad_scale] * s)
        g = add_scaled(g, h[H.adam.l2], p)
        p = p * h[H.adam.decay]
        a = h[H.adam.beta1] * a + h[H.adam.one_minus_beta1] * g
        b = h[H.adam.beta2] * b + h[H.adam.one_minus_beta2] * (g * g)
        vv = b
        if variant & ADAM_AMSGRAD:
            c = max_nan(c, b)
            vv = c
        denom = sqrt(vv) * h[H.adam.inv_bias_correction2_sqrt] + h[H.adam.eps]
        p = p - h[H.adam.step_size] * (a / denom)
        return p, a, b, c

    @family
    def nadam_math(p, g, a, b, c, h, s, variant):  # a: exp_avg, b: exp_avg_sq
        g = g * (h[H.nadam.grad_scale] * s)
        g = add_scaled(g, h[H.nadam.l2], p)
        p = p * h[H.nadam.decay]
        a = h[H.nadam.beta1] * a + h[H.nadam.one_minus_beta1] * g
        b = h[H.nadam.beta2] * b + h[H.nadam.one_minus_beta2] * (g * g)
        denom = sqrt(b * h[H.nadam.inv_bias_correction2]) + h[H.nadam.eps]
        p = p - (h[H.nadam.grad_coef] * g + h[H.nadam.exp_avg_coef] * a) / denom
        return p, a, b, c

    @family
    def radam_math(p, g, a, b, c, h, s, variant):  # a: exp_avg, b: exp_avg_sq
        g = g * (h[H.radam.grad_scale] * s)
        g = add_scaled(g, h[H.radam.l2], p)
        p = p * h[H.radam.decay]
        a = h[H.radam.beta1] * a + h[H.radam.one_minus_beta1] * g
        b = h[H.radam.beta2] * b + h[H.radam.one_minus_beta2] * (g * g)
        if variant & RADAM_RECTIFIED:
            p = p - h[H.radam.rect_step_size] * (a / (sqrt(b) + h[H.radam.eps]))
        else:
            p = p - h[H.radam.step_size] * a
        return p, a, b, c

    @family
    def adabelief_math(p, g, a, b, c, h, s, variant):  # a: exp_avg, b: exp_avg_var
        g = g * (h[H.adabelief.grad_scale] * s)
        g = add_scaled(g, h[H.adabelief.l2], p)
        p = p * h[H.adabelief.decay]
        a = h[H.adabelief.beta1] * a + h[H.adabelief.one_minus_beta1] * g
        r = g - a
        b = h[H.adabelief.beta2] * b + h[H.adabelief.one_minus_beta2] * (r * r)
        b = b + h[H.adabelief.eps]
        denom = sqrt(b) * h[H.adabelief.inv_bias_correction2_sqrt] + h[H.adabelief.eps]
        p = p - h[H.adabelief.step_size] * (a / denom)
        return p, a, b, c

    @family
    def lion_math(p, g, a, b, c, h, s, variant):  # a: exp_avg
        g = g * (h[H.lion.grad_scale] * s)
        p = p * h[H.lion.decay]
        x = h[H.lion.beta1] * a + h[H.lion.one_minus_beta1] * g
        p = p - h[H.lion.lr] * sign(x)
        a = h[H.lion.beta2] * a + h[H.lion.one_minus_beta2] * g
        return p, a, b, c

    @family
    def adamax_math(p, g, a, b, c, h, s, variant):  # a: exp_avg, b: exp_inf
        g = g * (h[H.adamax.grad_scale] * s)
        g = add_scaled(g, h[H.adamax.weight_decay], p)
        a = h[H.adamax.beta1] * a + h[H.adamax.one_minus_beta1] * g
        u = -g if g < ZERO else g  # |g|, as adamax.cuh
        b = max_nan(h[H.adamax.beta2] * b, u + h[H.adamax.eps])
        p = p - h[H.adamax.step_size] * (a / b)
        return p, a, b, c

    # issue 14 (adadelta.cuh, rprop.cuh, asgd.cuh, yogi.cuh)

    @family
    def adadelta_math(p, g, a, b, c, h, s, variant):  # a: square_avg, b: acc_delta
        g = g * (h[H.adadelta.grad_scale] * s)
        g = add_scaled(g, h[H.adadelta.weight_decay], p)
        a = h[H.adadelta.rho] * a + (h[H.adadelta.one_minus_rho] * g) * g
        std = sqrt(a + h[H.adadelta.eps])
        delta = sqrt(b + h[H.adadelta.eps]) / std * g
        b = h[H.adadelta.rho] * b + (h[H.adadelta.one_minus_rho] * delta) * delta
        p = p - h[H.adadelta.lr] * delta
        return p, a, b, c

    @family
    def rprop_math(p, g, a, b, c, h, s, variant):  # a: prev, b: step_size
        g = g * (h[H.rprop.grad_scale] * s)
        x = g * a
        if x > ZERO:
            factor = h[H.rprop.etaplus]
        elif x < ZERO:
            factor = h[H.rprop.etaminus]
        else:
            factor = ONE  # x == 0, and NaN (torch.sign(NaN) is 0)
        t = b * factor
        t = h[H.rprop.step_size_min] if t < h[H.rprop.step_size_min] else t
        t = h[H.rprop.step_size_max] if t > h[H.rprop.step_size_max] else t
        b = t
        if x < ZERO:
            g = ZERO
        p = p - (sign(g) if g == g else ZERO) * t  # a NaN gradient leaves p (torch.sign(NaN) is 0)
        a = g
        return p, a, b, c

    @family
    def asgd_math(p, g, a, b, c, h, s, variant):  # a: ax
        g = g * (h[H.asgd.grad_scale] * s)
        g = add_scaled(g, h[H.asgd.weight_decay], p)
        p = p * h[H.asgd.decay]
        p = p - h[H.asgd.eta] * g
        if h[H.asgd.mu] != ONE:  # torch copies p when mu == 1 (asgd.cuh)
            a = a + (p - a) * h[H.asgd.mu]
        else:
            a = p
        return p, a, b, c

    @family
    def yogi_math(p, g, a, b, c, h, s, variant):  # a: exp_avg, b: exp_avg_sq
        g = g * (h[H.yogi.grad_scale] * s)
        g = add_scaled(g, h[H.yogi.l2], p)
        p = p * h[H.yogi.decay]
        a = h[H.yogi.beta1] * a + h[H.yogi.one_minus_beta1] * g
        g2 = g * g
        b = b - h[H.yogi.one_minus_beta2] * (sign(b - g2) * g2)
        denom = sqrt(b) * h[H.yogi.inv_bias_correction2_sqrt] + h[H.yogi.eps]
        p = p - h[H.yogi.step_size] * (a / denom)
        return p, a, b, c

    @family
    def lars_math(p, g, a, b, c, h, s, variant, coef):  # a: momentum_buffer; coef: the tensor's trust ratio
        g = g * (h[H.lars.grad_scale] * s)             # (lars.cuh lars_apply_math; negative: excluded)
        if not coef < ZERO:
            g = add_scaled(g, h[H.lars.weight_decay], p) * coef
        if variant & LARS_MOMENTUM:
            a = h[H.lars.momentum] * a + h[H.lars.one_minus_dampening] * g
            if variant & LARS_NESTEROV:
                g = g + h[H.lars.momentum] * a
            else:
                g = a
        p = p - h[H.lars.lr] * g
        return p, a, b, c

    # schedule-free SGD / AdamW (sfsgd.cuh, sfadamw.cuh): p holds y, a holds z (b: AdamW's v)

    @cuda.jit(device=True)
    def lerp(start, end, w):  # sfsgd.cuh fo_lerp: torch.lerp
        if w < HALF and w > -HALF:
            return start + w * (end - start)
        return end - (end - start) * (ONE - w)

    @family
    def sfsgd_math(p, g, a, b, c, h, s, variant):  # a: z
        g = g * (h[H.sfsgd.grad_scale] * s)
        g = add_scaled(g, h[H.sfsgd.weight_decay], p)
        p = lerp(p, a, h[H.sfsgd.ckp1])
        p = p + h[H.sfsgd.y_coef] * g
        a = a - h[H.sfsgd.lr] * g
        return p, a, b, c

    @family
    def sfadamw_math(p, g, a, b, c, h, s, variant):  # a: z, b: exp_avg_sq
        g = g * (h[H.sfadamw.grad_scale] * s)
        b = h[H.sfadamw.beta2] * b + h[H.sfadamw.one_minus_beta2] * (g * g)
        denom = sqrt(b / h[H.sfadamw.bias_correction2]) + h[H.sfadamw.eps]
        g = g / denom
        g = add_scaled(g, h[H.sfadamw.weight_decay], p)
        p = lerp(p, a, h[H.sfadamw.ckp1])
        p = p + h[H.sfadamw.y_coef] * g
        a = a - h[H.sfadamw.lr] * g
        return p, a, b, c

    # Adan (adan.cuh): the one four-state family (kernels.py FOUR_STATE_FAMILIES: its update kernel passes d)

    @family
    def adan_math(p, g, a, b, c, d, h, s, variant):  # a: exp_avg, b: exp_avg_diff, c: exp_avg_sq, d: previous_grad
        g = g * (h[H.adan.grad_scale] * s)
        diff = d + g * h[H.adan.first]
        a = h[H.adan.beta1] * a + h[H.adan.one_minus_beta1] * g
        b = h[H.adan.beta2] * b + h[H.adan.one_minus_beta2] * diff
        u = diff * h[H.adan.beta2] + g
        c = h[H.adan.beta3] * c + h[H.adan.one_minus_beta3] * (u * u)
        denom = sqrt(c) / h[H.adan.bias_correction3_sqrt] + h[H.adan.eps]
        p = p * h[H.adan.decay]
        p = p - h[H.adan.step_size] * (a / denom)
        p = p - h[H.adan.diff_step_size] * (b / denom)
        p = p / h[H.adan.prox]
        d = -g
        return p, a, b, c, d


    @family
    def average_math(p, g, a, b, c, h, s, variant):  # p: the average, g: the model's param (average.cuh)
        if variant == 2:
            p = g
        elif variant == 1:
            p = p + (g - p) / h[H.average.divisor]
        else:
            w = h[H.average.weight]
            p = p + w * (g - p) if (w < HALF and w > -HALF) else g - (g - p) * (ONE - w)  # torch: |w| < 0.5
        return p, a, b, c

    # ---- two-phase families (spec.two_phase): moments + per-tensor norms, then the scaled step ---------

    @family
    def lamb_direction_math(p, a, b, c, h, variant):  # a: exp_avg, b: exp_avg_sq (lamb.cuh)
        denom = sqrt(b * h[H.lamb.inv_bias_correction2]) + h[H.lamb.eps]
        return (a * h[H.lamb.inv_bias_correction1]) / denom + h[H.lamb.weight_decay] * p

    @family
    def lamb_moments_math(p, g, a, b, c, h, s, variant):
        g = g * (h[H.lamb.grad_scale] * s)
        a = h[H.lamb.beta1] * a + h[H.lamb.one_minus_beta1] * g
        b = h[H.lamb.beta2] * b + h[H.lamb.one_minus_beta2] * (g * g)
        return a, b, c, lamb_direction_math(p, a, b, c, h, variant)

    # ---- helpers shared by every family ----------------------------------------------------------------

    @family
    def trust_ratio(param_norm, update_norm):  # float64 on both sides, like the CPU loop
        return param_norm / update_norm if (param_norm > 0.0 and update_norm > 0.0) else 1.0

    @family
    def clamp(g, c):  # clip.cuh clamp_math
        lo = -c
        return lo if g < lo else (c if g > c else g)

    @family
    def clip_coefficient(total_norm, max_norm):  # clip.cuh, float64
        coef = max_norm / (total_norm + 1e-6)
        return 1.0 if coef >= 1.0 else coef

    return found
