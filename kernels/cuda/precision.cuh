// Low-precision storage, shared by the CUDA kernels and the CPU loops: 16-bit conversions, stochastic
// rounding, Kahan-compensated updates and block-wise 8-bit state quantization (docs/design.md,
// "Precision"; the NumPy reference of every function here is fastopt/precision.py, and
// tests/test_precision.py checks the two agree bit for bit).
//
// Everything is integer and float32 arithmetic written out in software, never a compiler or device
// intrinsic, so the CPU and the GPU produce the same bits: __float2bfloat16_rn and gcc's __bf16 agree
// on round-to-nearest-even, but nothing guarantees that their NaN payloads, stochastic rounding or
// subnormal handling do, and these bits end up in checkpoints.
#pragma once

#include "common.cuh"

#if !defined(__CUDACC_RTC__) && !defined(__CUDA_ARCH__)
#include <string.h>
#endif

namespace fastopt {

typedef unsigned short fo_u16;
typedef unsigned int fo_u32;
typedef unsigned long long fo_u64;

// ------------------------------------------------------------------------------------------------
// Bit casts
// ------------------------------------------------------------------------------------------------

FASTOPT_HD fo_u32 fo_float_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    fo_u32 u;
    memcpy(&u, &x, sizeof u);
    return u;
#endif
}

