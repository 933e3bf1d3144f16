"""The CPU loops' bfloat16 block stores (kernels/cpu/bf16_simd.hpp: AVX512_BF16 where the CPU has it) against
precision.cuh's software conversion (itself checked against fastopt/precision.py in test_precision.py): every
float32 bit pattern narrowed (2^32 values: NaN payloads, both zeros, subnormals, the overflow edge), in blocks
with tails; and cpu_loops.hpp's block-wise Kahan store (kahan_store_block, which the staged and 8-bit loops
run) against fo_kahan_store element by element, for bfloat16 and float16, on values around every edge. Where
the CPU lacks AVX512_BF16 the blocks take the software loop and the test checks that fallback."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from fastopt import precision as ref
from tests.cxx_support import build_shim, cpu_flags, narrow_range_source


SHIM = r"""
#include "cpu/storage.hpp"
using namespace fastopt;
using namespace fastopt::cpu;

// kahan_store_block over n elements (params p, compensation c: 16-bit patterns, rewritten; p_new float32) against
// fo_kahan_store per element; returns the number of params or compensations that differ
template <class PS, class Fmt>
static long kahan_compare(const fo_u16* p, const fo_u16* c, const float* p_new, long n) {
    static fo_u16 pb[4096], cb[4096];
    static float pw[4096], old[4096], total[4096];
    long bad = 0;
    for (long i = 0; i < n; ++i) pb[i] = p[i], cb[i] = c[i], pw[i] = p_new[i];
    kahan_store_block<PS>(pb, cb, pw, old, total, n);
    Fmt f;
    for (long i = 0; i < n; ++i) {
        fo_u16 want_p, want_c;
        fo_kahan_store<Fmt>(f.load(p[i]), f.load(c[i]), p_new[i], want_p, want_c);
        bad += (pb[i] != want_p) + (cb[i] != want_c);
    }
    return bad;
}

extern "C" {

int bf16_path() {
#if FASTOPT_BF16_SIMD
    return cpu_has_avx512_bf16() ? 1 : 0;
#else
    return 0;
#endif
}

""" + narrow_range_source("float_to_bf16_block", "fo_float_to_bf16") + r"""
void narrow(const float* x, fo_u16* out, long n) { float_to_bf16_block(x, out, n); }

long kahan_bf16(const fo_u16* p, const fo_u16* c, const float* p_new, long n) {
    return kahan_compare<Bf16, Bf16Format>(p, c, p_new, n);
}

long kahan_fp16(const fo_u16* p, const fo_u16* c, const float* p_new, long n) {
    return kahan_compare<F16, Fp16Format>(p, c, p_new, n);
}

}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    shim = build_shim(tmp_path_factory.mktemp("bf16_simd"), SHIM)
    shim.narrow_range.restype = ctypes.c_long
    shim.narrow_range.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_void_p]
    shim.narrow.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    for f in (shim.kahan_bf16, shim.kahan_fp16):
        f.restype = ctypes.c_long
        f.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long]
    return shim


def test_the_avx512_bf16_path_runs_where_the_cpu_has_it(lib):
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo here")
    want = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    assert lib.bf16_path() == int(want)


@pytest.mark.parametrize("quarter", range(4))
def test_every_float32_narrows_to_the_software_bits(lib, quarter):
    first, last = quarter << 30, (quarter + 1) << 30
    bad_bits = ctypes.c_uint(0)
    bad = lib.narrow_range(first, last, 4093, ctypes.byref(bad_bits))  # 4093: groups of 16 and tails
    assert bad == 0, f"{bad} float32 patterns differ, first {bad_bits.value:#010x}"


def test_blocks_equal_the_numpy_reference(lib):
    """Random bit patterns against fastopt/precision.py (NaN payloads and subnormals included), odd length."""
    rng = np.random.default_rng()
    x = rng.integers(0, 1 << 32, 1001, dtype=np.uint64).astype(np.uint32)
    x[::7] &= 0x807FFFFF  # subnormals and zeros, spread over the groups of 16
    x = x.view(np.float32)
    narrowed = np.empty(1001, np.uint16)
    lib.narrow(x.ctypes.data, narrowed.ctypes.data, x.size)
    assert np.array_equal(narrowed, np.asarray(ref.to_bf16(x)).view(np.uint16))


def _edge_values(rng, n, fp16):
    """float32 values around every edge of the 16-bit format: ordinary magnitudes, the format's subnormals and
    float32's, near overflow, zeros of both signs, Inf and NaN."""
    tiny = 2.0 ** -24 if fp16 else 2.0 ** -133
    big = 65000.0 if fp16 else 3.3e38
    kinds = rng.integers(0, 7, n)
    scale = np.choose(kinds, [1.0, 1e-3, tiny * 64, tiny, big, 0.0, 1.0]).astype(np.float64)
    with np.errstate(over="ignore"):  # near float32's overflow some become Inf: an edge too
        x = (rng.standard_normal(n) * scale).astype(np.float32)
    special = rng.random(n) < 0.01
    x[special] = rng.choice(np.array([np.inf, -np.inf, np.nan, -0.0], np.float32), special.sum())
    return x


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1023, 4096])
def test_block_kahan_store_equals_the_elementwise_one(lib, fmt, n):
    """kahan_store_block (block conversions: the SIMD ones where the CPU has them) and fo_kahan_store give the
    same params and compensations: old params, compensations and updated params drawn around every edge."""
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    fp16 = fmt == "float16"
    to16 = (lambda a: np.asarray(ref.to_fp16(a)).view(np.uint16)) if fp16 else ref.to_bf16
    p = np.ascontiguousarray(to16(_edge_values(rng, n, fp16)), np.uint16)
    c = np.ascontiguousarray(to16(_edge_values(rng, n, fp16) * np.float32(1e-3)), np.uint16)
    p_new = _edge_values(rng, n, fp16)
    near = rng.random(n) < 0.5  # half of them a small step from the old param, as in training
    widened = np.asarray(ref.from_fp16(p) if fp16 else ref.from_bf16(p), np.float32)
    with np.errstate(all="ignore"):
        p_new[near] = widened[near] + (widened[near] * np.float32(1e-4)).astype(np.float32)
    kahan = lib.kahan_fp16 if fp16 else lib.kahan_bf16
    bad = kahan(p.ctypes.data, c.ctypes.data, p_new.ctypes.data, n)
    assert bad == 0, f"{bad} params or compensations differ (seed {seed})"
