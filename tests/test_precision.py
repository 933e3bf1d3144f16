"""kernels/cuda/precision.cuh (compiled here with the host C++ compiler through tests/precision/shim.cpp)
against its NumPy reference fastopt/precision.py, bit for bit, and both against independent oracles
(ml_dtypes' bfloat16, NumPy's float16, exact rational arithmetic); plus an NVRTC compile of the
header for sm_80/sm_90 so the GPU build of the same code is checked without a GPU."""
from __future__ import annotations

import ctypes
import os
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from fastopt import precision as ref
from tests.cxx_support import build_shim, cxx_compiler

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(HERE), "kernels", "cuda")
SHIM = os.path.join(HERE, "precision", "shim.cpp")

# the default build flags and the most aggressive ones the CPU build uses (FMA contraction allowed,
# native vector units): the header's bits must not depend on them
FLAG_SETS = {"O2": ["-O2"], "native": ["-O3", "-march=native", "-ffp-contract=fast"]}

_P = ctypes.c_void_p


def _ptr(a):
    return a.ctypes.data_as(_P)


class Shim:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.random_key.restype = ctypes.c_uint32
        self.lib.random_key.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
        self.lib.random_bits.argtypes = [ctypes.c_uint32, _P, _P, ctypes.c_long]

    def _map(self, fn, x, out_dtype, *extra):
        out = np.empty(x.size, out_dtype)
        getattr(self.lib, fn)(_ptr(x), *[_ptr(e) for e in extra], _ptr(out), ctypes.c_long(x.size))
        return out

    def to_bf16(self, x):
        return self._map("to_bf16", np.ascontiguousarray(x, np.float32), np.uint16)

    def from_bf16(self, h):
        return self._map("from_bf16", np.ascontiguousarray(h, np.uint16), np.float32)

    def to_fp16(self, x):
        return self._map("to_fp16", np.ascontiguousarray(x, np.float32), np.uint16)

    def from_fp16(self, h):
        return self._map("from_fp16", np.ascontiguousarray(h, np.uint16), np.float32)

    def to_bf16_sr(self, x, r):
        return self._map("to_bf16_sr", np.ascontiguousarray(x, np.float32), np.uint16, np.ascontiguousarray(r, np.uint32))

    def to_fp16_sr(self, x, r):
        return self._map("to_fp16_sr", np.ascontiguousarray(x, np.float32), np.uint16, np.ascontiguousarray(r, np.uint32))

    def random_key(self, seed, step):
        return int(self.lib.random_key(seed, step))

    def random_bits(self, key, index):
        index = np.ascontiguousarray(index, np.uint64)
        out = np.empty(index.size, np.uint32)
        self.lib.random_bits(ctypes.c_uint32(key), _ptr(index), _ptr(out), ctypes.c_long(index.size))
        return out

    def kahan_store(self, p, c, p_new, dtype):
        p, c = np.ascontiguousarray(p, np.uint16), np.ascontiguousarray(c, np.uint16)
        p_new = np.ascontiguousarray(p_new, np.float32)
        p_out, c_out = np.empty(p.size, np.uint16), np.empty(p.size, np.uint16)
        self.lib.kahan_store(ctypes.c_int(dtype == "float16"), _ptr(p), _ptr(c), _ptr(p_new), _ptr(p_out),
                             _ptr(c_out), ctypes.c_long(p.size))
        return p_out, c_out

    def quantize_blockwise(self, x, signed):
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
        codes = np.empty(x.size, np.uint8)
        absmax = np.empty(-(-x.size // ref.QUANT_BLOCK), np.float32)
        mid, bucket = ref.quantizer_tables(signed)
        self.lib.quantize_blockwise(_ptr(x), ctypes.c_long(x.size), _ptr(mid), _ptr(bucket), _ptr(codes), _ptr(absmax))
        return codes, absmax

    def quantize_normalized(self, y, signed):
        y = np.ascontiguousarray(y, np.float32).reshape(-1)
        codes = np.empty(y.size, np.uint8)
        mid, bucket = ref.quantizer_tables(signed)
        self.lib.quantize_normalized(_ptr(y), ctypes.c_long(y.size), _ptr(mid), _ptr(bucket), _ptr(codes))
        return codes

    def dequantize_blockwise(self, codes, absmax, signed):
        codes = np.ascontiguousarray(codes, np.uint8)
        absmax = np.ascontiguousarray(absmax, np.float32)
        out = np.empty(codes.size, np.float32)
        table = np.ascontiguousarray(ref.dynamic_map(signed))
        self.lib.dequantize_blockwise(_ptr(codes), _ptr(absmax), _ptr(table), _ptr(out), ctypes.c_long(codes.size))
        return out


@pytest.fixture(scope="module", params=sorted(FLAG_SETS))
def shim(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("shim") / f"precision_{request.param}.so"
    cmd = [cxx_compiler(), *FLAG_SETS[request.param], "-shared", "-fPIC", "-std=c++14", "-Wall", "-Werror",
           f"-I{KERNELS}", SHIM, "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"{' '.join(cmd)}\n{done.stderr}")
    return Shim(str(out))


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _random_floats(rng, n):
    """Every kind of float32: random bit patterns (NaN, Inf, subnormals, both zeros) plus ordinary
    values at many scales and the edges of the 16-bit formats."""
    patterns = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    scaled = (rng.standard_normal(n) * 10.0 ** rng.uniform(-12, 6, n)).astype(np.float32)
    edges = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, -65520.0, 2.0 ** -14,
                      2.0 ** -15, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 3.0 * 2.0 ** -25,
                      3.3895314e38, 3.4028235e38, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754942e-38],
                     np.float32)
    return np.concatenate([patterns, scaled, edges])


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    ua = a.view(np.dtype(f"u{a.itemsize}")) if a.itemsize > 1 else a.view(np.uint8)
    ub = b.view(ua.dtype)
    bad = np.flatnonzero(ua != ub)
    assert bad.size == 0, f"{bad.size} elements differ, first at {bad[:5]}: {a[bad[:5]]} vs {b[bad[:5]]}"


# ---------------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------------

def test_bf16_round_trip_matches_reference_and_ml_dtypes(shim, rng):
    x = _random_floats(rng, 200_000)
    _same_bits(shim.to_bf16(x), ref.to_bf16(x))
    every = np.arange(2 ** 16, dtype=np.uint16)
    _same_bits(shim.from_bf16(every), ref.from_bf16(every))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    finite = x[~np.isnan(x)]
    _same_bits(ref.to_bf16(finite), finite.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.isnan(ref.from_bf16(ref.to_bf16(x[np.isnan(x)]))).all()
    _same_bits(ref.from_bf16(every), every.view(ml_dtypes.bfloat16).astype(np.float32))


EVERY_BF16_SHIM = r"""
#include "cuda/precision.cuh"
using namespace fastopt;

// the rule of fastopt/precision.py to_bf16, written out element by element
static fo_u16 rule(fo_u32 u) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<fo_u16>((u >> 16) | 0x40u);  // NaN: quiet, sign kept
    return static_cast<fo_u16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                    // nearest, ties to even
}

// ... and of to_bf16_sr: Inf and NaN as to_bf16, a finite value's 16 dropped bits plus 16 random ones, truncated
static fo_u16 rule_sr(fo_u32 u, fo_u32 random) {
    if ((u & 0x7fffffffu) >= 0x7f800000u) return rule(u);
    return static_cast<fo_u16>((u + (random & 0xffffu)) >> 16);
}

// fo_float_to_bf16 and fo_float_to_bf16_sr (with generator bits of `key`) over blocks (the vectorized form the
// CPU loops compile) against the rules, for every float32 bit pattern; the number that differ, the first in
// *bad_bits
extern "C" long every_bf16(unsigned key, unsigned* bad_bits) {
    static float x[4096];
    static fo_u32 random[4096];
    static fo_u16 got[4096], got_sr[4096];
    long bad = 0;
    for (unsigned long long base = 0; base < (1ull << 32); base += 4096) {
        for (unsigned k = 0; k < 4096; ++k) x[k] = fo_bits_float(static_cast<fo_u32>(base + k));
        for (unsigned k = 0; k < 4096; ++k) random[k] = fo_random_bits(key, base + k);
        for (unsigned k = 0; k < 4096; ++k) got[k] = fo_float_to_bf16(x[k]);
        for (unsigned k = 0; k < 4096; ++k) got_sr[k] = fo_float_to_bf16_sr(x[k], random[k]);
        for (unsigned k = 0; k < 4096; ++k) {
            const fo_u32 u = static_cast<fo_u32>(base + k);
            if ((got[k] != rule(u) || got_sr[k] != rule_sr(u, random[k])) && bad++ == 0) *bad_bits = u;
        }
    }
    return bad;
}
"""


def test_bf16_rounding_of_every_float32(tmp_path):
    """The header's mask-select forms (written for the vectorizer) against the reference's rules on all 2^32
    float32 bit patterns: to nearest even, and stochastically with the generator's bits of a fresh key."""
    lib = build_shim(tmp_path, EVERY_BF16_SHIM)
    lib.every_bf16.restype = ctypes.c_long
    lib.every_bf16.argtypes = [ctypes.c_uint, ctypes.c_void_p]
    key = int.from_bytes(os.urandom(4), "little")
    print(f"key {key}")
    bad_bits = ctypes.c_uint(0)
    bad = lib.every_bf16(key, ctypes.byref(bad_bits))
    assert bad == 0, f"{bad} patterns round differently, the first 0x{bad_bits.value:08x}"


def test_fp16_round_trip_matches_reference_and_numpy(shim, rng):
    x = _random_floats(rng, 200_000)
    _same_bits(shim.to_fp16(x), ref.to_fp16(x))
    with np.errstate(over="ignore"):
        numpy_bits = x.astype(np.float16).view(np.uint16)
    finite = ~np.isnan(x)
    _same_bits(ref.to_fp16(x)[finite], numpy_bits[finite])
    every = np.arange(2 ** 16, dtype=np.uint16)
    _same_bits(shim.from_fp16(every), ref.from_fp16(every))
    _same_bits(ref.from_fp16(every), every.view(np.float16).astype(np.float32))


def test_fp16_rounding_near_the_top_and_bottom_of_the_range(shim):
    x = np.array([65504.0, 65519.996, 65520.0, 2.0 ** -25, np.nextafter(np.float32(2.0 ** -25), np.float32(1)),
                  1.5 * 2.0 ** -24, 2.5 * 2.0 ** -24], np.float32)
    want = [0x7BFF, 0x7BFF, 0x7C00, 0x0000, 0x0001, 0x0002, 0x0002]  # ties to even in the subnormals
    assert shim.to_fp16(x).tolist() == want == ref.to_fp16(x).tolist()


# ---------------------------------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_stochastic_rounding_matches_reference(shim, rng, fmt):
    x = _random_floats(rng, 200_000)
    r = rng.integers(0, 2 ** 32, x.size, dtype=np.uint64).astype(np.uint32)
    edge_r = np.array([0, 0xFFFFFFFF, 0x8000, 0x1000, 0xFFFF, 0x1FFF], np.uint32)
    x = np.concatenate([x, np.repeat(np.float32([65504.0, 65530.0, 1.0, 2.0 ** -20, 3.3895314e38]), edge_r.size)])
    r = np.concatenate([r, np.tile(edge_r, 5)])
    c_fn, ref_fn = (shim.to_bf16_sr, ref.to_bf16_sr) if fmt == "bfloat16" else (shim.to_fp16_sr, ref.to_fp16_sr)
    _same_bits(c_fn(x, r), ref_fn(x, r))


def _neighbours(x, fmt):
    """(lower, upper) 16-bit neighbours of |x|: from the sorted list of every finite value (+Inf)."""
    load = ref.FORMATS[fmt][0]
    inf = 0x7F80 if fmt == "bfloat16" else 0x7C00
    every = load(np.arange(inf + 1, dtype=np.uint16)).astype(np.float64)  # 0 .. +Inf, ascending
    a = abs(float(x))
    i = np.searchsorted(every, a, side="right")
    return Fraction(every[i - 1]), Fraction(every[i])


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
@pytest.mark.parametrize("value", [1.0 + 2.0 ** -10, -3.14159, 1e-3, 7.77e-6, 2.0 ** -20 * 1.3, -6e-8, 60000.5])
def test_stochastic_rounding_is_unbiased(rng, fmt, value):
    x = np.float32(value)
    if fmt == "bfloat16" and abs(value) < 1e-30:
        pytest.skip("not a bfloat16 edge")
    load, _, sr = ref.FORMATS[fmt]
    n = 200_000
    bits = ref.random_bits(int(rng.integers(2 ** 32)), np.arange(n, dtype=np.uint64))
    out = load(sr(np.full(n, x), bits)).astype(np.float64)
    lo, hi = _neighbours(x, fmt)
    mags = set(np.unique(np.abs(out)).tolist())
    assert mags <= {float(lo), float(hi)}, (mags, lo, hi)
    p = float((Fraction(float(abs(x))) - lo) / (hi - lo)) if hi != lo else 0.0
    frac_up = float(np.mean(np.abs(out) == float(hi)))
    assert abs(frac_up - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9, (frac_up, p)
    assert np.all(np.sign(out) == np.sign(value))


# ---------------------------------------------------------------------------------------------------
# Random bits
# ---------------------------------------------------------------------------------------------------

def test_random_bits_match_reference_for_any_seed_step_and_index(shim, rng):
    for _ in range(20):
        seed, step = int(rng.integers(0, 2 ** 63)) * 2 + 1, int(rng.integers(1, 2 ** 62))
        key = shim.random_key(seed, step)
        assert key == ref.random_key(seed, step)
        index = np.concatenate([rng.integers(0, 2 ** 63, 5000, dtype=np.uint64),
                                np.arange(2 ** 32 - 3, 2 ** 32 + 3, dtype=np.uint64)])
        _same_bits(shim.random_bits(key, index), ref.random_bits(key, index))


def test_random_bits_are_distinct_and_uniform(rng):
    key = ref.random_key(int(rng.integers(2 ** 32)), 1)
    bits = ref.random_bits(key, np.arange(1 << 20, dtype=np.uint64))
    assert np.unique(bits).size == bits.size  # a bijection of the index for one key
    for shift in (0, 8, 16, 24):  # every byte of the word is uniform (chi-square, 255 dof, p ~ 1e-6)
        counts = np.bincount((bits >> np.uint32(shift)) & np.uint32(0xFF), minlength=256)
        expected = bits.size / 256
        assert ((counts - expected) ** 2 / expected).sum() < 400
    # another step gives unrelated bits: about half of them flip
    other = ref.random_bits(ref.random_key(0, 2), np.arange(1 << 16, dtype=np.uint64))
    same = ref.random_bits(ref.random_key(0, 1), np.arange(1 << 16, dtype=np.uint64))
    flipped = np.unpackbits((other ^ same).view(np.uint8)).mean()
    assert 0.49 < flipped < 0.51


# ---------------------------------------------------------------------------------------------------
# Kahan-compensated updates
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_kahan_store_matches_reference(shim, rng, fmt):
    load, store, _ = ref.FORMATS[fmt]
    n = 100_000
    p = store((rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 2, n)).astype(np.float32))
    c = store((rng.standard_normal(n) * 1e-4).astype(np.float32))
    p_new = (load(p) - (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, -1, n))).astype(np.float32)
    for a, b in zip(shim.kahan_store(p, c, p_new, fmt), ref.kahan_store(p, c, p_new, fmt)):
        _same_bits(a, b)


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_kahan_accumulates_updates_below_half_an_ulp(shim, fmt):
    load, store, _ = ref.FORMATS[fmt]
    p = store(np.ones(4, np.float32))
    c = store(np.zeros(4, np.float32))
    plain = p.copy()
    delta = np.float32(-1e-4)  # far below half an ulp of 1.0 in both formats
    for _ in range(2000):
        p, c = shim.kahan_store(p, c, load(p) + delta, fmt)
        plain = store(load(plain) + delta)
    assert np.all(load(plain) == 1.0)  # plain rounding stalls
    np.testing.assert_allclose(load(p) + load(c), 1.0 + 2000 * float(delta), rtol=2e-3)


# ---------------------------------------------------------------------------------------------------
# Block-wise 8-bit quantization
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps(signed):
    values, mid = ref.dynamic_map(signed), ref.dynamic_midpoints(signed)
    assert values.dtype == np.float32 and values.shape == (256,) and mid.shape == (255,)
    assert np.all(np.diff(values) >= 0) and np.all(mid >= values[:-1]) and np.all(mid <= values[1:])
    assert values[-1] == 1.0 and 0.0 in values
    assert values[0] == (-1.0 if signed else 0.0)
    positive = values[values > 0]
    # dynamic: the map reaches down six decades (a linear map of 256 codes stops at 1/128) and keeps
    # a bounded relative spacing over the top three
    assert positive.min() <= 1.1e-6
    top = positive[positive >= 1e-3]
    assert np.max(top[1:] / top[:-1]) <= 1.6


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000, 4099])
def test_quantize_blockwise_matches_reference(shim, rng, signed, n):
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 2, n)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    if n > 600:
        x[256:512] = 0.0  # an all-zero block
        x[600] = -0.0 if signed else 0.0
    codes, absmax = shim.quantize_blockwise(x, signed)
    want_codes, want_absmax = ref.quantize_blockwise(x, signed)
    _same_bits(codes, want_codes)
    _same_bits(absmax, want_absmax)
    back = shim.dequantize_blockwise(codes, absmax, signed)
    _same_bits(back, ref.dequantize_blockwise(codes, absmax, signed))
    # each value lands on its nearest map value: error at most half the local gap, times the absmax
    values = ref.dynamic_map(signed).astype(np.float64)
    scale = np.repeat(absmax.astype(np.float64), ref.QUANT_BLOCK)[:n]
    norm = np.divide(x, scale, out=np.zeros(n), where=scale > 0)
    nearest = values[np.abs(norm[:, None] - values[None, :]).argmin(axis=1)] if n else np.zeros(0)
    # a value within float32 rounding of a midpoint may take either neighbour: the quantizer compares the
    # float32 quotient with the float32 midpoints, this check the float64 ones (seed 3450174754 put one
    # element exactly on a float32 midpoint)
    mids = ref.dynamic_midpoints(signed).astype(np.float64)
    ulp = np.spacing(np.abs(norm).astype(np.float32)).astype(np.float64)
    tie = (np.abs(norm[:, None] - mids[None, :]) <= 2 * ulp[:, None]).any(axis=1) if n else np.zeros(0, bool)
    if not signed:  # a positive value rounds up to the smallest nonzero value, never down to zero's code
        smallest = values[1]
        nearest = np.where((norm > 0) & (nearest == 0), smallest, nearest)
        assert np.all(back[x > 0] > 0)
    close = np.isclose(back, nearest * scale, rtol=1e-6, atol=0)
    assert (close | tie).all(), np.flatnonzero(~(close | tie))


