"""The CPU loops' float16 block conversions (kernels/cpu/f16_simd.hpp: F16C where the CPU has it) against
precision.cuh's software conversions (themselves checked against fastopt/precision.py in test_precision.py):
every float16 bit pattern widened, and every float32 bit pattern narrowed (2^32 values, NaN payloads, both
zeros, subnormals, the overflow edge), in blocks of every alignment and with tails. Where the CPU lacks AVX2
and F16C the blocks take the software loop and the test checks that fallback."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from fastopt import precision as ref
from tests.cxx_support import build_shim, cpu_flags, narrow_range_source


SHIM = r"""
#include "cpu/f16_simd.hpp"
using namespace fastopt;
using namespace fastopt::cpu;

extern "C" {

int f16c_path() {
#if FASTOPT_F16C
    return cpu_has_f16c() ? 1 : 0;
#else
    return 0;
#endif
}

// every float16 through fp16_to_float_block from offset `shift` (the groups of 8 fall differently), against
// fo_fp16_to_float; returns the number of differing bit patterns
long widen_all(int shift) {
    static fo_u16 h[65536 + 16];
    static float got[65536 + 16];
    for (unsigned i = 0; i < 65536; ++i) h[i + shift] = fo_u16(i);
    fp16_to_float_block(h + shift, got + shift, 65536);
    long bad = 0;
    for (unsigned i = 0; i < 65536; ++i) bad += fo_float_bits(got[i + shift]) != fo_float_bits(fo_fp16_to_float(fo_u16(i)));
    return bad;
}

""" + narrow_range_source("float_to_fp16_block", "fo_float_to_fp16") + r"""
void widen(const fo_u16* h, float* out, long n) { fp16_to_float_block(h, out, n); }
void narrow(const float* x, fo_u16* out, long n) { float_to_fp16_block(x, out, n); }

}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    shim = build_shim(tmp_path_factory.mktemp("f16_simd"), SHIM)
    shim.widen_all.restype = ctypes.c_long
    shim.narrow_range.restype = ctypes.c_long
    shim.narrow_range.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_void_p]
    shim.widen.argtypes = shim.narrow.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    return shim


def test_the_f16c_path_runs_where_the_cpu_has_it(lib):
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo here")
    assert lib.f16c_path() == int({"avx2", "f16c"} <= flags)


@pytest.mark.parametrize("shift", [0, 1, 3, 7])
def test_every_float16_widens_to_the_software_bits(lib, shift):
    assert lib.widen_all(shift) == 0


@pytest.mark.parametrize("quarter", range(4))
def test_every_float32_narrows_to_the_software_bits(lib, quarter):
    first, last = quarter << 30, (quarter + 1) << 30
    bad_bits = ctypes.c_uint(0)
    bad = lib.narrow_range(first, last, 4093, ctypes.byref(bad_bits))  # 4093: groups of 8 and tails
    assert bad == 0, f"{bad} float32 patterns differ, first {bad_bits.value:#010x}"


def test_blocks_equal_the_numpy_reference(lib):
    """Random bit patterns both ways against fastopt/precision.py (NaN payloads included), odd length."""
    rng = np.random.default_rng()
    h = rng.integers(0, 1 << 16, 1001, dtype=np.uint32).astype(np.uint16)
    out = np.empty(1001, np.float32)
    lib.widen(h.ctypes.data, out.ctypes.data, h.size)
    assert np.array_equal(out.view(np.uint32), np.asarray(ref.from_fp16(h), np.float32).view(np.uint32))
    x = rng.integers(0, 1 << 32, 1001, dtype=np.uint64).astype(np.uint32).view(np.float32)
    narrowed = np.empty(1001, np.uint16)
    lib.narrow(x.ctypes.data, narrowed.ctypes.data, x.size)
    assert np.array_equal(narrowed, np.asarray(ref.to_fp16(x)).view(np.uint16))
