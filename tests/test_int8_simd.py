"""The CPU loops' 8-bit state codec (kernels/cpu/int8_simd.hpp: the quantizer in AVX-512 arithmetic, the
dequantizer as byte-table permutes) against the table quantizer every backend shares (precision.cuh
fo_quantize_block / fo_dequantize_block, itself checked against fastopt/precision.py in test_precision.py).

The quantizer is checked on every float32 in [-1, 1] (each bit pattern once, 255 to a block beside a +-1.0
that makes the block's absmax 1, so the division is exact) and NaN, for both maps, and on blocks whose
absmax is NaN, Inf, zero or subnormal. Where the CPU lacks AVX-512 the codec is the scalar loop and the test
checks that the fallback is taken."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from fastopt import precision as ref
from tests.cxx_support import build_shim, cpu_flags


SHIM = r"""
#include "cpu/int8_simd.hpp"
#include <string.h>
using namespace fastopt;
using namespace fastopt::cpu;

extern "C" {

// 1 where this CPU runs the SIMD quantizer / dequantizer for the map (0: the scalar loops)
int codec_paths(const float* map, const float* mid, const unsigned char* bucket) {
    const Int8Codec c = int8_codec(map, FoQuantizer{mid, bucket});
#if FASTOPT_QUANTIZE_AVX512
    return (c.aq != 0) | ((c.planes != 0) << 1);
#else
    (void)c;
    return 0;
#endif
}

// Every float32 bit pattern from `first` (inclusive) to `last` (exclusive) whose value is in [-1, 1] or NaN,
// 255 to a block beside +-1.0, through both quantizers; returns the number of codes or scales that differ
// and writes the first differing value to *bad_value.
long exhaustive(unsigned long long first, unsigned long long last, const float* map, const float* mid,
                const unsigned char* bucket, float* bad_value) {
    const FoQuantizer q = {mid, bucket};
    const Int8Codec c = int8_codec(map, q);
    float x[256];
    unsigned char want[256], got[256];
    long bad = 0;
    unsigned n = 0, flip = 0;
    for (unsigned long long b = first; b <= last; ++b) {
        if (b < last) {
            const float v = fo_bits_float(static_cast<fo_u32>(b));
            if (!(v != v) && !(v <= 1.0f && v >= -1.0f)) continue;
            x[n++] = v;
            if (n < 255) continue;
        }
        if (n == 0) break;
        x[n++] = (flip++ & 1) ? -1.0f : 1.0f;  // absmax 1: the quantizers see x itself
        const float a = fo_quantize_block(x, n, q, want), g = codec_quantize_block(c, x, n, got);
        for (unsigned i = 0; i < n; ++i)
            if (want[i] != got[i]) {
                if (bad == 0) *bad_value = x[i];
                ++bad;
            }
        if (fo_float_bits(a) != fo_float_bits(g)) ++bad;
        n = 0;
    }
    return bad;
}

// One block of any values and length through both quantizers (codes and absmax), then both dequantizers.
long compare_block(const float* x, unsigned n, const float* map, const float* mid, const unsigned char* bucket) {
    const FoQuantizer q = {mid, bucket};
    const Int8Codec c = int8_codec(map, q);
    unsigned char want[256], got[256];
    float back_want[256], back_got[256];
    const float a = fo_quantize_block(x, n, q, want), g = codec_quantize_block(c, x, n, got);
    long bad = memcmp(want, got, n) != 0 || fo_float_bits(a) != fo_float_bits(g);
    fo_dequantize_block(want, n, a, map, back_want);
    codec_dequantize_block(c, want, n, a, back_got);
    bad += memcmp(back_want, back_got, n * sizeof(float)) != 0;
    return bad;
}

}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    shim = build_shim(tmp_path_factory.mktemp("int8_simd"), SHIM)
    shim.exhaustive.restype = ctypes.c_long
    shim.exhaustive.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong] + [ctypes.c_void_p] * 4
    shim.compare_block.restype = ctypes.c_long
    shim.compare_block.argtypes = [ctypes.c_void_p, ctypes.c_uint] + [ctypes.c_void_p] * 3
    shim.codec_paths.argtypes = [ctypes.c_void_p] * 3
    return shim


def _tables(signed):
    mid, bucket = ref.quantizer_tables(signed)
    return np.ascontiguousarray(ref.dynamic_map(signed)), mid, bucket