@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_tables_equal_the_midpoint_search(shim, rng, signed):
    # the compiled quantizer (a bucket per float32 top-16-bit pattern, then one compare) against the
    # reference's searchsorted over the midpoints: every bucket's two ends and random bits inside, every
    # midpoint and its float32 neighbours, signed zeros, the ends of [-1, 1] and NaN
    top = np.arange(65536, dtype=np.uint32) << 16
    bits = np.concatenate([top, top | 0xFFFF, top | 1, top | rng.integers(0, 1 << 16, top.size, dtype=np.uint32)])
    y = bits.view(np.float32)
    y = y[~np.isinf(y) & ~(np.abs(y) > 1)]  # |x / absmax| <= 1 or NaN: what the quantizer is given
    mid = ref.dynamic_midpoints(signed)
    y = np.concatenate([y, mid, np.nextafter(mid, np.float32(-2)), np.nextafter(mid, np.float32(2)),
                        np.float32([0.0, -0.0, 1.0, -1.0, np.nan])]).astype(np.float32)
    want = np.searchsorted(mid, y, side="left")
    want[np.isnan(y)] = 0
    _same_bits(shim.quantize_normalized(y, signed), want.astype(np.uint8))
    padded, bucket = ref.quantizer_tables(signed)
    assert padded.shape == (256,) and np.isinf(padded[-1]) and bucket.shape == (65536,) and bucket.dtype == np.uint8


