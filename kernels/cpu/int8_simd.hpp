// The 8-bit state codec of the CPU loops with AVX-512: the quantizer of one 256-block (precision.cuh
// fo_quantize_block) in arithmetic, and the dequantizer (fo_dequantize_block) as byte-table lookups.
//
// Quantizer. fo_quantize looks each element's code up in two tables (the bucket of its top 16 bits,
// then one midpoint); the compilers keep that loop scalar, and it bounded the whole 8-bit step (measured on
// one core: 1.1 ns per element and state, of 3.2 ns for a whole Adam step). Gathers do not help (on this
// project's AMD EPYC two 16-lane gathers cost 1.0 ns per element), so the code is computed instead:
//
// The dynamic map (fastopt/precision.py _maps) holds, at decimal exponent E = 0 .. EMAX, the values
// 10^-E * (0.1 + 0.9 * k / 2^f) for k = 1 .. 2^f (f = FMAX - E), then zero. For a magnitude a in decade E,
// (10^-(E+1), 10^-E], the position u = (a * 10^E - 0.1) * 2^f / 0.9 puts the map's values at the integers
// (k = 0: the top value of decade E + 1) and the midpoints half-way between them, so the nearest value is
// k = ceil(u - 0.5) and its code a per-decade offset plus k. The midpoints the tables hold are float32
// roundings of those half-way points, and float32 arithmetic rounds u too (a takes |x| * (1 / absmax), one
// more rounding than the division): where u - 0.5 lies within 2^-10 of an integer (a few elements in 1000;
// every midpoint and so every tie lands there) the element takes the table lookup (fo_quantize) on the exact
// quotient instead. Below the smallest nonzero value the code is one compare of the exact quotient with the
// table's first boundary above zero's code. So the codes are fo_quantize's, bit for bit: tests/test_int8_simd.py
// compares the two on every float32 in [-1, 1], NaN and -0.0 included.
//
// Compiled with a target attribute and chosen at run time (Int8Codec below), so a portable
// build uses it where the CPU has AVX-512 (F, BW, VL, DQ) and the scalar loop elsewhere; off x86-64, without
// GCC/clang, or without target_clones support (FASTOPT_NO_CLONES) only the scalar loop exists. A map other
// than the one described above fails the self-check (arith_quantizer) and takes the scalar loop.
#pragma once

#include <math.h>
#include <string.h>

#include <cmath>

#include "platform.hpp"
#include "../cuda/precision.cuh"

#if !defined(FASTOPT_NO_CLONES) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define FASTOPT_QUANTIZE_AVX512 1
#include <immintrin.h>
#if !defined(__clang__)
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*, which its own -Wuninitialized
// then reports in every caller (a known false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define FASTOPT_QUANTIZE_AVX512 0
#endif

