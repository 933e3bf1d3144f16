"""Numba CUDA kernels: the memory side of every update, norm and clipping op; the math is in
kernels/numba/math.py. Built lazily per (dtype, block size) by `build()`; nothing compiles before the
first launch (or an explicit numba.cuda.compile_ptx). Importing this module needs numba but no GPU;
fastopt imports it only when the numba backend is first used.

Kernels (one array each; the launcher, fastopt/backends/numba_backend.py, loops over a list). The
per-family kernels are generated from the registry (spec.kernel) and the family's math functions, found
by name in kernels/numba/math.py; no family is listed here:
  update[family](p, g, s0, s1, s2, h, gs, used, variant, skip)  elementwise, from <family>_math;
                                                   grid-stride; `used` bit k: state slot k is live
  moments[family](p, g, s0, s1, s2, h, gs, used, variant, partials, offset, skip)   two-phase (LAMB),
                                                   from <family>_moments_math: new states; per block
                                                   the float64 sums of p^2 and u^2
  trust(partials, offsets, lr, scaled_lr)          one block per tensor: lr * trust ratio
  apply[family](p, s0, s1, s2, h, scaled_lr, t, used, variant, skip)  from <family>_direction_math:
                                                   p -= scaled_lr[t] * u
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
from fastopt.specs import REGISTRY


def families(two_phase=False):
    """The kernel families of the registry (spec.kernel), elementwise or two-phase, in registry order."""
    return tuple(dict.fromkeys(s.kernel for s in REGISTRY.values() if bool(s.two_phase) == two_phase))


FAMILIES = families()                    # elementwise: one `update` kernel each
TWO_PHASE_FAMILIES = families(True)      # LAMB: `moments`, `trust`, `apply`
SLOTS = 3                                # state slots of every kernel (s0, s1, s2)
assert all(len(s.states) <= SLOTS for s in REGISTRY.values()), "a family needs more than 3 state slots"


def math_function(m, name):
    """The device function `name` from kernels/numba/math.py, or a clear error naming what to write."""
    try:
        return m[name]
    except KeyError:
        raise NotImplementedError(f"no Numba math {name!r}: write it in kernels/numba/math.py "
                                  f"(decorated with @family)") from None


class _Lazy(dict):
    """family -> kernel, generated on first use (a family without Numba math fails only when used)."""

    def __init__(self, families, make):
        super().__init__()
        self._families, self._make = families, make

    def __missing__(self, family):
        if family not in self._families:
            raise KeyError(family)
        self[family] = kernel = self._make(family)
        return kernel


@functools.lru_cache(maxsize=None)
def build(dtype, block):
    """dict of kernels for math dtype `dtype` (float32 / float64) and `block` threads per block (a power
    of two: the tree sums halve it). k["update"][family], k["moments"][family], k["apply"][family] are
    generated from the family's math functions (kernels/numba/math.py) on first use."""
    dtype = np.dtype(dtype)
    m = fmath.build(dtype)
    ZERO = m["zero"]
    CAST = dtype.type
    BLOCK = block
    trust_ratio, clip_coefficient, clamp_math = m["trust_ratio"], m["clip_coefficient"], m["clamp"]

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

    # ---- the generic kernels, one per family: the memory side around the family's math ----------------
    # `used` bit k: state slot k is live (read and written); a dead slot is neither read nor written.

    @cuda.jit(device=True)
    def load_states(s0, s1, s2, i, used):
        """Element i of the live state slots (ZERO for a dead one, which is never read)."""
        a = ZERO
        b = ZERO
        c = ZERO
        if used & 1:
            a = s0[i]
        if used & 2:
            b = s1[i]
        if used & 4:
            c = s2[i]
        return a, b, c

    @cuda.jit(device=True)
    def store_states(s0, s1, s2, i, used, a, b, c):
        """Write element i of the live state slots back (a dead slot is never written)."""
        if used & 1:
            s0[i] = a
        if used & 2:
            s1[i] = b
        if used & 4:
            s2[i] = c

    def make_update(family):
        math_fn = math_function(m, f"{family}_math")

        @cuda.jit
        def update(p, g, s0, s1, s2, h, gs, used, variant, skip):
            if skip[0]:
                return
            s = gs[0]
            start, stride = cuda.grid(1), cuda.gridsize(1)
            for i in range(start, p.size, stride):
                a, b, c = load_states(s0, s1, s2, i, used)
                pi, a, b, c = math_fn(p[i], g[i], a, b, c, h, s, variant)
                p[i] = pi
                store_states(s0, s1, s2, i, used, a, b, c)
        return update

    # Two-phase families (LAMB), in one place: phase 1 `moments` updates the states and writes per block
    # the float64 sums of p^2 and u^2 (u: the family's direction); `trust` reduces each tensor's blocks
    # into lr * trust_ratio; phase 2 `apply` recomputes u from the new states and steps p.

    def make_moments(family):
        moments_math = math_function(m, f"{family}_moments_math")

        @cuda.jit
        def moments(p, g, s0, s1, s2, h, gs, used, variant, partials, offset, skip):
            shared = cuda.shared.array(BLOCK, float64)
            if skip[0]:  # the whole block returns: block_sum's barriers stay uniform
                return
            s = gs[0]
            pp = 0.0
            uu = 0.0
            start, stride = cuda.grid(1), cuda.gridsize(1)
            for i in range(start, p.size, stride):
                a, b, c = load_states(s0, s1, s2, i, used)
                pi = p[i]
                a, b, c, u = moments_math(pi, g[i], a, b, c, h, s, variant)
                store_states(s0, s1, s2, i, used, a, b, c)
                pp += float64(pi) * float64(pi)
                uu += float64(u) * float64(u)
            pp = block_sum(pp, shared)
            uu = block_sum(uu, shared)
            if cuda.threadIdx.x == 0:
                partials[2 * (offset + cuda.blockIdx.x)] = pp
                partials[2 * (offset + cuda.blockIdx.x) + 1] = uu
        return moments

    def make_apply(family):
        direction_math = math_function(m, f"{family}_direction_math")

        @cuda.jit
        def apply(p, s0, s1, s2, h, scaled_lr, t, used, variant, skip):
            if skip[0]:  # trust ran on stale partials: its output is not used
                return
            lr = scaled_lr[t]
            start, stride = cuda.grid(1), cuda.gridsize(1)
            for i in range(start, p.size, stride):
                a, b, c = load_states(s0, s1, s2, i, used)
                pi = p[i]
                p[i] = pi - lr * direction_math(pi, a, b, c, h, variant)
        return apply

    kernels = {"update": _Lazy(FAMILIES, make_update), "moments": _Lazy(TWO_PHASE_FAMILIES, make_moments),
               "apply": _Lazy(TWO_PHASE_FAMILIES, make_apply)}

    @cuda.jit
    def trust(partials, offsets, lr, scaled_lr):
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
            scaled_lr[t] = lr * trust_ratio(pp ** 0.5, uu ** 0.5)  # stored in the math dtype

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
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, sq.size, stride):  # grid-stride: the launcher caps the grid
            out[i] = sq[i] ** 0.5

    kernels.update(trust=trust, sumsq_partials=sumsq_partials, sum_segments=sum_segments, global_norm=global_norm,
                   step_guard=step_guard, scale=scale, clamp=clamp, cast_scalar=cast_scalar, sqrt_all=sqrt_all)
    return kernels