def test_quantize_blockwise_propagates_nan_to_its_block_only(shim):
    x = np.linspace(-1, 1, 512, dtype=np.float32)
    x[10] = np.nan
    codes, absmax = shim.quantize_blockwise(x, True)
    assert np.isnan(absmax[0]) and absmax[1] == 1.0
    back = shim.dequantize_blockwise(codes, absmax, True)
    assert np.isnan(back[:256]).all() and np.isfinite(back[256:]).all()
    _same_bits(codes, ref.quantize_blockwise(x, True)[0])


# ---------------------------------------------------------------------------------------------------
# The GPU build of the same header
# ---------------------------------------------------------------------------------------------------

NVRTC_KERNEL = r"""
#include "precision.cuh"
using namespace fastopt;
extern "C" __global__ void fo_precision_probe(const float* x, unsigned short* b, unsigned short* h,
                                             unsigned char* q, float* absmax, const float* mid,
                                             const unsigned char* bucket, unsigned long long n, unsigned key) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const fo_u32 r = fo_random_bits(key, i);
        b[i] = fo_float_to_bf16_sr(x[i], r);
        h[i] = fo_float_to_fp16_sr(x[i], r);
        fo_u16 p_out, c_out;
        fo_kahan_store<Bf16Format>(fo_bf16_to_float(b[i]), 0.0f, x[i], p_out, c_out);
        b[i] ^= p_out ^ c_out ^ fo_float_to_bf16(fo_fp16_to_float(h[i])) ^ fo_float_to_fp16(x[i]);
        if (i % FO_QUANT_BLOCK == 0) {
            const unsigned len = n - i < FO_QUANT_BLOCK ? (unsigned)(n - i) : FO_QUANT_BLOCK;
            const FoQuantizer quantizer = {mid, bucket};
            absmax[i / FO_QUANT_BLOCK] = fo_quantize_block(x + i, len, quantizer, q + i);
        }
    }
}
"""


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_header_compiles_with_nvrtc(arch):
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load NVRTC means: not installed here
        if os.environ.get("CI"):
            pytest.fail(f"NVRTC not available under CI ({type(e).__name__}: {e})")
        pytest.skip(f"NVRTC not available ({type(e).__name__}: {e})")
    prog = nvrtc.createProgram(NVRTC_KERNEL, "precision_probe.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", f"-I{KERNELS}", "--std=c++14"])
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    ptx = nvrtc.getPTX(prog).decode() if isinstance(nvrtc.getPTX(prog), bytes) else nvrtc.getPTX(prog)
    assert "fo_precision_probe" in ptx
    # float32 math only: no double-precision instruction may sneak in through a literal or a helper
    assert ".f64" not in ptx