namespace fastopt {
namespace cpu {

#if FASTOPT_QUANTIZE_AVX512

// The per-decade constants of one map (signed: first moments, 127 magnitudes; unsigned: 255).
struct ArithQuantizer {
    float scale[16], offset[16];  // a * scale[E] - offset[E] = u - 0.5 + (values in the decades below E)
    float threshold[16];          // threshold[i] = 10^-i (i = 1 .. emax): a <= it means decade >= i
    // the decade from the binary exponent: a in [2^-b, 2^(1-b)) (b = 127 - exponent bits, capped at 31) is in
    // decade binade_decade[b], or one more where a <= binade_threshold[b] (the one 10^-i inside, else -1)
    int binade_decade[32];
    float binade_threshold[32];
    float low_mid;                // the table's boundary above zero's code: the midpoint to 1e-6 (signed);
                                  // 0 (unsigned: a positive value never takes zero's code)
    int emax;
    bool is_signed, ok;
};

enum { ARITH_MARGIN_SHIFT = 10 };  // lanes with u - 0.5 within 2^-10 of an integer take the table lookup
static const float ARITH_MARGIN = 1.0f / (1 << ARITH_MARGIN_SHIFT);

// The decade E of a magnitude a in [0, 1] (emax for everything below 10^-emax).
static int arith_decade(const ArithQuantizer& aq, float a) {
    const int exponent = static_cast<int>(fo_float_bits(a) >> 23);
    const int b = 127 - exponent < 0 ? 0 : (127 - exponent < 31 ? 127 - exponent : 31);
    return aq.binade_decade[b] + (a <= aq.binade_threshold[b]);
}

// The magnitude index (0 = zero, 1 .. 127 or 255 ascending) of a in [0, 1] and whether it is too close to a
// midpoint to trust: the scalar twin of the vector loop, for the self-check.
static int arith_magnitude(const ArithQuantizer& aq, float a, bool negative, bool* ambiguous) {
    const int e = arith_decade(aq, a);
    *ambiguous = false;
    if (e == aq.emax) return negative ? (a >= aq.low_mid && a > 0.0f) : a > aq.low_mid;
    const float t = a * aq.scale[e] - aq.offset[e];
    *ambiguous = fabsf(t - nearbyintf(t)) < ARITH_MARGIN;
    return static_cast<int>(ceilf(t));
}

static int arith_code(const ArithQuantizer& aq, float x, bool* ambiguous) {
    const bool positive = x > 0.0f;
    const int j = arith_magnitude(aq, fo_abs_bits(x), !positive, ambiguous);
    return !aq.is_signed ? j : (positive ? 128 + j : 127 - j);
}

// Builds the constants of the map whose midpoints are q.mid, and checks them against it: every midpoint must
// fall in the ambiguous margin (so ties and near-ties take the table), and a point between two midpoints must
// get the code the table gives. Any mismatch (another map) leaves ok false: the scalar loop runs.
static ArithQuantizer arith_quantizer(FoQuantizer q) {
    ArithQuantizer aq = {};
    aq.is_signed = q.mid[0] < 0.0f;
    aq.emax = aq.is_signed ? 6 : 7;  // precision.py _maps: 7 (signed, per sign) or 8 bits
    const int fmax = aq.emax;
    int below = 0;  // nonzero values in the decades below E
    for (int e = aq.emax; e >= 0; --e) {
        const double steps = std::ldexp(1.0, fmax - e);
        aq.scale[e] = static_cast<float>(std::pow(10.0, e) * steps / 0.9);
        aq.offset[e] = static_cast<float>(0.1 * steps / 0.9 + 0.5 - below);
        below += static_cast<int>(steps);
        if (e > 0) aq.threshold[e] = static_cast<float>(std::pow(10.0, -e));
    }
    for (int b = 0; b < 32; ++b) {  // binade [2^-b, 2^(1-b)); the last one also holds everything below
        const double low = std::ldexp(1.0, -b), high = std::ldexp(1.0, 1 - b);
        aq.binade_decade[b] = 0;
        aq.binade_threshold[b] = -1.0f;
        for (int i = 1; i <= aq.emax; ++i) {
            if (aq.threshold[i] >= high) aq.binade_decade[b] += 1;
            else if (aq.threshold[i] >= low) aq.binade_threshold[b] = aq.threshold[i];
        }
        if (b == 31) aq.binade_decade[b] = aq.emax, aq.binade_threshold[b] = -1.0f;
    }
    aq.low_mid = aq.is_signed ? q.mid[128] : q.mid[0];
    aq.ok = below == (aq.is_signed ? 127 : 255);
    for (int c = 0; c + 1 < 255 && aq.ok; ++c) {
        const float m = q.mid[c], next = q.mid[c + 1];
        if (aq.is_signed && (c == 126 || c == 127 || c == 128)) continue;  // around the two zeros: compares
        if (!aq.is_signed && c == 0) continue;
        bool ambiguous;
        arith_code(aq, m, &ambiguous);
        const float inside = 0.5f * (m + next);
        bool inside_ambiguous;
        const int code = arith_code(aq, inside, &inside_ambiguous);
        aq.ok = (ambiguous || fo_abs_bits(m) <= aq.threshold[aq.emax]) && !inside_ambiguous && code == fo_quantize(inside, q);
    }
    return aq;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) static float quantize_block_avx512(
    const float* __restrict__ x, unsigned n, FoQuantizer q, const ArithQuantizer& aq, unsigned char* __restrict__ codes) {
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    // the absmax: the largest |x| bit pattern (NaN above +inf), as fo_quantize_block
    __m512i top = _mm512_setzero_si512();
    unsigned i = 0;
    for (; i + 16 <= n; i += 16)
        top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_loadu_si512(x + i), magnitude));
    fo_u32 top_bits = _mm512_reduce_max_epu32(top);
    for (; i < n; ++i) {
        const fo_u32 b = fo_float_bits(x[i]) & 0x7fffffffu;
        top_bits = b > top_bits ? b : top_bits;
    }
    const float absmax = fo_bits_float(top_bits);
    const float scale_value = absmax > 0.0f ? absmax : 1.0f;  // an all-zero block: every code is zero's
    const __m512 scale = _mm512_set1_ps(scale_value);
    const __m512 decade_scale = _mm512_loadu_ps(aq.scale), decade_offset = _mm512_loadu_ps(aq.offset);
    const __m512i binade_decade0 = _mm512_loadu_si512(aq.binade_decade),
                  binade_decade1 = _mm512_loadu_si512(aq.binade_decade + 16);
    const __m512 binade_threshold0 = _mm512_loadu_ps(aq.binade_threshold),
                 binade_threshold1 = _mm512_loadu_ps(aq.binade_threshold + 16);
    // |x| / absmax as |x| * (1 / absmax): the code needs it only to the margin (one more rounding, at most
    // 2^-22 relative: 6e-5 of a position below 256, a quarter of the margin), the divider's throughput would
    // bound the loop; where the exact quotient matters (the compare with the smallest midpoint, the lanes
    // the table decides) it is divided exactly
    const __m512 inverse = _mm512_set1_ps(1.0f / scale_value);
    const __m512 margin = _mm512_set1_ps(ARITH_MARGIN), low_mid = _mm512_set1_ps(aq.low_mid);
    const __m512 one_f = _mm512_set1_ps(1.0f), zero_f = _mm512_setzero_ps();
    const __m512i one = _mm512_set1_epi32(1), emax = _mm512_set1_epi32(aq.emax);
    const __m512i exponent_one = _mm512_set1_epi32(127), last_binade = _mm512_set1_epi32(31);
    i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        const __m512i a_bits = _mm512_and_si512(_mm512_castps_si512(_mm512_mul_ps(xv, inverse)), magnitude);
        const __m512 a = _mm512_castsi512_ps(a_bits);
        __mmask16 positive = _mm512_cmp_ps_mask(xv, zero_f, _CMP_GT_OQ);  // x / absmax > 0 (not underflowed)
        // the table decides NaN, |x| / absmax > 1 (a block whose absmax is NaN is scaled by 1; or the product's
        // rounding) and, for the unsigned map, negative values
        __mmask16 rare = _mm512_cmp_ps_mask(a, one_f, _CMP_NLE_UQ);
        if (!aq.is_signed) rare |= _mm512_cmp_ps_mask(xv, zero_f, _CMP_LT_OQ);
        // the decade: from the binade (exponent bits), plus one where a 10^-i inside it is >= a (near a decade's
        // edge either decade gives the same code: the edge is a map value, not a midpoint)
        const __m512i b = _mm512_min_epi32(_mm512_sub_epi32(exponent_one, _mm512_srli_epi32(a_bits, 23)), last_binade);
        const __m512 inside = _mm512_permutex2var_ps(binade_threshold0, b, binade_threshold1);
        __m512i e = _mm512_permutex2var_epi32(binade_decade0, b, binade_decade1);
        e = _mm512_mask_add_epi32(e, _mm512_cmp_ps_mask(a, inside, _CMP_LE_OQ), e, one);
        const __m512 t = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_permutexvar_ps(e, decade_scale)),
                                       _mm512_permutexvar_ps(e, decade_offset));
        __m512i j = _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
        const __m512 off = _mm512_sub_ps(t, _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m512 off_abs = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(off), magnitude));
        const __mmask16 lowest = _mm512_cmp_epi32_mask(e, emax, _MM_CMPINT_EQ);
        if (lowest) {  // below the smallest nonzero value: past the first boundary, on the exact quotient (a tie
                       // goes to the lower code: the larger magnitude for a negative x; the unsigned map's
                       // boundary is 0, so any positive quotient takes code 1 and +-0 code 0)
            const __m512 quotient = _mm512_div_ps(xv, scale);
            const __m512 exact = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(quotient), magnitude));
            // a quotient that underflowed to zero (or x / Inf) is zero's code, not a positive one's
            positive = (positive & ~lowest) | (_mm512_cmp_ps_mask(quotient, zero_f, _CMP_GT_OQ) & lowest);
            const __mmask16 above_low =
                (_mm512_cmp_ps_mask(exact, low_mid, _CMP_GT_OQ) & positive) |
                (_mm512_cmp_ps_mask(exact, low_mid, _CMP_GE_OQ) & _mm512_cmp_ps_mask(exact, zero_f, _CMP_GT_OQ) &
                 ~positive);
            j = _mm512_mask_blend_epi32(lowest, j, _mm512_maskz_mov_epi32(above_low, one));
        }
        rare |= _mm512_cmp_ps_mask(off_abs, margin, _CMP_LT_OQ) & ~lowest;  // near a midpoint
        __m512i code = j;
        if (aq.is_signed)
            code = _mm512_mask_blend_epi32(positive, _mm512_sub_epi32(_mm512_set1_epi32(127), j),
                                           _mm512_add_epi32(_mm512_set1_epi32(128), j));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(code));
        for (unsigned left = rare; left; left &= left - 1) {  // the table, on the exact quotient
            const unsigned lane = static_cast<unsigned>(__builtin_ctz(left));
            codes[i + lane] = fo_quantize(x[i + lane] / scale_value, q);
        }
    }
    for (; i < n; ++i) codes[i] = fo_quantize(x[i] / scale_value, q);
    return absmax;
}

