// How the CPU loops load an array's elements into their math type and store them back, one element at a time
// (inside the vectorized loops) or a block at a time (the staged loops: cpu_loops.hpp run_staged and the
// 8-bit state loops), and the Kahan-compensated store of a block of 16-bit params.
#pragma once

#include <stdint.h>

#include "platform.hpp"  // FASTOPT_INLINE
#include "../cuda/precision.cuh"  // 16-bit loads and round-to-nearest-even stores
#include "f16_simd.hpp"  // float16 blocks with F16C (same bits)
#include "bf16_simd.hpp"  // bfloat16 stores of blocks with AVX512_BF16 (same bits)

namespace fastopt {
namespace cpu {

// How an array's elements are loaded into the math type M and stored back. Plain<T>: a float32 or
// float64 array (a plain conversion; with M == T none at all, so these loops compile to what they were
// before 16-bit storage existed). Bf16 / F16: 16-bit storage widened exactly to float32 and stored with
// round-to-nearest-even by precision.cuh's software conversions (the same bits as fastopt/precision.py
// and the GPU).
// widen_block / narrow_block: a staged block (run_staged) to float32 and back, by the same conversions
// (F16: F16C where the CPU has it, f16_simd.hpp; Bf16's stores: AVX512_BF16, bf16_simd.hpp; same bits).
template <typename T>
struct Plain {
    typedef T type;
    template <typename M>
    FASTOPT_INLINE M load(T x) { return M(x); }
    template <typename M>
    FASTOPT_INLINE T store(M x) { return T(x); }
    FASTOPT_INLINE void widen_block(const T* src, float* dst, int64_t n) {
        for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i]);
    }
    FASTOPT_INLINE void narrow_block(const float* src, T* dst, int64_t n) {
        for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
    }
};

struct Bf16 {
    typedef fo_u16 type;
    typedef Bf16Format Format;
    template <typename M>
    FASTOPT_INLINE M load(fo_u16 x) { return M(fo_bf16_to_float(x)); }
    template <typename M>
    FASTOPT_INLINE fo_u16 store(M x) { return fo_float_to_bf16(float(x)); }
    FASTOPT_INLINE void widen_block(const fo_u16* src, float* dst, int64_t n) {
        for (int64_t i = 0; i < n; ++i) dst[i] = fo_bf16_to_float(src[i]);
    }
    FASTOPT_INLINE void narrow_block(const float* src, fo_u16* dst, int64_t n) { float_to_bf16_block(src, dst, n); }
};

struct F16 {
    typedef fo_u16 type;
    typedef Fp16Format Format;
    template <typename M>
    FASTOPT_INLINE M load(fo_u16 x) { return M(fo_fp16_to_float(x)); }
    template <typename M>
    FASTOPT_INLINE fo_u16 store(M x) { return fo_float_to_fp16(float(x)); }
    FASTOPT_INLINE void widen_block(const fo_u16* src, float* dst, int64_t n) { fp16_to_float_block(src, dst, n); }
    FASTOPT_INLINE void narrow_block(const float* src, fo_u16* dst, int64_t n) { float_to_fp16_block(src, dst, n); }
};

// fo_kahan_store over a block of 16-bit params p and their compensation c (both rewritten), from the updated
// float32 params p_new (overwritten; old and total: float32 scratch), by whole-block conversions (F16C,
// AVX512_BF16 where the CPU has them: two stores and two loads per element, which in software cost more than
// an Adam update). The same float32 operations in the same order as fo_kahan_store, so the same bits.
template <class PS>
FASTOPT_INLINE void kahan_store_block(typename PS::type* __restrict p, typename PS::type* __restrict c,
                                      float* __restrict p_new, float* __restrict old, float* __restrict total,
                                      int64_t n) {
    PS::widen_block(p, old, n);
    PS::widen_block(c, total, n);
    for (int64_t i = 0; i < n; ++i) {
        total[i] = total[i] + (p_new[i] - old[i]);  // this step's update plus what earlier steps lost
        p_new[i] = fo_finite(p_new[i]) ? old[i] + total[i] : p_new[i];  // inf and NaN stored as they are
    }
    PS::narrow_block(p_new, p, n);
    PS::widen_block(p, p_new, n);  // the value stored
    for (int64_t i = 0; i < n; ++i) p_new[i] = fo_finite(p_new[i]) ? total[i] + (old[i] - p_new[i]) : 0.0f;
    PS::narrow_block(p_new, c, n);
}

}  // namespace cpu
}  // namespace fastopt