FASTOPT_HD float fo_bits_float(fo_u32 u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// c ? a : b through a mask: the compilers keep some `?:` chains as branches, which stops the loops
// from vectorizing
FASTOPT_HD fo_u32 fo_select(bool c, fo_u32 a, fo_u32 b) {
    const fo_u32 mask = 0u - static_cast<fo_u32>(c);
    return (a & mask) | (b & ~mask);
}

// ------------------------------------------------------------------------------------------------
// bfloat16: the top half of a float32
// ------------------------------------------------------------------------------------------------

FASTOPT_HD float fo_bf16_to_float(fo_u16 h) { return fo_bits_float(static_cast<fo_u32>(h) << 16); }

// Round to nearest, ties to even. NaN stays NaN (quiet bit set, sign kept). Both results computed and
// one selected, no branch: the CPU loops vectorize it (the same holds for the fp16 conversions below).
// Written as a 32-bit mask select before the one shift: as a ?: of the two shifted results GCC computed
// the NaN result, the mask and the rounded one in 16 bits, packing each from 32 (3 packs per 16 elements
// instead of 1), and with AVX2 (no unsigned compare) the magnitude test took two instructions: 36 vector
// instructions per 16 elements instead of 26, 0.51 instead of 0.33 ns per element on an AVX2 core. The same
// bits for every float32 (tests/test_precision.py).
FASTOPT_HD fo_u16 fo_float_to_bf16(float x) {
    const fo_u32 u = fo_float_bits(x);
    const fo_u32 nan = 0u - static_cast<fo_u32>(x != x);  // all ones for a NaN
    const fo_u32 selected = ((u | 0x00400000u) & nan) | ((u + 0x7fffu + ((u >> 16) & 1u)) & ~nan);
    return static_cast<fo_u16>(selected >> 16);
}

// Round to one of the two neighbouring bfloat16 values, up (away from zero) with probability equal to
// the distance from the lower one: adding 16 random bits to the magnitude and truncating does exactly
// that (a carry into the exponent is the correct next value, Inf included). Inf and NaN are not rounded.
FASTOPT_HD fo_u16 fo_float_to_bf16_sr(float x, fo_u32 random) {
    const fo_u32 u = fo_float_bits(x);
    // Inf and NaN get no random bits (an Inf's top half is itself; a NaN's takes the quiet bit, as
    // fo_float_to_bf16); a finite x's carry never reaches the sign bit. Masks, not a `?:` between two 16-bit
    // results, for the reason given at fo_float_to_bf16 (0.50 -> 0.33 ns per element on an AVX2 core).
    const fo_u32 special = 0u - static_cast<fo_u32>(static_cast<int>(u & 0x7fffffffu) >= 0x7f800000);
    const fo_u32 nan = 0u - static_cast<fo_u32>(x != x);
    return static_cast<fo_u16>(((u + (random & 0xffffu & ~special)) | (nan & 0x00400000u)) >> 16);
}

// ------------------------------------------------------------------------------------------------
// float16 (IEEE binary16)
// ------------------------------------------------------------------------------------------------

FASTOPT_HD float fo_fp16_to_float(fo_u16 h) {
    const fo_u32 sign = static_cast<fo_u32>(h & 0x8000u) << 16;
    const fo_u32 e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    const fo_u32 normal = sign | ((e + 112u) << 23) | (m << 13);  // rebias the exponent (15 -> 127)
    const fo_u32 special = sign | 0x7f800000u | (m << 13);        // Inf, NaN (payload kept)
    // zero or subnormal: m * 2^-24, exact in float32 (m < 1024: converted as a signed int, which vectorizes)
    const fo_u32 sub = sign | fo_float_bits(static_cast<float>(static_cast<int>(m)) * 5.9604644775390625e-08f);
    return fo_bits_float(e == 0x1fu ? special : (e == 0 ? sub : normal));
}

// Round to nearest, ties to even, with fp16's subnormals; beyond 65520 (half-way past the largest
// finite value) the result is Inf. NaN stays NaN (quiet).
FASTOPT_HD fo_u16 fo_float_to_fp16(float x) {
    const fo_u32 u = fo_float_bits(x);
    const fo_u32 sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    // normal range: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even (adding
    // 0xfff plus the kept last bit carries exactly when the rest is above half, or half with an odd last
    // bit; a carry into the exponent is the right next value). Wraps harmlessly where not selected.
    const fo_u32 normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // below 2^-14: an fp16 subnormal, round(|x| * 2^24) to nearest even, done by the float adder: |x| + 0.5
    // has an ulp of 2^-24, so its low mantissa bits are that rounded integer (1024 = the smallest normal)
    const fo_u32 sub = fo_float_bits(fo_bits_float(a) + 0.5f) - 0x3f000000u;
    // from 65520 (half-way past the largest finite value) on: Inf; NaN stays NaN (quiet)
    const fo_u32 big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
    const fo_u32 r = a >= 0x477ff000u ? big : (a < 0x38800000u ? sub : normal);
    return static_cast<fo_u16>(sign | r);
}

// Stochastic rounding to float16 (see fo_float_to_bf16_sr). In the normal range the 13 dropped bits
// get 13 random bits added; in the subnormal range (grid 2^-24) |x| * 2^24 is split exactly into an
// integer and a fraction, and the fraction is compared with 24 random bits.
FASTOPT_HD fo_u16 fo_float_to_fp16_sr(float x, fo_u32 random) {
    const fo_u32 u = fo_float_bits(x);
    const fo_u32 sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    // every case computed and one selected by masks (fo_select): gcc kept `?:` here as branches, and the
    // loops vectorize only without them; each case stays defined where it is not selected
    const fo_u32 b = a + (random & 0x1fffu);
    const fo_u32 normal = fo_select(b >= 0x47800000u, 0x7c00u, (b - 0x38000000u) >> 13);  // 65536 on: Inf
    // exact: a power-of-two scale into the normal range (the magnitude capped at the smallest normal,
    // so the conversion to an integer is in range where this case is not selected)
    const float q = fo_bits_float(a < 0x38800000u ? a : 0x38800000u) * 16777216.0f;
    const int whole = static_cast<int>(q);
    const float fraction = q - static_cast<float>(whole);  // exact
    const fo_u32 up = fo_u32(static_cast<float>(static_cast<int>(random >> 8)) * 5.9604644775390625e-08f < fraction);
    const fo_u32 finite = fo_select(a >= 0x38800000u, normal, fo_u32(whole) + up);
    return static_cast<fo_u16>(fo_select(a >= 0x7f800000u, fo_float_to_fp16(x), sign | finite));
}

// The two 16-bit formats behind one interface, for templates over the parameter's storage type.
struct Bf16Format {
    FASTOPT_HD float load(fo_u16 h) { return fo_bf16_to_float(h); }
    FASTOPT_HD fo_u16 store(float x) { return fo_float_to_bf16(x); }
    FASTOPT_HD fo_u16 store_sr(float x, fo_u32 random) { return fo_float_to_bf16_sr(x, random); }
};

struct Fp16Format {
    FASTOPT_HD float load(fo_u16 h) { return fo_fp16_to_float(h); }
    FASTOPT_HD fo_u16 store(float x) { return fo_float_to_fp16(x); }
    FASTOPT_HD fo_u16 store_sr(float x, fo_u32 random) { return fo_float_to_fp16_sr(x, random); }
};

// ------------------------------------------------------------------------------------------------
// Counter-based random bits: a pure function of (seed, step, element index), so the same element
// gets the same bits on the CPU and the GPU, for any thread count and any split into tensors/shards
// (the index is the element's position in its tensor). The mixer is a 32-bit integer hash (xor-shift /
// multiply rounds with low-bias constants); each round is a bijection, so for one key no two indices
// below 2^32 share their bits.
// ------------------------------------------------------------------------------------------------

FASTOPT_HD fo_u32 fo_mix32(fo_u32 x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

// The per-call key, computed once on the host: seed and step folded in.
FASTOPT_HD fo_u32 fo_random_key(fo_u64 seed, fo_u64 step) {
    fo_u32 h = fo_mix32(static_cast<fo_u32>(seed) ^ 0x9e3779b9u);
    h = fo_mix32(h ^ static_cast<fo_u32>(seed >> 32));
    h = fo_mix32(h ^ static_cast<fo_u32>(step));
    return fo_mix32(h ^ static_cast<fo_u32>(step >> 32));
}

FASTOPT_HD fo_u32 fo_random_bits(fo_u32 key, fo_u64 index) {
    const fo_u32 h = fo_mix32(key ^ static_cast<fo_u32>(index));
    return fo_mix32(h ^ static_cast<fo_u32>(index >> 32) ^ 0x85ebca6bu);
}

// ------------------------------------------------------------------------------------------------
// Kahan-compensated update of a 16-bit parameter (optimi's scheme): the compensation buffer c holds
// what rounding the parameter lost so far, and is added back before the next rounding, so updates far
// below half an ulp still accumulate. `p` and `c` are the stored values (widened), `p_new` the
// optimizer's float32 result computed from p. Where p_new is inf or NaN it is stored as it is, and where
// the stored param is not finite the compensation is 0: Kahan's differences of infinities would make a
// NaN of a param that overflowed (which, stored to nearest, stays inf).
// ------------------------------------------------------------------------------------------------

FASTOPT_HD bool fo_finite(float x) { return fabsf(x) <= 3.40282347e38f; }  // false for inf and NaN

template <typename Format>
FASTOPT_HD void fo_kahan_store(float p, float c, float p_new, fo_u16& p_out, fo_u16& c_out) {
    Format f;
    const float total = c + (p_new - p);  // this step's update plus what earlier steps lost
    p_out = f.store(fo_finite(p_new) ? p + total : p_new);
    const float stored = f.load(p_out);
    c_out = f.store(fo_finite(stored) ? total + (p - stored) : 0.0f);
}

// ------------------------------------------------------------------------------------------------
// Block-wise 8-bit state (Dettmers et al. 2022): each block of FO_QUANT_BLOCK consecutive elements of
// a tensor keeps one float32 absmax; an element is stored as the index of the nearest value of a
// 256-entry map of [-1, 1] (signed, first moments) or [0, 1] (unsigned, second moments). The maps
// and their 255 midpoints are built by fastopt/precision.py and handed to the kernels.
// ------------------------------------------------------------------------------------------------

#define FO_QUANT_BLOCK 256

// |x| by clearing the sign bit: -0.0 becomes +0.0 (x < 0 ? -x : x keeps -0.0, and the absmax bits
// would then differ from NumPy's abs).
FASTOPT_HD float fo_abs_bits(float x) { return fo_bits_float(fo_float_bits(x) & 0x7fffffffu); }

// The quantizer of one map, built by fastopt/precision.py (quantizer_tables): `mid`, the 255 midpoints
// between consecutive map values (ascending) then +inf (256 entries), and `bucket`, for each value of a
// float32's top 16 bits (sign, exponent, 7 fraction bits), the number of midpoints below the smallest float
// with those bits (0 for NaN patterns). No bucket holds more than one midpoint (precision.py asserts it:
// the map's relative spacing is coarser than 2^-7), so one table load and one compare find the code.
struct FoQuantizer {
    const float* mid;
    const unsigned char* bucket;
};

// The code of x / absmax: the number of midpoints below it, i.e. the nearest map value (a value exactly
// on a midpoint takes the lower code; NaN takes code 0). |normalized| <= 1 or NaN (x / max|x|), so the
// +inf pattern, which shares its bucket with NaNs, never arrives. Replaces an 8-step search over `mid`:
// 1 load and 1 compare instead of 8 dependent ones.
FASTOPT_HD unsigned char fo_quantize(float normalized, FoQuantizer q) {
    const unsigned below = q.bucket[fo_float_bits(normalized) >> 16];
    return static_cast<unsigned char>(below + unsigned(q.mid[below] < normalized));
}

FASTOPT_HD float fo_dequantize(unsigned char code, float absmax, const float* map) {
    return map[code] * absmax;
}

// Quantizes one block of n <= FO_QUANT_BLOCK float32 values (host loops; the CUDA kernels reduce the
// absmax across a block of threads and then call fo_quantize per element the same way).
FASTOPT_HD float fo_quantize_block(const float* __restrict__ x, unsigned n, FoQuantizer q,
                                   unsigned char* __restrict__ codes) {
    // The absmax as the largest |x| bit pattern: non-negative floats order as their bits do, and every
    // NaN pattern lies above +inf, so a NaN anywhere makes the absmax NaN. An integer max vectorizes; a
    // float compare-select chain would not (its NaN rule is not associative for the compiler).
    fo_u32 top = 0;
    for (unsigned i = 0; i < n; ++i) {
        const fo_u32 b = fo_float_bits(x[i]) & 0x7fffffffu;
        top = b > top ? b : top;
    }
    const float absmax = fo_bits_float(top);
    const float scale = absmax > 0.0f ? absmax : 1.0f;  // an all-zero block: every code is zero's
    // the divisions first, in their own loop: they vectorize there; inside the table loop (which does
    // not) each is a scalar divide, and the divider's throughput bounded the whole quantizer
    float normalized[FO_QUANT_BLOCK];
    for (unsigned i = 0; i < n; ++i) normalized[i] = x[i] / scale;
    for (unsigned i = 0; i < n; ++i) codes[i] = fo_quantize(normalized[i], q);
    return absmax;
}

// The float32 values of n codes of one block (restrict: the compilers vectorize the table gather).
FASTOPT_HD void fo_dequantize_block(const unsigned char* __restrict__ codes, unsigned n, float absmax,
                                    const float* __restrict__ map, float* __restrict__ out) {
    for (unsigned i = 0; i < n; ++i) out[i] = fo_dequantize(codes[i], absmax, map);
}

}  // namespace fastopt
