"""Numba CUDA kernels: the memory side of every update, norm and clipping op; the math is in
kernels/numba/math.py. Built lazily per (dtype, block size) by `build()`; nothing compiles before the
first launch (or an explicit numba.cuda.compile_ptx). Importing this module needs numba but no GPU;
fastopt imports it only when the numba backend is first used.

Kernels (one array each; the launcher, fastopt/backends/numba_backend.py, loops over a list):
  update[family](p, g, s0, s1, s2, h, gs, used, variant, skip)  grid-stride; `used` bit k: state k is live
  lamb_moments(p, g, m, v, h, gs, partials, offset, skip) new m, v; per block sum of p^2, u^2 (float64)
  lamb_trust(partials, offsets, lr, scaled_lr)             one block per tensor: lr * trust ratio
  lamb_apply(p, m, v, h, scaled_lr, t, skip)               p -= scaled_lr[t] * u
  step_guard(sq, max_norm, coef, flag, skipped, mode)      the optimizer's clip coefficient / skip flag
`skip` is a one-element array (the optimizer's device-side skip flag): when set, the kernel returns
before touching memory, so a step with a NaN/Inf gradient is skipped without a host round trip.
  sumsq_partials(x, partials, offset), sum_segments(partials, offsets, out),
  global_norm(sq, norm, max_norm, coef, want_coef), scale(x, mode, host_coef, coef, t, max_norm),
  clamp(x, c), cast_scalar(src, dst), sqrt_all(sq, out)
Reductions are deterministic: the number of blocks of a tensor depends on its size only, and every
sum runs in a fixed order (per thread, then a tree in shared memory, then the blocks in order).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float64  # at module level: the simulator swaps the module's `cuda` while it runs

from fastopt.kernels.numba import math as fmath

FAMILIES = ("sgd", "adagrad", "rmsprop", "adam", "nadam", "radam", "adabelief", "lion")


@functools.lru_cache(maxsize=None)
def build(dtype, block):
    """dict of kernels for math dtype `dtype` (float32 / float64) and `block` threads per block (a power
    of two: the tree sums halve it)."""
    dtype = np.dtype(dtype)
    m = fmath.build(dtype)
    ZERO = m["zero"]
    CAST = dtype.type
    BLOCK = block
    lamb_moments_math, lamb_direction = m["lamb_moments"], m["lamb_direction"]
    lamb_trust_ratio, clip_coefficient, clamp_math = m["lamb_trust_ratio"], m["clip_coefficient"], m["clamp"]

    @cuda.jit(device=True)
    def block_sum(x, shared):
        """Fixed-order tree sum over the block (every thread calls it); the total, in every thread."""
        t = cuda.threadIdx.x
        shared[t] = x
        cuda.syncthreads()
        s = BLOCK // 2
        while s > 0:
            if t < s:
                shared[t] += shared[t + s]
            cuda.syncthreads()
            s //= 2
        total = shared[0]
        cuda.syncthreads()
        return total

    def make_update(math_fn):
        @cuda.jit
        def update(p, g, s0, s1, s2, h, gs, used, variant, skip):
            if skip[0]:
                return
            s = gs[0]
            start, stride = cuda.grid(1), cuda.gridsize(1)
            for i in range(start, p.size, stride):
                a = ZERO
                b = ZERO
                c = ZERO
                if used & 1:
                    a = s0[i]
                if used & 2:
                    b = s1[i]
                if used & 4:
                    c = s2[i]
                pi, a, b, c = math_fn(p[i], g[i], a, b, c, h, s, variant)
                p[i] = pi
                if used & 1:
                    s0[i] = a
                if used & 2:
                    s1[i] = b
                if used & 4:
                    s2[i] = c
        return update

    kernels = {"update": {f: make_update(m[f]) for f in FAMILIES}}

    @cuda.jit
    def lamb_moments(p, g, mo, v, h, gs, partials, offset, skip):
        shared = cuda.shared.array(BLOCK, float64)
        if skip[0]:  # the whole block returns: block_sum's barriers stay uniform
            return
        s = gs[0]
        pp = 0.0
        uu = 0.0
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, p.size, stride):
            pi = p[i]
            mi, vi, u = lamb_moments_math(pi, g[i], mo[i], v[i], h, s)
            mo[i] = mi
            v[i] = vi
            pp += float64(pi) * float64(pi)
            uu += float64(u) * float64(u)
        pp = block_sum(pp, shared)
        uu = block_sum(uu, shared)
        if cuda.threadIdx.x == 0:
            partials[2 * (offset + cuda.blockIdx.x)] = pp
            partials[2 * (offset + cuda.blockIdx.x) + 1] = uu

    @cuda.jit
    def lamb_trust(partials, offsets, lr, scaled_lr):
        shared = cuda.shared.array(BLOCK, float64)
        t = cuda.blockIdx.x
        pp = 0.0
        uu = 0.0
        for c in range(offsets[t] + cuda.threadIdx.x, offsets[t + 1], BLOCK):
            pp += partials[2 * c]
            uu += partials[2 * c + 1]
        pp = block_sum(pp, shared)
        uu = block_sum(uu, shared)
        if cuda.threadIdx.x == 0:
            scaled_lr[t] = lr * lamb_trust_ratio(pp ** 0.5, uu ** 0.5)  # stored in the math dtype

    @cuda.jit
    def lamb_apply(p, mo, v, h, scaled_lr, t, skip):
        if skip[0]:  # lamb_trust ran on stale partials: its output is not used
            return
        lr = scaled_lr[t]
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, p.size, stride):
            pi = p[i]
            p[i] = pi - lr * lamb_direction(pi, mo[i], v[i], h)

    @cuda.jit
    def sumsq_partials(x, partials, offset):
        shared = cuda.shared.array(BLOCK, float64)
        acc = 0.0
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.size, stride):
            xi = float64(x[i])
            acc += xi * xi
        acc = block_sum(acc, shared)
        if cuda.threadIdx.x == 0:
            partials[offset + cuda.blockIdx.x] = acc

    @cuda.jit
    def sum_segments(partials, offsets, out):
        shared = cuda.shared.array(BLOCK, float64)
        t = cuda.blockIdx.x
        acc = 0.0
        for c in range(offsets[t] + cuda.threadIdx.x, offsets[t + 1], BLOCK):
            acc += partials[c]
        acc = block_sum(acc, shared)
        if cuda.threadIdx.x == 0:
            out[t] = acc

    @cuda.jit(device=True)
    def total_norm(sq, shared):
        """sqrt(sum(sq)) over the block in a fixed order (every thread calls it)."""
        acc = 0.0
        for i in range(cuda.threadIdx.x, sq.size, BLOCK):
            acc += sq[i]
        return block_sum(acc, shared) ** 0.5

    @cuda.jit
    def global_norm(sq, norm, max_norm, coef, want_coef):
        shared = cuda.shared.array(BLOCK, float64)
        total = total_norm(sq, shared)
        if cuda.threadIdx.x == 0:
            norm[0] = total
            if want_coef:
                coef[0] = clip_coefficient(total, max_norm)

    @cuda.jit
    def step_guard(sq, max_norm, coef, flag, skipped, mode):
        # one block; mode bit 0: write the clip coefficient, bit 1: the skip flag and counter
        # (kernels/cuda/reduce.cu fo_step_guard, same summation order as global_norm)
        shared = cuda.shared.array(BLOCK, float64)
        total = total_norm(sq, shared)
        if cuda.threadIdx.x == 0:
            bad = (mode & 2) != 0 and (math.isnan(total) or math.isinf(total))
            if mode & 2:
                flag[0] = 1 if bad else 0
                if bad:
                    skipped[0] += 1
            if mode & 1:
                coef[0] = 1.0 if bad else clip_coefficient(total, max_norm)

    @cuda.jit
    def scale(x, mode, host_coef, coef, t, max_norm):
        # mode 0: host_coef; 1: coef[0]; 2: clip coefficient of tensor t from its sum of squares coef[t]
        c = host_coef
        if mode == 1:
            c = coef[0]
        elif mode == 2:
            c = clip_coefficient(coef[t] ** 0.5, max_norm)
        if c == 1.0:
            return
        cm = CAST(c)  # the coefficient in the math dtype, as the CUDA kernel's M(c)
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.size, stride):
            x[i] = x[i] * cm

    @cuda.jit
    def clamp(x, c):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.size, stride):
            x[i] = clamp_math(x[i], c)

    @cuda.jit
    def cast_scalar(src, dst):
        dst[0] = src[0]

    @cuda.jit
    def sqrt_all(sq, out):
        i = cuda.grid(1)
        if i < sq.size:
            out[i] = sq[i] ** 0.5

    kernels.update(lamb_moments=lamb_moments, lamb_trust=lamb_trust, lamb_apply=lamb_apply,
                   sumsq_partials=sumsq_partials, sum_segments=sum_segments, global_norm=global_norm, step_guard=step_guard,
                   scale=scale, clamp=clamp, cast_scalar=cast_scalar, sqrt_all=sqrt_all)
    return kernels
