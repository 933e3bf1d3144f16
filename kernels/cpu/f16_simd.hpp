// float16 <-> float32 conversion of whole blocks with F16C (vcvtph2ps / vcvtps2ph), for the staged loops of
// float16 params (cpu_loops.hpp run_staged): the same bits as precision.cuh's software conversions.
//
// Why: an Adam step on float16 params with float32 state spent 1.05 ns per element on one AVX-512 core with
// the software conversions inlined in the loop (float32 params: 0.29), so two threads were compute-bound at
// 0.62-0.67 of the memory ceiling; F16C converts 8 elements per instruction (0.06 ns per element).
//
// The bits: both round to nearest even (the rounding is given explicitly, whatever MXCSR says), with fp16's
// subnormals, and overflow to Inf from 65520 on; float32 subnormals become zero either way. They differ on
// NaN payloads (the hardware sets the quiet bit and keeps the top payload bits; the software keeps an fp16
// signaling NaN signaling, and stores every float32 NaN as the quiet 0x7e00), so a group of 8 holding an
// fp16 Inf/NaN exponent (load) or a float32 NaN (store) takes the software conversion instead.
// tests/test_f16_simd.py compares the two on every float16 and every float32.
//
// Compiled with a target attribute and chosen at run time (cpu_has_f16c), so a portable build uses it where
// the CPU has AVX2 and F16C and the software loop elsewhere; off x86-64, without GCC/clang, or without
// target attributes (FASTOPT_NO_CLONES) only the software loop exists.
#pragma once

#include <stdint.h>

#include "platform.hpp"
#include "../cuda/precision.cuh"

#if !defined(FASTOPT_NO_CLONES) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define FASTOPT_F16C 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define FASTOPT_F16C 0
#endif

namespace fastopt {
namespace cpu {

#if FASTOPT_F16C

__attribute__((target("avx2,f16c"))) static void fp16_to_float_f16c(const fo_u16* src, float* dst, int64_t n) {
    const __m128i exponent = _mm_set1_epi16(0x7c00);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        if (_mm_movemask_epi8(_mm_cmpeq_epi16(_mm_and_si128(h, exponent), exponent)) != 0) {
            for (int k = 0; k < 8; ++k) dst[i + k] = fo_fp16_to_float(src[i + k]);  // Inf/NaN in the group
        } else {
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
        }
    }
    for (; i < n; ++i) dst[i] = fo_fp16_to_float(src[i]);
}

__attribute__((target("avx2,f16c"))) static void float_to_fp16_f16c(const float* src, fo_u16* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(src + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0) {
            for (int k = 0; k < 8; ++k) dst[i + k] = fo_float_to_fp16(src[i + k]);  // NaN in the group
        } else {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                             _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }
    for (; i < n; ++i) dst[i] = fo_float_to_fp16(src[i]);
}

// AVX2 (with the OS's support for its registers) and F16C (CPUID leaf 1, ECX bit 29: clang 14's
// __builtin_cpu_supports does not know "f16c")
static bool cpu_has_f16c() {
    static const bool has = [] {
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        return __builtin_cpu_supports("avx2") && __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
    }();
    return has;
}

#endif

// dst[i] = fo_fp16_to_float(src[i]), i < n
static inline void fp16_to_float_block(const fo_u16* src, float* dst, int64_t n) {
#if FASTOPT_F16C
    if (cpu_has_f16c()) {
        fp16_to_float_f16c(src, dst, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = fo_fp16_to_float(src[i]);
}

// dst[i] = fo_float_to_fp16(src[i]), i < n
static inline void float_to_fp16_block(const float* src, fo_u16* dst, int64_t n) {
#if FASTOPT_F16C
    if (cpu_has_f16c()) {
        float_to_fp16_f16c(src, dst, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = fo_float_to_fp16(src[i]);
}

}  // namespace cpu
}  // namespace fastopt