def _ptr(a):
    return a.ctypes.data


@pytest.mark.parametrize("signed", [True, False])
def test_the_simd_paths_run_where_the_cpu_has_them(lib, signed):
    table, mid, bucket = _tables(signed)
    paths = lib.codec_paths(_ptr(table), _ptr(mid), _ptr(bucket))
    flags = cpu_flags()
    import platform
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert paths == 0  # the scalar loops, silently correct; nothing else to check here
        return
    assert paths & 1, "AVX-512 CPU, but the arithmetic quantizer's self-check refused the map"
    assert bool(paths & 2) == ("avx512vbmi" in flags)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("half", ["positive", "negative"])
def test_quantizer_equals_the_table_on_every_float32_in_range(lib, signed, half):
    table, mid, bucket = _tables(signed)
    first, last = (0, 0x80000000) if half == "positive" else (0x80000000, 0x100000000)
    bad_value = ctypes.c_float(0)
    bad = lib.exhaustive(first, last, _ptr(table), _ptr(mid), _ptr(bucket), ctypes.byref(bad_value))
    assert bad == 0, f"{bad} codes differ, the first at x = {bad_value.value!r}"


@pytest.mark.parametrize("signed", [True, False])
def test_codec_equals_the_table_on_odd_blocks(lib, signed):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    table, mid, bucket = _tables(signed)
    blocks = []
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 129, 255, 256):
        x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-12, 3, n)).astype(np.float32)
        blocks.append(x if signed else np.abs(x))
    nan_block = rng.standard_normal(256).astype(np.float32) * 40
    nan_block[7] = np.nan  # absmax NaN: the block is scaled by 1, so |x| > 1 arrive
    inf_block = rng.standard_normal(256).astype(np.float32)
    inf_block[100] = np.inf
    tiny = (rng.standard_normal(256) * 1e-40).astype(np.float32)  # subnormal absmax
    zeros = np.zeros(256, np.float32)
    signed_zeros = np.where(rng.random(256) < 0.5, np.float32(0.0), np.float32(-0.0)).astype(np.float32)
    mixed = rng.standard_normal(256).astype(np.float32)  # the unsigned map given negatives (and NaN)
    mixed[::9] = -np.abs(mixed[::9])
    mixed[5] = np.nan
    exact = np.concatenate([[1.0], mid[:255]]).astype(np.float32)  # every midpoint exactly: the ties
    # quotients that underflow to +-0 beside a huge absmax (zero's code, not a positive one's)
    underflow = np.concatenate([[3.0e38], rng.choice([1e-30, -1e-30, 1e-45, -1e-45, 2e-38, 0.0], 255)]).astype(np.float32)
    blocks += [nan_block, inf_block, tiny, zeros, signed_zeros, mixed, exact, -exact, underflow]
    # the midpoints and their float32 neighbours times random scales (the block's absmax leads it): the
    # quotient x / absmax lands within rounding of a midpoint, where the codec must defer to the table
    for _ in range(300):
        scale = np.float32(10.0 ** rng.uniform(-30, 30))
        pick = rng.choice(mid[:255], 85)
        near = np.concatenate([pick, np.nextafter(pick, np.float32(-2)), np.nextafter(pick, np.float32(2))])
        x = np.concatenate([[scale], (near.astype(np.float64) * scale).astype(np.float32)]).astype(np.float32)
        blocks.append(x if signed else np.abs(x))
    for x in blocks:
        x = np.ascontiguousarray(x, np.float32)
        assert lib.compare_block(_ptr(x), x.size, _ptr(table), _ptr(mid), _ptr(bucket)) == 0, x


@pytest.mark.parametrize("signed", [True, False])
def test_dequantizer_equals_the_table_for_every_code_and_scale(lib, signed):
    table, mid, bucket = _tables(signed)
    x = table.copy()  # every code once: its own map value, absmax 1
    rng = np.random.default_rng(0)
    for scale in (1.0, 3.5e-3, 7.1e4, 1e-41, 3.0e38):
        y = np.ascontiguousarray(rng.permutation(x * np.float32(scale)), np.float32)
        assert lib.compare_block(_ptr(y), y.size, _ptr(table), _ptr(mid), _ptr(bucket)) == 0, scale
