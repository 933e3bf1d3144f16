"""The 16-bit formats of the Numba kernels: kernels/cuda/precision.cuh written once more as Numba device
functions, the same integer and float32 operations in the same order, so a Numba kernel stores the bits the
CUDA kernels and the CPU loops store (bfloat16 and float16 are carried as their uint16 bits):

  to_float(kind)(bits) -> float32              fo_bf16_to_float / fo_fp16_to_float
  to_bits(kind)(x) -> uint16                   fo_float_to_bf16 / fo_float_to_fp16 (round to nearest even)
  to_bits_sr(kind)(x, random) -> uint16        fo_float_to_bf16_sr / fo_float_to_fp16_sr (stochastic)
  random_bits(key, index) -> int               fo_random_bits (counter-based: the CPU's and CUDA's bits)
  kahan_store(kind)(p, c, p_new) -> (p bits, c bits)    fo_kahan_store

kind: "bfloat16" or "float16". Unsigned 32-bit arithmetic is done in int64 and masked to 32 bits (Numba
types uint32 op int as int64 anyway); float32 <-> bits through a one-element local array viewed as the
other type, which compiles to a register move (and runs on the simulator, whose libdevice has no bit casts).
Built lazily: nothing compiles before a kernel that calls it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32, int64, uint16, uint32  # module level: the simulator swaps `cuda`

KINDS = ("bfloat16", "float16")
M32 = 0xFFFFFFFF


@functools.lru_cache(maxsize=None)
def build():
    """{name: device function}: bits, from_bits, to_float_<kind>, to_bits_<kind>, to_bits_sr_<kind>,
    kahan_store_<kind>, random_bits."""
    HALF, TINY, TWO24 = float32(0.5), float32(5.9604644775390625e-08), float32(16777216.0)

    @cuda.jit(device=True)
    def bits(x):  # fo_float_bits: the float32's bits as an int in [0, 2^32)
        buf = cuda.local.array(1, float32)
        buf[0] = float32(x)
        return int64(buf.view(np.uint32)[0])

    @cuda.jit(device=True)
    def from_bits(u):  # fo_bits_float
        buf = cuda.local.array(1, uint32)
        buf[0] = uint32(u & M32)
        return buf.view(np.float32)[0]

    @cuda.jit(device=True)
    def to_float_bfloat16(h):
        return from_bits(int64(h) << 16)

    @cuda.jit(device=True)
    def to_bits_bfloat16(x):
        u = bits(x)
        rounded = ((u + 0x7fff + ((u >> 16) & 1)) >> 16) & 0xffff
        nan = (u >> 16) | 0x0040
        return uint16(nan if (u & 0x7fffffff) > 0x7f800000 else rounded)

    @cuda.jit(device=True)
    def to_bits_sr_bfloat16(x, random):
        u = bits(x)
        rounded = ((u + (random & 0xffff)) >> 16) & 0xffff
        return to_bits_bfloat16(x) if (u & 0x7fffffff) >= 0x7f800000 else uint16(rounded)

    @cuda.jit(device=True)
    def to_float_float16(h):
        h = int64(h)
        sign = (h & 0x8000) << 16
        e = (h >> 10) & 0x1f
        m = h & 0x3ff
        if e == 0x1f:
            return from_bits(sign | 0x7f800000 | (m << 13))  # Inf, NaN (payload kept)
        if e == 0:  # subnormal (or zero): m * 2^-24, exact in float32
            return from_bits(sign | bits(float32(int32(m)) * TINY))
        return from_bits(sign | ((e + 112) << 23) | (m << 13))

    @cuda.jit(device=True)
    def to_bits_float16(x):
        u = bits(x)
        sign = (u >> 16) & 0x8000
        a = u & 0x7fffffff
        if a >= 0x477ff000:  # rounds to Inf (or is Inf / NaN)
            r = 0x7e00 if a > 0x7f800000 else 0x7c00
        elif a < 0x38800000:  # below float16's normals: the float32 addition rounds to nearest even
            r = (bits(from_bits(a) + HALF) - 0x3f000000) & M32
        else:
            r = (a - 0x38000000 + 0xfff + ((a >> 13) & 1)) >> 13
        return uint16(sign | r)

    @cuda.jit(device=True)
    def to_bits_sr_float16(x, random):
        u = bits(x)
        sign = (u >> 16) & 0x8000
        a = u & 0x7fffffff
        if a >= 0x7f800000:
            return to_bits_float16(x)
        if a >= 0x38800000:
            b = a + (random & 0x1fff)
            finite = 0x7c00 if b >= 0x47800000 else (b - 0x38000000) >> 13
        else:  # subnormal: whole ulps of 2^-24 plus a fraction that the random number decides
            q = from_bits(a) * TWO24
            whole = int32(q)
            fraction = q - float32(whole)
            up = 1 if float32(int32(random >> 8)) * TINY < fraction else 0
            finite = int64(whole) + up
        return uint16(sign | finite)

    @cuda.jit(device=True)
    def mix32(x):  # fo_mix32: the products stay below 2^63 (x < 2^32, the constants < 2^31)
        x ^= x >> 16
        x = (x * 0x21f0aaad) & M32
        x ^= x >> 15
        x = (x * 0x735a2d97) & M32
        x ^= x >> 15
        return x

    @cuda.jit(device=True)
    def random_bits(key, index):  # fo_random_bits(key, index): key < 2^32, index >= 0
        index = int64(index)
        h = mix32((int64(key) ^ (index & M32)) & M32)
        return mix32(h ^ ((index >> 32) & M32) ^ 0x85ebca6b)

    found = {"bits": bits, "from_bits": from_bits, "random_bits": random_bits,
             "to_float_bfloat16": to_float_bfloat16, "to_bits_bfloat16": to_bits_bfloat16,
             "to_bits_sr_bfloat16": to_bits_sr_bfloat16, "to_float_float16": to_float_float16,
             "to_bits_float16": to_bits_float16, "to_bits_sr_float16": to_bits_sr_float16}
    for kind in KINDS:
        found[f"kahan_store_{kind}"] = _kahan_store(found[f"to_float_{kind}"], found[f"to_bits_{kind}"])
    return found


def _kahan_store(load, store):
    @cuda.jit(device=True)
    def kahan_store(p, c, p_new):  # fo_kahan_store: the new param and compensation, as bits
        total = c + (p_new - p)  # this step's update plus what earlier steps lost
        p_out = store(p + total if math.isfinite(p_new) else p_new)  # inf and NaN stored as they are
        stored = load(p_out)
        return p_out, store(total + (p - stored) if math.isfinite(stored) else np.float32(0.0))
    return kahan_store