// Dequantizer. map[code] * absmax, 64 codes at a time: each of the four bytes of the 256 map values is a
// 256-byte table, looked up with two 128-entry byte permutes (VBMI) and a select on the code's top bit; the
// four byte planes are then interleaved into floats. The unpack instructions interleave within 128-bit
// lanes, so the codes are first permuted (a 4 x 4 transpose of 4-byte groups) for the floats to come out
// in order. The same float32 product as fo_dequantize.
struct DequantPlanes {
    unsigned char plane[4][256];  // byte b of map[code]'s bits
};

static const unsigned char* dequant_order() {
    // position 16L + 4k + r of the permuted codes holds code 16k + 4L + r
    static const struct Order {
        unsigned char at[64];
        Order() {
            for (int lane = 0; lane < 4; ++lane)
                for (int k = 0; k < 4; ++k)
                    for (int r = 0; r < 4; ++r) at[16 * lane + 4 * k + r] = static_cast<unsigned char>(16 * k + 4 * lane + r);
        }
    } order;
    return order.at;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi"))) static void dequantize_block_avx512(
    const unsigned char* __restrict__ codes, unsigned n, float absmax, const DequantPlanes& t, const float* map,
    float* __restrict__ out) {
    const __m512i order = _mm512_loadu_si512(dequant_order());
    const __m512 scale = _mm512_set1_ps(absmax);
    __m512i quarter[4][4];  // quarter[b][h]: byte b of the values of codes 64h .. 64h + 63
    for (int b = 0; b < 4; ++b)
        for (int h = 0; h < 4; ++h) quarter[b][h] = _mm512_loadu_si512(t.plane[b] + 64 * h);
    unsigned i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes + i));
        const __mmask64 top = _mm512_movepi8_mask(c);
        __m512i byte[4];
        for (int b = 0; b < 4; ++b) {
            // the permutes read the low 7 bits of each code: codes below 128, then the same from 128 on
            const __m512i below = _mm512_permutex2var_epi8(quarter[b][0], c, quarter[b][1]);
            const __m512i above = _mm512_permutex2var_epi8(quarter[b][2], c, quarter[b][3]);
            byte[b] = _mm512_mask_blend_epi8(top, below, above);
        }
        const __m512i w01_lo = _mm512_unpacklo_epi8(byte[0], byte[1]), w01_hi = _mm512_unpackhi_epi8(byte[0], byte[1]);
        const __m512i w23_lo = _mm512_unpacklo_epi8(byte[2], byte[3]), w23_hi = _mm512_unpackhi_epi8(byte[2], byte[3]);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01_lo, w23_lo)), scale));
        _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01_lo, w23_lo)), scale));
        _mm512_storeu_ps(out + i + 32, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01_hi, w23_hi)), scale));
        _mm512_storeu_ps(out + i + 48, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01_hi, w23_hi)), scale));
    }
    for (; i < n; ++i) out[i] = fo_dequantize(codes[i], absmax, map);
}

