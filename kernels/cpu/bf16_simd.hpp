// float32 -> bfloat16 conversion of whole blocks with AVX512_BF16 (vcvtneps2bf16), for the staged stores of
// bfloat16 params (cpu_loops.hpp: run_staged's Kahan and rounded stores, the 8-bit state loops): the same bits
// as precision.cuh's software fo_float_to_bf16.
//
// Why: the software rounding is about nine vector instructions per 16 elements, on the two ports that also run
// the update's arithmetic; the instruction converts 16 in one. A bfloat16 Kahan store converts twice per element.
//
// The bits: both round to nearest even and store a NaN as its top 16 bits with the quiet bit set; the
// instruction flushes a float32 subnormal to a signed zero where the software rounds it (to a bfloat16
// subnormal or zero), so a group of 16 holding a subnormal takes the software conversion.
// tests/test_bf16_simd.py compares the two on every float32.
//
// Compiled with a target attribute and chosen at run time (cpu_has_avx512_bf16), so a portable build uses it
// where the CPU has it (Intel since Cooper Lake, AMD since Zen 4) and the software loop elsewhere; off x86-64,
// without GCC/clang, or without target attributes (FASTOPT_NO_CLONES) only the software loop exists.
#pragma once

#include <stdint.h>

#include "platform.hpp"
#include "../cuda/precision.cuh"

#if !defined(FASTOPT_NO_CLONES) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define FASTOPT_BF16_SIMD 1
#include <immintrin.h>
#else
#define FASTOPT_BF16_SIMD 0
#endif

namespace fastopt {
namespace cpu {

#if FASTOPT_BF16_SIMD

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16"))) static void float_to_bf16_avx512(
    const float* src, fo_u16* dst, int64_t n) {
    enum { SUBNORMAL = 0x20 };  // vfpclassps category: denormal
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(src + i);
        if (_mm512_fpclass_ps_mask(x, SUBNORMAL) != 0) {
            for (int k = 0; k < 16; ++k) dst[i + k] = fo_float_to_bf16(src[i + k]);  // a subnormal in the group
        } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(x));
        }
    }
    for (; i < n; ++i) dst[i] = fo_float_to_bf16(src[i]);
}

static bool cpu_has_avx512_bf16() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512bf16");
    return has;
}

#endif

// dst[i] = fo_float_to_bf16(src[i]), i < n
static inline void float_to_bf16_block(const float* src, fo_u16* dst, int64_t n) {
#if FASTOPT_BF16_SIMD
    if (cpu_has_avx512_bf16()) {
        float_to_bf16_avx512(src, dst, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = fo_float_to_bf16(src[i]);
}

}  // namespace cpu
}  // namespace fastopt
