"""Numba CUDA kernels: the memory side of every update, norm and clipping op; the math is in
kernels/numba/math.py. Built lazily per (dtype, block size, chunk size) by `build()`; nothing compiles
before the first launch (or an explicit numba.cuda.compile_ptx). Importing this module needs numba but no
GPU; fastopt imports it only when the numba backend is first used.

16-bit storage (float16, bfloat16: `build(..., kinds)`) is carried as uint16 bits and widened to float32 math
by precision.py's conversions around the same kernels; with 16-bit params, every family gets kernels that store
the new params Kahan-compensated or stochastically rounded (one signature for all families, below).

Every array kernel is a multi-tensor kernel: ONE launch updates a whole list (or one array) through a
table, like the CuPy backend's. The launcher (fastopt/backends/numba_backend.py) passes, per slot (p, g,
s0, s1, s2), one 1-d array `P, G, S0, S1, S2` that starts at the lowest address of that slot's tensors,
and a table:
  tensors[t] = (offset of tensor t in P, in G, in S0, in S1, in S2, number of elements, in S3, in C, in A0, in A1,
                in A2, in A3)                                                          int64 (nt, 12)
  chunks[b]  = (tensor, first element)                                                   int64 (nb, 2)
Block b handles the elements [first, min(first + CHUNK, n)) of its tensor, its threads striding by the
block size, so every element is covered whatever the grid (one block per chunk).
The per-family kernels are generated from the registry (spec.kernel) and the family's math functions,
found by name in kernels/numba/math.py; no family is listed here:
  update[family](P, G, S0, S1, S2, tensors, chunks, h, gs, used, variant, skip)   elementwise, from
                                                   <family>_math; `used` bit k: state slot k is live
                                                   (a four-state family, Adan: S3 after S2, used 15; LARS:
                                                   coefs, its numbers per tensor, last)
  moments[family](P, G, S0, S1, S2, tensors, chunks, h, gs, used, variant, partials, skip)   two-phase
                                                   (LAMB), from <family>_moments_math: new states; per
                                                   chunk the float64 sums of p^2 and u^2
  trust(partials, offsets, lr, scaled_lr)          one block per tensor: lr * trust ratio from its
                                                   chunks' sums (offsets: first chunk of each tensor)
  apply[family](P, S0, S1, S2, tensors, chunks, h, scaled_lr, used, variant, skip)   from
                                                   <family>_direction_math: p -= scaled_lr[t] * u
  update_kahan[family], update_sr[family](P, G, S0, S1, S2, S3, C, tensors, chunks, h, gs, used, variant, skip,
                                          coefs, key, index0)   16-bit params only: the new params stored
                                                   Kahan-compensated (C: the compensation) or stochastically
                                                   rounded (random_bits(key, index0 + i)), every elementwise family
  apply_kahan[family], apply_sr[family](P, S0, S1, S2, C, tensors, chunks, h, scaled_lr, used, variant, skip, key,
                                        index0)   the same stores in a two-phase family's second pass
  update_q8[family](P, G, S0, S1, S2, S3, A0, A1, A2, A3, C, tensors, chunks, h, gs, used, variant, skip, coefs,
                    key, index0, maps, mids, buckets, signed_mask)   8-bit states (state_dtype="int8"): S0-S3 the
                                                   codes, A0-A3 the absmax per 256-block (columns T_A0-T_A3),
                                                   float32 math; update_q8_kahan / update_q8_sr for 16-bit params
                                                   stored Kahan-compensated or stochastically rounded
  step_guard(sq, max_norm, coef, flag, skipped, mode)      the optimizer's clip coefficient / skip flag
`skip` is a one-element array (the optimizer's device-side skip flag): when set, the kernel returns
before touching memory (the moments kernel writes zero partials first, so `trust` reads only written
memory), and a step with a NaN/Inf gradient is skipped without a host round trip.
  sumsq(X, tensors, chunks, partials), sum_segments(partials, offsets, out),
  global_norm(sq, norm, max_norm, coef, want_coef), scale(X, tensors, chunks, mode, host_coef, coef,
  max_norm), clamp(X, tensors, chunks, c), cast_scalar(src, dst), sqrt_all(sq, out)
Reductions are deterministic: the chunks depend on the sizes only, and every sum runs in a fixed order
(per thread, then a tree in shared memory, then the chunks in order).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int64  # at module level: the simulator swaps the module's `cuda` while it runs

from fastopt.kernels.numba import math as fmath
from fastopt.kernels.numba import precision as fprec
from fastopt.kernels.numba.compat import prepare_numba_cuda
from fastopt.specs import REGISTRY, kernel_specs

prepare_numba_cuda()  # numba-cuda 0.30 with NumPy >= 2.5: before any kernel compiles (compat.py)


def families(two_phase=False):
    """The kernel families of the registry (spec.kernel), elementwise or two-phase, in registry order (and
    the other elementwise ops: specs.kernel_specs)."""
    return tuple(dict.fromkeys(s.kernel for s in kernel_specs() if bool(s.two_phase) == two_phase))


FAMILIES = families()                    # elementwise: one `update` kernel each
TWO_PHASE_FAMILIES = families(True)      # LAMB: `moments`, `trust`, `apply`
SLOTS = 4                                # state slots: s0, s1, s2, and s3 for a four-state family (Adan)
assert all(len(s.states) <= SLOTS for s in REGISTRY.values()), "a family needs more than 4 state slots"
# the four-state families: their update kernel takes S3 too, and their math (p, g, a, b, c, d, h, s, variant)
FOUR_STATE_FAMILIES = frozenset(s.kernel for s in kernel_specs() if len(s.states) > 3)
# the families whose math reads one number per tensor (spec.tensor_coefs: LARS's trust ratio): their update
# kernel takes an array of them, and their math (p, g, a, b, c, h, s, variant, coef)
PER_TENSOR_FAMILIES = frozenset(s.kernel for s in kernel_specs() if s.tensor_coefs is not None)


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


# the table's columns (tensors[t, ...]); T_S3: a fourth state's offset, T_C: the Kahan compensation's, T_A0-T_A2:
# the absmax offsets of 8-bit states s0-s3 (in blocks of QUANT_BLOCK; 0 when unused)
T_P, T_G, T_S0, T_S1, T_S2, T_N, T_S3, T_C, T_A0, T_A1, T_A2, T_A3 = range(12)
TENSOR_FIELDS = 12


def _converters(kind, dtype):
    """(load, store) device functions of one storage kind: None, values of the math dtype (both the identity);
    "bfloat16" / "float16", uint16 bits widened to float32 and rounded to nearest even (precision.py)."""
    if kind is None:
        ident = cuda.jit(device=True)(lambda x: x)
        return ident, ident
    if np.dtype(dtype) != np.float32 or kind not in fprec.KINDS:
        raise ValueError(f"16-bit storage {kind!r} takes float32 math, got {dtype}")
    p = fprec.build()
    return p[f"to_float_{kind}"], p[f"to_bits_{kind}"]


@functools.lru_cache(maxsize=None)
def build(dtype, block, chunk, kinds=None, quant_block=None):
    """dict of kernels for math dtype `dtype` (float32 / float64), `block` threads per block (a power of
    two: the tree sums halve it) and `chunk` elements per block of the table kernels. quant_block: elements per
    absmax of an 8-bit state (the caller's precision.QUANT_BLOCK: this layer imports no Python layer above it);
    only the 8-bit kernels (update_q8*) need it. kinds: how the params
    (and the one array of the reductions, scale and clamp), the grads and the states are stored, each None
    (the math dtype) or "bfloat16" / "float16" (uint16 bits, float32 math; precision.py); None: all None.
    k["update"][family], k["moments"][family], k["apply"][family] (and, for 16-bit params,
    k["update_kahan"], k["update_sr"], k["apply_kahan"] and k["apply_sr"]) are generated from the family's math functions
    (kernels/numba/math.py) on first use."""
    dtype = np.dtype(dtype)
    p_kind, g_kind, s_kind = (None, None, None) if kinds is None else kinds
    load_p, store_p = _converters(p_kind, dtype)
    load_g, _ = _converters(g_kind, dtype)
    load_s, store_s = _converters(s_kind, dtype)
    m = fmath.build(dtype)
    ZERO = m["zero"]
    CAST = dtype.type
    BLOCK = block
    CHUNK = chunk
    trust_ratio, clip_coefficient, clamp_math = m["trust_ratio"], m["clip_coefficient"], m["clamp"]

    def block_reduction(combine):
        """A fixed-order tree reduction over the block by `combine` (a device function of two values): every
        thread calls it with its x and the block's shared scratch, and gets the result."""
        @cuda.jit(device=True)
        def reduce(x, shared):
            t = cuda.threadIdx.x
            shared[t] = x
            cuda.syncthreads()
            s = BLOCK // 2
            while s > 0:
                if t < s:
                    shared[t] = combine(shared[t], shared[t + s])
                cuda.syncthreads()
                s //= 2
            total = shared[0]
            cuda.syncthreads()
            return total
        return reduce

    block_sum = block_reduction(cuda.jit(device=True)(lambda a, b: a + b))
    # of non-negative ints (|x| bit patterns): the 8-bit states' absmax
    block_max = block_reduction(cuda.jit(device=True)(lambda a, b: b if b > a else a))

    @cuda.jit(device=True)
    def chunk_of(tensors, chunks):
        """(tensor, first element, end) of this block's chunk."""
        t = chunks[cuda.blockIdx.x, 0]
        begin = chunks[cuda.blockIdx.x, 1]
        return t, begin, min(begin + CHUNK, tensors[t, T_N])

    @cuda.jit(device=True)
    def chunk_offsets(tensors, chunks):
        """chunk_of's (tensor, first element, end) and the tensor's offsets in P, G, S0, S1, S2."""
        t, begin, end = chunk_of(tensors, chunks)
        return t, begin, end, tensors[t, T_P], tensors[t, T_G], tensors[t, T_S0], tensors[t, T_S1], tensors[t, T_S2]

    # ---- the generic kernels, one per family: the memory side around the family's math ----------------
    # `used` bit k: state slot k is live (read and written); a dead slot is neither read nor written.

    @cuda.jit(device=True)
    def load_states(S0, S1, S2, S3, k0, k1, k2, k3, used):
        """The live state slots at their indices (ZERO for a dead one, which is never read)."""
        a = ZERO
        b = ZERO
        c = ZERO
        d = ZERO
        if used & 1:
            a = load_s(S0[k0])
        if used & 2:
            b = load_s(S1[k1])
        if used & 4:
            c = load_s(S2[k2])
        if used & 8:
            d = load_s(S3[k3])
        return a, b, c, d

    @cuda.jit(device=True)
    def store_states(S0, S1, S2, S3, k0, k1, k2, k3, used, a, b, c, d):
        """Write the live state slots back (a dead slot is never written)."""
        if used & 1:
            S0[k0] = store_s(a)
        if used & 2:
            S1[k1] = store_s(b)
        if used & 4:
            S2[k2] = store_s(c)
        if used & 8:
            S3[k3] = store_s(d)

    def element_math(family):
        """The family's math in the one form every kernel calls: (p, g, a, b, c, d, h, s, variant, coefs, t) ->
        (p, a, b, c, d); d is the fourth state (Adan's; passed through by the others), coefs[t] the tensor's
        number (LARS's; any array for the others, which never read it)."""
        math_fn = math_function(m, f"{family}_math")
        if family in FOUR_STATE_FAMILIES:
            @cuda.jit(device=True)
            def four(p, g, a, b, c, d, h, s, variant, coefs, t):
                return math_fn(p, g, a, b, c, d, h, s, variant)
            return four
        if family in PER_TENSOR_FAMILIES:
            @cuda.jit(device=True)
            def with_coef(p, g, a, b, c, d, h, s, variant, coefs, t):
                p, a, b, c = math_fn(p, g, a, b, c, h, s, variant, coefs[t])
                return p, a, b, c, d
            return with_coef

        @cuda.jit(device=True)
        def three(p, g, a, b, c, d, h, s, variant, coefs, t):
            p, a, b, c = math_fn(p, g, a, b, c, h, s, variant)
            return p, a, b, c, d
        return three

    def element_step(family):
        """One element of a table kernel: the live states and the param loaded, the family's math, the states
        stored; returns (the param as loaded, the new param), which the kernel stores by its rounding."""
        math_fn = element_math(family)

        @cuda.jit(device=True)
        def step(P, G, S0, S1, S2, S3, op, og, o0, o1, o2, o3, i, h, s, used, variant, coefs, t):
            a, b, c, d = load_states(S0, S1, S2, S3, o0 + i, o1 + i, o2 + i, o3 + i, used)
            p = load_p(P[op + i])
            pi, a, b, c, d = math_fn(p, load_g(G[og + i]), a, b, c, d, h, s, variant, coefs, t)
            store_states(S0, S1, S2, S3, o0 + i, o1 + i, o2 + i, o3 + i, used, a, b, c, d)
            return p, pi
        return step

    # A table kernel's body, one per (family, rounding): each element stepped by element_step and its new param
    # stored by param_store. S3: Adan's fourth state (any state view for the others); C: the Kahan compensation
    # (any view otherwise); coefs: LARS's numbers per tensor (a one-element array for the others); key and index0:
    # the stochastic rounding's key and the index of each tensor's first element.

    def param_store(rounding):
        """The new param's store of a rounding (None: to nearest; "kahan"; "stochastic"), (P, j, p_old, p_new, C, jc,
        key, index) with the CPU's bits."""
        if rounding is None:
            @cuda.jit(device=True)
            def store_nearest(P, j, p_old, p_new, C, jc, key, index):
                P[j] = store_p(p_new)
            return store_nearest
        if rounding == "kahan":
            kahan_store = fprec.build()[f"kahan_store_{p_kind}"]

            @cuda.jit(device=True)
            def store_kahan(P, j, p_old, p_new, C, jc, key, index):
                pb, cb = kahan_store(p_old, load_p(C[jc]), p_new)
                P[j] = pb
                C[jc] = cb
            return store_kahan
        store_sr, random_bits = fprec.build()[f"to_bits_sr_{p_kind}"], fprec.build()["random_bits"]

        @cuda.jit(device=True)
        def store_stochastic(P, j, p_old, p_new, C, jc, key, index):
            P[j] = store_sr(p_new, random_bits(key, index))
        return store_stochastic

    def table_body(family, rounding):
        step, store_param = element_step(family), param_store(rounding)

        @cuda.jit(device=True)
        def body(P, G, S0, S1, S2, S3, C, tensors, chunks, h, gs, used, variant, skip, coefs, key, index0):
            if skip[0]:
                return
            s = gs[0]
            t, begin, end, op, og, o0, o1, o2 = chunk_offsets(tensors, chunks)
            o3, oc = tensors[t, T_S3], tensors[t, T_C]
            for i in range(begin + cuda.threadIdx.x, end, cuda.blockDim.x):
                p, pi = step(P, G, S0, S1, S2, S3, op, og, o0, o1, o2, o3, i, h, s, used, variant, coefs, t)
                store_param(P, op + i, p, pi, C, oc + i, key, index0 + i)
        return body

    # The to-nearest kernels keep the fewest arguments (every argument costs host time per launch in Numba): the
    # three-state families without S3, LARS with its numbers per tensor, Adan with S3 (`used` 15).

    def make_update(family):
        body = table_body(family, None)
        if family in FOUR_STATE_FAMILIES:
            @cuda.jit
            def update4(P, G, S0, S1, S2, S3, tensors, chunks, h, gs, used, variant, skip):
                body(P, G, S0, S1, S2, S3, P, tensors, chunks, h, gs, used, variant, skip, gs, 0, 0)
            return update4
        if family in PER_TENSOR_FAMILIES:
            @cuda.jit
            def update_coef(P, G, S0, S1, S2, tensors, chunks, h, gs, used, variant, skip, coefs):
                body(P, G, S0, S1, S2, S2, P, tensors, chunks, h, gs, used, variant, skip, coefs, 0, 0)
            return update_coef

        @cuda.jit
        def update(P, G, S0, S1, S2, tensors, chunks, h, gs, used, variant, skip):
            body(P, G, S0, S1, S2, S2, P, tensors, chunks, h, gs, used, variant, skip, gs, 0, 0)
        return update

    # 16-bit params stored Kahan-compensated or stochastically rounded (the CUDA kernels' FASTOPT_ROUND 1 and 2),
    # every family, one signature: the body's arguments.

    def make_update_rounded(rounding):
        def make(family):
            body = table_body(family, rounding)

            @cuda.jit
            def update_rounded(P, G, S0, S1, S2, S3, C, tensors, chunks, h, gs, used, variant, skip, coefs, key,
                               index0):
                body(P, G, S0, S1, S2, S3, C, tensors, chunks, h, gs, used, variant, skip, coefs, key, index0)
            return update_rounded
        return make

    # Two-phase families (LAMB), in one place: phase 1 `moments` updates the states and writes per chunk
    # the float64 sums of p^2 and u^2 (u: the family's direction); `trust` reduces each tensor's chunks
    # into lr * trust_ratio; phase 2 `apply` recomputes u from the new states and steps p.

    def make_moments(family):
        moments_math = math_function(m, f"{family}_moments_math")

        @cuda.jit
        def moments(P, G, S0, S1, S2, tensors, chunks, h, gs, used, variant, partials, skip):
            shared = cuda.shared.array(BLOCK, float64)
            b = cuda.blockIdx.x
            if skip[0]:  # the whole block returns (block_sum's barriers stay uniform), its partials written
                if cuda.threadIdx.x == 0:
                    partials[2 * b] = 0.0
                    partials[2 * b + 1] = 0.0
                return
            s = gs[0]
            pp = 0.0
            uu = 0.0
            t, begin, end, op, og, o0, o1, o2 = chunk_offsets(tensors, chunks)
            for i in range(begin + cuda.threadIdx.x, end, cuda.blockDim.x):
                a, bb, c, d = load_states(S0, S1, S2, S2, o0 + i, o1 + i, o2 + i, o2 + i, used)
                pi = load_p(P[op + i])
                a, bb, c, u = moments_math(pi, load_g(G[og + i]), a, bb, c, h, s, variant)
                store_states(S0, S1, S2, S2, o0 + i, o1 + i, o2 + i, o2 + i, used, a, bb, c, d)
                pp += float64(pi) * float64(pi)
                uu += float64(u) * float64(u)
            pp = block_sum(pp, shared)
            uu = block_sum(uu, shared)
            if cuda.threadIdx.x == 0:
                partials[2 * b] = pp
                partials[2 * b + 1] = uu
        return moments

    def direction_step(family):
        """One element of phase 2: (the param as loaded, p - lr * u), u from the new states."""
        direction_math = math_function(m, f"{family}_direction_math")

        @cuda.jit(device=True)
        def step(P, S0, S1, S2, op, o0, o1, o2, i, h, lr, used, variant):
            a, b, c, d = load_states(S0, S1, S2, S2, o0 + i, o1 + i, o2 + i, o2 + i, used)
            pi = load_p(P[op + i])
            return pi, pi - lr * direction_math(pi, a, b, c, h, variant)
        return step

    def apply_body(family, rounding):
        """Phase 2's body of a rounding (param_store; C: the compensation, any view otherwise)."""
        step, store_param = direction_step(family), param_store(rounding)

        @cuda.jit(device=True)
        def body(P, S0, S1, S2, C, tensors, chunks, h, scaled_lr, used, variant, skip, key, index0):
            if skip[0]:  # trust ran on zero partials: its output is not used
                return
            t, begin, end = chunk_of(tensors, chunks)
            lr = scaled_lr[t]
            op, o0, o1, o2 = tensors[t, T_P], tensors[t, T_S0], tensors[t, T_S1], tensors[t, T_S2]
            oc = tensors[t, T_C]
            for i in range(begin + cuda.threadIdx.x, end, cuda.blockDim.x):
                p, pi = step(P, S0, S1, S2, op, o0, o1, o2, i, h, lr, used, variant)
                store_param(P, op + i, p, pi, C, oc + i, key, index0 + i)
        return body

    def make_apply(family):
        body = apply_body(family, None)

        @cuda.jit
        def apply(P, S0, S1, S2, tensors, chunks, h, scaled_lr, used, variant, skip):
            body(P, S0, S1, S2, P, tensors, chunks, h, scaled_lr, used, variant, skip, 0, 0)
        return apply

    def make_apply_rounded(rounding):
        def make(family):
            body = apply_body(family, rounding)

            @cuda.jit
            def apply_rounded(P, S0, S1, S2, C, tensors, chunks, h, scaled_lr, used, variant, skip, key, index0):
                body(P, S0, S1, S2, C, tensors, chunks, h, scaled_lr, used, variant, skip, key, index0)
            return apply_rounded
        return make

    # 8-bit states (state_dtype="int8", precision.QuantizedState): S0-S3 hold the codes (uint8), A0-A3 the float32
    # absmax per block of QUANT_BLOCK elements; maps / mids (2, 256) the unsigned then the signed dynamic map and
    # quantizer midpoints (padded with +inf), buckets (2, 65536) their bucket tables (precision.quantizer_arrays),
    # bit k of signed_mask: state k takes the signed row. A chunk is whole quantization blocks (CHUNK a multiple
    # of QUANT_BLOCK, chunks starting at multiples of CHUNK); per quantization block each thread takes
    # QUANT_BLOCK / BLOCK elements: the states dequantized (map[code] * absmax), the family's math, the new param
    # stored by the rounding, the new states kept; then per state the block's absmax (the largest |x| bit pattern,
    # NaN above every number: a tree of maxima in shared memory) and each code fo_quantize's (x / absmax: the
    # bucket of its top 16 bits, then one midpoint). precision.cuh's fo_quantize_block bit for bit: the CPU's
    # codes and scales. Elementwise families (LARS with its numbers per tensor, Adan with its fourth state); the
    # others are refused before launch (precision.INT8_REFUSED).
    QUANT_BLOCK = quant_block
    PER_THREAD = QUANT_BLOCK // BLOCK if QUANT_BLOCK and BLOCK <= QUANT_BLOCK and QUANT_BLOCK % BLOCK == 0 else 0
    bits, from_bits = fprec.build()["bits"], fprec.build()["from_bits"]
    F32_ONE, F32_ZERO = np.float32(1.0), np.float32(0.0)

    @cuda.jit(device=True)
    def dequantize(S, k, A, ka, row, smap):
        return smap[row, S[k]] * A[ka]

    @cuda.jit(device=True)
    def quantize(x, row, smid, buckets):  # fo_quantize: the number of midpoints below x (NaN: code 0)
        below = buckets[row, bits(x) >> 16]
        return below + 1 if smid[row, below] < x else below

    @cuda.jit(device=True)
    def requantize(S, o, A, ka, X, row, top, qb, qend, tops, smid, buckets):
        """One state's new values X (this thread's elements of the quantization block from qb) stored as codes, and
        the block's absmax (the largest |x| bit pattern, `top` over the block) stored by thread 0. Every thread of
        the block calls it (block_max's barriers)."""
        am = from_bits(block_max(top, tops))
        scale = am if am > F32_ZERO else F32_ONE  # an all-zero block: every code is zero's
        tid = cuda.threadIdx.x
        if tid == 0:
            A[ka] = am
        for r in range(PER_THREAD):
            i = qb + r * BLOCK + tid
            if i < qend:
                S[o + i] = quantize(X[r] / scale, row, smid, buckets)

    def make_update_q8(rounding):
        def make(family):
            step_math, store_param = element_math(family), param_store(rounding)
            if not PER_THREAD:
                raise ValueError(f"8-bit kernels need build(quant_block=) with the block size {BLOCK} dividing it, "
                                 f"got quant_block={QUANT_BLOCK!r}")

            @cuda.jit
            def update_q8(P, G, S0, S1, S2, S3, A0, A1, A2, A3, C, tensors, chunks, h, gs, used, variant, skip, coefs,
                          key, index0, maps, mids, buckets, signed_mask):
                smap = cuda.shared.array((2, 256), float32)
                smid = cuda.shared.array((2, 256), float32)
                tops = cuda.shared.array(BLOCK, int64)
                if skip[0]:
                    return
                tid = cuda.threadIdx.x
                for j in range(tid, 256, BLOCK):
                    smap[0, j] = maps[0, j]
                    smap[1, j] = maps[1, j]
                    smid[0, j] = mids[0, j]
                    smid[1, j] = mids[1, j]
                cuda.syncthreads()
                s = gs[0]
                t, begin, end, op, og, o0, o1, o2 = chunk_offsets(tensors, chunks)
                o3, oc = tensors[t, T_S3], tensors[t, T_C]
                k0, k1, k2, k3 = tensors[t, T_A0], tensors[t, T_A1], tensors[t, T_A2], tensors[t, T_A3]
                r0, r1, r2, r3 = signed_mask & 1, (signed_mask >> 1) & 1, (signed_mask >> 2) & 1, (signed_mask >> 3) & 1
                x0 = cuda.local.array(PER_THREAD, float32)
                x1 = cuda.local.array(PER_THREAD, float32)
                x2 = cuda.local.array(PER_THREAD, float32)
                x3 = cuda.local.array(PER_THREAD, float32)
                for qb in range(begin, end, QUANT_BLOCK):  # uniform across the block: the barriers below
                    qend = min(qb + QUANT_BLOCK, end)
                    blk = qb // QUANT_BLOCK
                    top0 = int64(0)
                    top1 = int64(0)
                    top2 = int64(0)
                    top3 = int64(0)
                    for r in range(PER_THREAD):
                        i = qb + r * BLOCK + tid
                        x0[r] = F32_ZERO
                        x1[r] = F32_ZERO
                        x2[r] = F32_ZERO
                        x3[r] = F32_ZERO
                        if i < qend:
                            a = F32_ZERO
                            b = F32_ZERO
                            c = F32_ZERO
                            d = F32_ZERO
                            if used & 1:
                                a = dequantize(S0, o0 + i, A0, k0 + blk, r0, smap)
                            if used & 2:
                                b = dequantize(S1, o1 + i, A1, k1 + blk, r1, smap)
                            if used & 4:
                                c = dequantize(S2, o2 + i, A2, k2 + blk, r2, smap)
                            if used & 8:
                                d = dequantize(S3, o3 + i, A3, k3 + blk, r3, smap)
                            p = load_p(P[op + i])
                            pi, a, b, c, d = step_math(p, load_g(G[og + i]), a, b, c, d, h, s, variant, coefs, t)
                            store_param(P, op + i, p, pi, C, oc + i, key, index0 + i)
                            x0[r] = a
                            x1[r] = b
                            x2[r] = c
                            x3[r] = d
                            top0 = max(top0, bits(a) & 0x7fffffff)
                            top1 = max(top1, bits(b) & 0x7fffffff)
                            top2 = max(top2, bits(c) & 0x7fffffff)
                            top3 = max(top3, bits(d) & 0x7fffffff)
                    # every thread has read this block's scales (above) before thread 0 rewrites them (below)
                    if used & 1:
                        requantize(S0, o0, A0, k0 + blk, x0, r0, top0, qb, qend, tops, smid, buckets)
                    if used & 2:
                        requantize(S1, o1, A1, k1 + blk, x1, r1, top1, qb, qend, tops, smid, buckets)
                    if used & 4:
                        requantize(S2, o2, A2, k2 + blk, x2, r2, top2, qb, qend, tops, smid, buckets)
                    if used & 8:
                        requantize(S3, o3, A3, k3 + blk, x3, r3, top3, qb, qend, tops, smid, buckets)
            return update_q8
        return make

    kernels = {"update": _Lazy(FAMILIES, make_update), "moments": _Lazy(TWO_PHASE_FAMILIES, make_moments),
               "apply": _Lazy(TWO_PHASE_FAMILIES, make_apply)}
    if dtype == np.float32 and s_kind is None:  # 8-bit states: float32 math, 32- or 16-bit params
        kernels["update_q8"] = _Lazy(FAMILIES, make_update_q8(None))
    if p_kind is not None:  # Kahan and stochastic rounding of 16-bit params, every family
        for rounding, suffix in (("kahan", "kahan"), ("stochastic", "sr")):
            kernels[f"update_{suffix}"] = _Lazy(FAMILIES, make_update_rounded(rounding))
            kernels[f"apply_{suffix}"] = _Lazy(TWO_PHASE_FAMILIES, make_apply_rounded(rounding))
            if s_kind is None:
                kernels[f"update_q8_{suffix}"] = _Lazy(FAMILIES, make_update_q8(rounding))

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
            scaled_lr[t] = lr * trust_ratio(math.sqrt(pp), math.sqrt(uu))  # stored in the math dtype

    @cuda.jit
    def sumsq(X, tensors, chunks, partials):
        shared = cuda.shared.array(BLOCK, float64)
        t, begin, end = chunk_of(tensors, chunks)
        o = tensors[t, T_P]
        acc = 0.0
        for i in range(begin + cuda.threadIdx.x, end, cuda.blockDim.x):
            xi = float64(load_p(X[o + i]))
            acc += xi * xi
        acc = block_sum(acc, shared)
        if cuda.threadIdx.x == 0:
            partials[cuda.blockIdx.x] = acc

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
        return math.sqrt(block_sum(acc, shared))

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
    def scale(X, tensors, chunks, mode, host_coef, coef, max_norm):
        # mode 0: host_coef; 1: coef[0]; 2: clip coefficient of tensor t from its sum of squares coef[t]
        t, begin, end = chunk_of(tensors, chunks)
        c = host_coef
        if mode == 1:
            c = coef[0]
        elif mode == 2:
            c = clip_coefficient(math.sqrt(coef[t]), max_norm)
        if c == 1.0:
            return
        cm = CAST(c)  # the coefficient in the math dtype, as the CUDA kernel's M(c)
        o = tensors[t, T_P]
        for i in range(begin + cuda.threadIdx.x, end, cuda.blockDim.x):
            X[o + i] = store_p(load_p(X[o + i]) * cm)

    @cuda.jit
    def clamp(X, tensors, chunks, c):
        t, begin, end = chunk_of(tensors, chunks)
        o = tensors[t, T_P]
        for i in range(begin + cuda.threadIdx.x, end, cuda.blockDim.x):
            X[o + i] = store_p(clamp_math(load_p(X[o + i]), c))

    @cuda.jit
    def cast_scalar(src, dst):  # src stored as the params (kinds[0]: its bits), dst any float dtype
        dst[0] = load_p(src[0])

    @cuda.jit
    def sqrt_all(sq, out):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, sq.size, stride):  # grid-stride: the launcher caps the grid
            out[i] = math.sqrt(sq[i])  # correctly rounded; x ** 0.5 is pow, 1 ulp off on an H200

    kernels.update(trust=trust, sumsq=sumsq, sum_segments=sum_segments, global_norm=global_norm,
                   step_guard=step_guard, scale=scale, clamp=clamp, cast_scalar=cast_scalar, sqrt_all=sqrt_all)
    return kernels
