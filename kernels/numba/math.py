"""Per-element update math for the Numba CUDA backend: the same expressions, in the same order, as
kernels/cuda/<family>.cuh (read those for the formulas), as @cuda.jit(device=True) functions.

Numba passes no references, so each function takes (p, g, a, b, c, h, s, variant) -- the param, the
gradient, the three state slots, the hyperparameters `h` (a tuple of the math type, in the field order
of the family's *Params struct, i.e. fastopt/specs.py `scalar_names`) and the variant bits -- and
returns the new (p, a, b, c). Unused slots pass through.

Everything is built per math dtype by `build(dtype)`: the constants (0, 1, -1) are captured as scalars
of that dtype, so float32 kernels never promote to float64 (CI checks their PTX for `.f64`). Nothing
here is compiled before a kernel that calls it is launched or compiled.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda  # module level: the simulator swaps it while a kernel runs


@functools.lru_cache(maxsize=None)
def build(dtype):
    """{family: device function} for math dtype `dtype` (float32 or float64)."""
    dtype = np.dtype(dtype)
    ZERO, ONE = dtype.type(0), dtype.type(1)
    MINUS_ONE = dtype.type(-1)

    @cuda.jit(device=True)
    def add_scaled(g, c, p):  # common.cuh fo_add_scaled: exactly g when c == 0
        return g + c * p if c != ZERO else g

    @cuda.jit(device=True)
    def max_nan(a, b):  # common.cuh fo_max_nan
        return a if (a != a or a > b) else b

    @cuda.jit(device=True)
    def sign(x):  # common.cuh fo_sign
        if x > ZERO:
            return ONE
        if x < ZERO:
            return MINUS_ONE
        return x * ZERO

    @cuda.jit(device=True)
    def sgd(p, g, a, b, c, h, s, variant):
        # h: grad_scale, lr, momentum, one_minus_dampening, weight_decay
        g = g * (h[0] * s)
        g = add_scaled(g, h[4], p)
        if variant & 1:
            if variant & 4:
                a = g
            else:
                a = h[2] * a + h[3] * g
            if variant & 2:
                g = g + h[2] * a
            else:
                g = a
        p = p - h[1] * g
        return p, a, b, c

    @cuda.jit(device=True)
    def adagrad(p, g, a, b, c, h, s, variant):
        # h: grad_scale, clr, eps, weight_decay
        g = g * (h[0] * s)
        g = add_scaled(g, h[3], p)
        a = a + g * g
        std = math.sqrt(a) + h[2]
        p = p - h[1] * (g / std)
        return p, a, b, c

    @cuda.jit(device=True)
    def rmsprop(p, g, a, b, c, h, s, variant):
        # h: grad_scale, lr, alpha, one_minus_alpha, eps, weight_decay, momentum; variant 1 centered, 2 momentum
        g = g * (h[0] * s)
        g = add_scaled(g, h[5], p)
        a = h[2] * a + h[3] * (g * g)
        if variant & 1:
            b = h[2] * b + h[3] * g
            avg = math.sqrt(a - b * b) + h[4]
        else:
            avg = math.sqrt(a) + h[4]
        if variant & 2:
            c = h[6] * c + g / avg
            p = p - h[1] * c
        else:
            p = p - h[1] * (g / avg)
        return p, a, b, c

    @cuda.jit(device=True)
    def adam(p, g, a, b, c, h, s, variant):
        # h: grad_scale, beta1, 1-beta1, beta2, 1-beta2, eps, l2, decay, step_size, 1/sqrt(bc2); variant 1 amsgrad
        g = g * (h[0] * s)
        g = add_scaled(g, h[6], p)
        p = p * h[7]
        a = h[1] * a + h[2] * g
        b = h[3] * b + h[4] * (g * g)
        vv = b
        if variant & 1:
            c = max_nan(c, b)
            vv = c
        denom = math.sqrt(vv) * h[9] + h[5]
        p = p - h[8] * (a / denom)
        return p, a, b, c

    @cuda.jit(device=True)
    def nadam(p, g, a, b, c, h, s, variant):
        # h: grad_scale, beta1, 1-beta1, beta2, 1-beta2, eps, l2, decay, 1/bc2, grad_coef, exp_avg_coef
        g = g * (h[0] * s)
        g = add_scaled(g, h[6], p)
        p = p * h[7]
        a = h[1] * a + h[2] * g
        b = h[3] * b + h[4] * (g * g)
        denom = math.sqrt(b * h[8]) + h[5]
        p = p - (h[9] * g + h[10] * a) / denom
        return p, a, b, c

    @cuda.jit(device=True)
    def radam(p, g, a, b, c, h, s, variant):
        # h: grad_scale, beta1, 1-beta1, beta2, 1-beta2, eps, l2, decay, step_size, rect_step_size;
        # variant 1 rectified
        g = g * (h[0] * s)
        g = add_scaled(g, h[6], p)
        p = p * h[7]
        a = h[1] * a + h[2] * g
        b = h[3] * b + h[4] * (g * g)
        if variant & 1:
            p = p - h[9] * (a / (math.sqrt(b) + h[5]))
        else:
            p = p - h[8] * a
        return p, a, b, c

    @cuda.jit(device=True)
    def adabelief(p, g, a, b, c, h, s, variant):
        # h: as adam
        g = g * (h[0] * s)
        g = add_scaled(g, h[6], p)
        p = p * h[7]
        a = h[1] * a + h[2] * g
        r = g - a
        b = h[3] * b + h[4] * (r * r)
        b = b + h[5]
        denom = math.sqrt(b) * h[9] + h[5]
        p = p - h[8] * (a / denom)
        return p, a, b, c

    @cuda.jit(device=True)
    def lion(p, g, a, b, c, h, s, variant):
        # h: grad_scale, lr, beta1, 1-beta1, beta2, 1-beta2, decay
        g = g * (h[0] * s)
        p = p * h[6]
        x = h[2] * a + h[3] * g
        p = p - h[1] * sign(x)
        a = h[4] * a + h[5] * g
        return p, a, b, c

    @cuda.jit(device=True)
    def lamb_direction(p, m, v, h):
        # h: grad_scale, beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay, 1/bc1, 1/bc2 (lamb.cuh)
        denom = math.sqrt(v * h[8]) + h[5]
        return (m * h[7]) / denom + h[6] * p

    @cuda.jit(device=True)
    def lamb_moments(p, g, m, v, h, s):
        g = g * (h[0] * s)
        m = h[1] * m + h[2] * g
        v = h[3] * v + h[4] * (g * g)
        return m, v, lamb_direction(p, m, v, h)

    @cuda.jit(device=True)
    def lamb_trust_ratio(param_norm, update_norm):  # float64 on both sides, like the CPU loop
        return param_norm / update_norm if (param_norm > 0.0 and update_norm > 0.0) else 1.0

    @cuda.jit(device=True)
    def clamp(g, c):  # clip.cuh clamp_math
        lo = -c
        return lo if g < lo else (c if g > c else g)

    @cuda.jit(device=True)
    def clip_coefficient(total_norm, max_norm):  # clip.cuh, float64
        coef = max_norm / (total_norm + 1e-6)
        return 1.0 if coef >= 1.0 else coef

    return {
        "sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop, "adam": adam, "nadam": nadam, "radam": radam,
        "adabelief": adabelief, "lion": lion, "lamb_moments": lamb_moments, "lamb_direction": lamb_direction,
        "lamb_trust_ratio": lamb_trust_ratio, "clamp": clamp, "clip_coefficient": clip_coefficient,
        "zero": ZERO,
    }