static bool cpu_has_avx512() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return has;
}

static bool cpu_has_avx512_vbmi() {
    static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi");
    return has;
}

// The prepared tables of one map, kept per thread (the parallel loops take no lock) and rebuilt when a
// table with other contents arrives (the two maps are fixed, so in practice built once per thread and map).
struct CodecCache {
    float map[256], mid[256];
    ArithQuantizer aq;
    DequantPlanes planes;
    bool valid;
};

static const CodecCache& codec_tables(const float* map, FoQuantizer q) {
    static thread_local CodecCache cache[2];
    CodecCache& c = cache[q.mid[0] < 0.0f ? 0 : 1];
    if (!c.valid || memcmp(c.map, map, sizeof c.map) != 0 || memcmp(c.mid, q.mid, sizeof c.mid) != 0) {
        memcpy(c.map, map, sizeof c.map);
        memcpy(c.mid, q.mid, sizeof c.mid);
        c.aq = arith_quantizer(q);
        for (int code = 0; code < 256; ++code)
            for (int b = 0; b < 4; ++b) c.planes.plane[b][code] = static_cast<unsigned char>(fo_float_bits(map[code]) >> (8 * b));
        c.valid = true;
    }
    return c;
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// One 8-bit state's codec for a chunk: its map and quantizer, and the SIMD tables where this CPU runs them.
struct Int8Codec {
    const float* map;
    FoQuantizer q;
#if FASTOPT_QUANTIZE_AVX512
    const ArithQuantizer* aq;     // null: the scalar quantizer
    const DequantPlanes* planes;  // null: the scalar dequantizer
#endif
};

static inline Int8Codec int8_codec(const float* map, FoQuantizer q) {
    Int8Codec codec;
    codec.map = map;
    codec.q = q;
#if FASTOPT_QUANTIZE_AVX512
    codec.aq = 0;
    codec.planes = 0;
    if (cpu_has_avx512()) {
        const CodecCache& c = codec_tables(map, q);
        codec.aq = c.aq.ok ? &c.aq : 0;
        codec.planes = cpu_has_avx512_vbmi() ? &c.planes : 0;
    }
#endif
    return codec;
}

// fo_quantize_block's absmax and codes, by the fastest loop this CPU runs.
static inline float codec_quantize_block(const Int8Codec& codec, const float* __restrict__ x, unsigned n,
                                         unsigned char* __restrict__ codes) {
#if FASTOPT_QUANTIZE_AVX512
    if (codec.aq) return quantize_block_avx512(x, n, codec.q, *codec.aq, codes);
#endif
    return fo_quantize_block(x, n, codec.q, codes);
}

// fo_dequantize_block's values, by the fastest loop this CPU runs.
static inline void codec_dequantize_block(const Int8Codec& codec, const unsigned char* __restrict__ codes,
                                          unsigned n, float absmax, float* __restrict__ out) {
#if FASTOPT_QUANTIZE_AVX512
    if (codec.planes) return dequantize_block_avx512(codes, n, absmax, *codec.planes, codec.map, out);
#endif
    fo_dequantize_block(codes, n, absmax, codec.map, out);
}

}  // namespace cpu
}  // namespace fastopt
