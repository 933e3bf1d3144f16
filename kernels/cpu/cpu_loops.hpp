// CPU element loops over one contiguous chunk. The per-element math comes from kernels/cuda/*.cuh
// (the same functors the CUDA kernels run: one generic cpu_loop for every elementwise family of the
// generated table kernels/cuda/families.cuh); the loops add restrict pointers so compilers vectorize them, and
// runtime ISA dispatch (target_clones: AVX-512, AVX2, baseline) so a portable build still uses the
// wide units; where target_clones is unavailable (see platform.hpp) the loops are plain, portable C++.
// The parallel loop over chunks lives in _cpu_fast.pyx.
#pragma once
#include <stdint.h>

#include "platform.hpp"  // FASTOPT_CLONES, FASTOPT_INLINE: compiler/arch checks

#include "../cuda/clip.cuh"
#include "../cuda/precision.cuh"  // 16-bit loads and round-to-nearest-even stores
#include "../cuda/families.cuh"  // generated from the registry: every family, its variants, the two-phase ones

namespace fastopt {
namespace cpu {

// Kernel kinds. The elementwise families are 0 .. FASTOPT_FAMILY_COUNT - 1, their positions in the
// generated table (families.cuh, from fastopt/specs.py); then two kinds per two-phase family (its phase
// 1 at KIND_TWO_PHASE + 2 * index, phase 2 next); then the bandwidth-ceiling kernels. The Cython module
// reads the tables (FAMILY_VARIANTS, TWO_PHASE_NAMES) for its names.
enum Kind {
    KIND_TWO_PHASE = FASTOPT_FAMILY_COUNT,
    // bandwidth ceiling: p, s0.. read+written, g read (variant = number of states)
    KIND_TOUCH = FASTOPT_FAMILY_COUNT + 2 * FASTOPT_TWO_PHASE_COUNT,
    KIND_TOUCH_APPLY,  // bandwidth ceiling of LAMB's phase 2: p read+written, s0, s1 read
};

// Storage dtypes of an array, and the layout of one call: the dtypes of its params, grads and states
// (LAYOUT(p, g, s)). float32 and float64 calls keep one dtype for everything (layouts 0 and 21); 16-bit
// params (bfloat16, float16) take grads in their own dtype or float32 and keep float32 state, with
// float32 math (docs: DESIGN.md, "Precision"). A state dtype of its own (state_dtype=) is a new S here.
enum { DTYPE_F32 = 0, DTYPE_F64 = 1, DTYPE_BF16 = 2, DTYPE_F16 = 3 };
#define FASTOPT_LAYOUT(P, G, S) ((P) | ((G) << 2) | ((S) << 4))
enum {
    LAYOUT_F32 = FASTOPT_LAYOUT(DTYPE_F32, DTYPE_F32, DTYPE_F32),
    LAYOUT_F64 = FASTOPT_LAYOUT(DTYPE_F64, DTYPE_F64, DTYPE_F64),
    LAYOUT_BF16 = FASTOPT_LAYOUT(DTYPE_BF16, DTYPE_BF16, DTYPE_F32),
    LAYOUT_BF16_F32G = FASTOPT_LAYOUT(DTYPE_BF16, DTYPE_F32, DTYPE_F32),
    LAYOUT_F16 = FASTOPT_LAYOUT(DTYPE_F16, DTYPE_F16, DTYPE_F32),
    LAYOUT_F16_F32G = FASTOPT_LAYOUT(DTYPE_F16, DTYPE_F32, DTYPE_F32),
};

// How an array's elements are loaded into the math type M and stored back. Plain<T>: a float32 or
// float64 array (a plain conversion; with M == T none at all, so these loops compile to what they were
// before 16-bit storage existed). Bf16 / F16: 16-bit storage widened exactly to float32 and stored with
// round-to-nearest-even by precision.cuh's software conversions (the same bits as fastopt/precision.py
// and the GPU).
template <typename T>
struct Plain {
    typedef T type;
    template <typename M>
    FASTOPT_INLINE M load(T x) { return M(x); }
    template <typename M>
    FASTOPT_INLINE T store(M x) { return T(x); }
};

struct Bf16 {
    typedef fo_u16 type;
    template <typename M>
    FASTOPT_INLINE M load(fo_u16 x) { return M(fo_bf16_to_float(x)); }
    template <typename M>
    FASTOPT_INLINE fo_u16 store(M x) { return fo_float_to_bf16(float(x)); }
};

struct F16 {
    typedef fo_u16 type;
    template <typename M>
    FASTOPT_INLINE M load(fo_u16 x) { return M(fo_fp16_to_float(x)); }
    template <typename M>
    FASTOPT_INLINE fo_u16 store(M x) { return fo_float_to_fp16(float(x)); }
};

// Number of independent accumulators of the reductions: fixed, so the summation order (and the result)
// is the same for every ISA clone and thread count.
enum { LANES = 16 };

// The family table as data, for the Cython module: one row per compiled (kind, family, variant).
struct FamilyVariant {
    int kind;
    const char* family;
    int variant;
};
#define FASTOPT_FAMILY_ROW(K, FAMILY, OP, V) {K, #FAMILY, V},
static const FamilyVariant FAMILY_VARIANTS[] = {FASTOPT_UPDATE_VARIANTS(FASTOPT_FAMILY_ROW)};
#undef FASTOPT_FAMILY_ROW
static const int FAMILY_VARIANT_COUNT = int(sizeof(FAMILY_VARIANTS) / sizeof(FAMILY_VARIANTS[0]));

#define FASTOPT_TWO_PHASE_NAME(I, FAMILY, PARAMS) #FAMILY,
static const char* const TWO_PHASE_NAMES[] = {FASTOPT_TWO_PHASE_FAMILIES(FASTOPT_TWO_PHASE_NAME) nullptr};
#undef FASTOPT_TWO_PHASE_NAME
static const int TWO_PHASE_COUNT = FASTOPT_TWO_PHASE_COUNT;

// A two-phase family's math (<family>.cuh) behind one name, for the generic loops below: phase 1
// updates the two states and returns the update direction, phase 2 steps p by lr * trust ratio.
#define FASTOPT_TWO_PHASE_MATH(I, FAMILY, PARAMS)                                                   \
    struct FAMILY##_two_phase {                                                                     \
        template <typename M>                                                                       \
        using Params = PARAMS<M>;                                                                   \
        template <typename M>                                                                       \
        FASTOPT_INLINE M moments(M p, M g, M& a, M& b, const PARAMS<M>& h) {                        \
            return FAMILY##_moments_math<M>(p, g, a, b, h);                                         \
        }                                                                                           \
        template <typename M>                                                                       \
        FASTOPT_INLINE void apply(M& p, M a, M b, const PARAMS<M>& h, M scaled_lr) {                \
            FAMILY##_apply_math<M>(p, a, b, h, scaled_lr);                                          \
        }                                                                                           \
    };
FASTOPT_TWO_PHASE_FAMILIES(FASTOPT_TWO_PHASE_MATH)
#undef FASTOPT_TWO_PHASE_MATH

// lr * trust ratio of one tensor of two-phase family `index`, from its two norms (float64, as every
// backend computes it); 0 for an unknown index (checked by the caller before any write).
static inline double two_phase_scaled_lr(int index, double lr, double param_norm, double update_norm) {
    switch (index) {
#define FASTOPT_TWO_PHASE_TRUST(I, FAMILY, PARAMS) \
    case I: return lr * FAMILY##_trust_ratio<double>(param_norm, update_norm);
        FASTOPT_TWO_PHASE_FAMILIES(FASTOPT_TWO_PHASE_TRUST)
#undef FASTOPT_TWO_PHASE_TRUST
    }
    return 0.0;
}

// The pointers of one chunk, typed by storage: PS params, GS grads, SS states.
template <class PS, class GS, class SS>
struct Ptrs {
    typename PS::type* __restrict p;
    const typename GS::type* __restrict g;
    typename SS::type* __restrict s0;
    typename SS::type* __restrict s1;
    typename SS::type* __restrict s2;
};

// Every elementwise family: the functor the CUDA kernels run (kernels/cuda/<family>.cuh, ops.cuh) with
// math type M, over one contiguous chunk. Unused state slots (Op::USED) are neither read nor written.
template <typename M, class PS, class GS, class SS, class Op>
FASTOPT_INLINE void cpu_loop(Ptrs<PS, GS, SS> a, int64_t n, const double* s) {
    const Op op = {load_params<typename Op::P, M>(s)};  // a const aggregate: the scalars stay in registers
    typename PS::type* __restrict p = a.p;
    const typename GS::type* __restrict g = a.g;
    typename SS::type* __restrict s0 = a.s0;
    typename SS::type* __restrict s1 = a.s1;
    typename SS::type* __restrict s2 = a.s2;
    for (int64_t i = 0; i < n; ++i) {
        M pi = PS::template load<M>(p[i]), x0 = M(0), x1 = M(0), x2 = M(0);
        if (Op::USED & 1) x0 = SS::template load<M>(s0[i]);
        if (Op::USED & 2) x1 = SS::template load<M>(s1[i]);
        if (Op::USED & 4) x2 = SS::template load<M>(s2[i]);
        op(pi, GS::template load<M>(g[i]), x0, x1, x2);
        p[i] = PS::template store<M>(pi);
        if (Op::USED & 1) s0[i] = SS::template store<M>(x0);
        if (Op::USED & 2) s1[i] = SS::template store<M>(x1);
        if (Op::USED & 4) s2[i] = SS::template store<M>(x2);
    }
}

// Two-phase families, phase 1: the states, and the squared norms of p and of the update, per LANES
// accumulators.
template <typename M, class PS, class GS, class SS, class F>
FASTOPT_INLINE void two_phase_moments_loop(Ptrs<PS, GS, SS> a, int64_t n, const double* s, double* acc) {
    typedef typename F::template Params<M> P;
    const P h = load_params<P, M>(s);
    const typename PS::type* __restrict p = a.p;
    const typename GS::type* __restrict g = a.g;
    typename SS::type* __restrict m = a.s0;
    typename SS::type* __restrict v = a.s1;
    double pp[LANES] = {0}, uu[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int j = 0; j < LANES; ++j) {
            M mi = SS::template load<M>(m[i + j]), vi = SS::template load<M>(v[i + j]);
            M pm = PS::template load<M>(p[i + j]);
            double pi = double(pm);
            double u = double(F::moments(pm, GS::template load<M>(g[i + j]), mi, vi, h));
            m[i + j] = SS::template store<M>(mi);
            v[i + j] = SS::template store<M>(vi);
            pp[j] += pi * pi;
            uu[j] += u * u;
        }
    }
    for (int j = 0; i < n; ++i, ++j) {
        M mi = SS::template load<M>(m[i]), vi = SS::template load<M>(v[i]);
        M pm = PS::template load<M>(p[i]);
        double pi = double(pm);
        double u = double(F::moments(pm, GS::template load<M>(g[i]), mi, vi, h));
        m[i] = SS::template store<M>(mi);
        v[i] = SS::template store<M>(vi);
        pp[j] += pi * pi;
        uu[j] += u * u;
    }
    double sp = 0, su = 0;
    for (int j = 0; j < LANES; ++j) {
        sp += pp[j];
        su += uu[j];
    }
    acc[0] = sp;
    acc[1] = su;
}

// Phase 2: p stepped by this tensor's lr * trust ratio.
template <typename M, class PS, class GS, class SS, class F>
FASTOPT_INLINE void two_phase_apply_loop(Ptrs<PS, GS, SS> a, int64_t n, const double* s, double scaled_lr) {
    typedef typename F::template Params<M> P;
    const P h = load_params<P, M>(s);
    const M lr = M(scaled_lr);
    typename PS::type* __restrict p = a.p;
    const typename SS::type* __restrict m = a.s0;
    const typename SS::type* __restrict v = a.s1;
    for (int64_t i = 0; i < n; ++i) {
        M pi = PS::template load<M>(p[i]);
        F::apply(pi, SS::template load<M>(m[i]), SS::template load<M>(v[i]), h, lr);
        p[i] = PS::template store<M>(pi);
    }
}

// Same memory traffic as an optimizer with NS states, trivial math: the bandwidth ceiling. p is read
// and written, or only read when P_READ_ONLY (LAMB's first phase). The arithmetic is on the stored
// values as numbers (a 16-bit pattern is added as an integer): only the traffic matters.
// x as a value of type T for the ceiling kernels (a plain conversion; a float's top 16 bits as a 16-bit
// pattern, since converting an arbitrary float to an integer type is undefined)
template <typename T>
struct TouchCast {
    template <typename X>
    FASTOPT_INLINE T of(X x) { return T(x); }
};
template <>
struct TouchCast<fo_u16> {
    FASTOPT_INLINE fo_u16 of(fo_u16 x) { return x; }
    FASTOPT_INLINE fo_u16 of(float x) { return fo_u16(fo_float_bits(x) >> 16); }
};

template <class PS, class GS, class SS, int NS, bool P_READ_ONLY>
FASTOPT_INLINE void touch_loop(Ptrs<PS, GS, SS> a, int64_t n) {
    typedef typename PS::type TP;
    typedef typename SS::type TS;
    TP* __restrict p = a.p;
    const typename GS::type* __restrict g = a.g;
    TS* __restrict s0 = a.s0;
    TS* __restrict s1 = a.s1;
    TS* __restrict s2 = a.s2;
    for (int64_t i = 0; i < n; ++i) {
        TS gi = P_READ_ONLY ? TS(g[i]) + TS(p[i]) : TS(g[i]);
        if (!P_READ_ONLY) p[i] = TP(p[i] + TouchCast<TP>::of(g[i]));
        if (NS > 0) s0[i] = s0[i] + gi;
        if (NS > 1) s1[i] = s1[i] + gi;
        if (NS > 2) s2[i] = s2[i] + gi;
    }
}

template <class PS, class GS, class SS>
FASTOPT_INLINE void touch_apply_loop(Ptrs<PS, GS, SS> a, int64_t n) {
    typedef typename PS::type TP;
    TP* __restrict p = a.p;
    const typename SS::type* __restrict s0 = a.s0;
    const typename SS::type* __restrict s1 = a.s1;
    for (int64_t i = 0; i < n; ++i) p[i] = TP(p[i] + TouchCast<TP>::of(s0[i] + s1[i]));
}

template <typename M, class PS, class GS, class SS>
FASTOPT_INLINE int run_chunk_typed(int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                                   double coef, double* acc) {
    Ptrs<PS, GS, SS> a = {static_cast<typename PS::type*>(ptrs[0]), static_cast<const typename GS::type*>(ptrs[1]),
                          static_cast<typename SS::type*>(ptrs[2]), static_cast<typename SS::type*>(ptrs[3]),
                          static_cast<typename SS::type*>(ptrs[4])};
    switch (kind) {
#define FASTOPT_TWO_PHASE_CASES(I, FAMILY, PARAMS)                                                  \
    case KIND_TWO_PHASE + 2 * (I): two_phase_moments_loop<M, PS, GS, SS, FAMILY##_two_phase>(a, n, s, acc); return 0; \
    case KIND_TWO_PHASE + 2 * (I) + 1: two_phase_apply_loop<M, PS, GS, SS, FAMILY##_two_phase>(a, n, s, coef); return 0;
        FASTOPT_TWO_PHASE_FAMILIES(FASTOPT_TWO_PHASE_CASES)
#undef FASTOPT_TWO_PHASE_CASES
        case KIND_TOUCH:
            switch (variant) {  // number of states, + 4 when p is only read
                case 0: touch_loop<PS, GS, SS, 0, false>(a, n); return 0;
                case 1: touch_loop<PS, GS, SS, 1, false>(a, n); return 0;
                case 2: touch_loop<PS, GS, SS, 2, false>(a, n); return 0;
                case 3: touch_loop<PS, GS, SS, 3, false>(a, n); return 0;
                case 6: touch_loop<PS, GS, SS, 2, true>(a, n); return 0;
            }
            return -1;
        case KIND_TOUCH_APPLY: touch_apply_loop<PS, GS, SS>(a, n); return 0;
    }
    if (kind < 0 || kind >= FASTOPT_FAMILY_COUNT || variant < 0 || variant > 255) return -1;
    switch (kind * 256 + variant) {  // every (family, variant) of the generated table
#define FASTOPT_CPU_CASE(K, FAMILY, OP, V) \
    case (K) * 256 + (V): cpu_loop<M, PS, GS, SS, OP<M, V> >(a, n, s); return 0;
        FASTOPT_UPDATE_VARIANTS(FASTOPT_CPU_CASE)
#undef FASTOPT_CPU_CASE
    }
    return -1;
}

// One chunk of one tensor: ptrs = {p, g, state0, state1, state2} (unused ones NULL). Returns -1 for an
// unknown kind/variant (validated in Python before any write, so never in practice).
FASTOPT_CLONES int run_chunk(int layout, int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                             double coef, double* acc) {
    typedef Plain<float> F32;
    typedef Plain<double> F64;
    switch (layout) {
        case LAYOUT_F32: return run_chunk_typed<float, F32, F32, F32>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_F64: return run_chunk_typed<double, F64, F64, F64>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_BF16: return run_chunk_typed<float, Bf16, Bf16, F32>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_BF16_F32G: return run_chunk_typed<float, Bf16, F32, F32>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_F16: return run_chunk_typed<float, F16, F16, F32>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_F16_F32G: return run_chunk_typed<float, F16, F32, F32>(kind, variant, ptrs, n, s, coef, acc);
    }
    return -1;
}

// ---- clipping and norms ----

template <typename T>
FASTOPT_INLINE double sumsq_typed(const T* __restrict x, int64_t n) {
    double acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; ++j) {
            double xi = double(x[i + j]);
            acc[j] += xi * xi;
        }
    for (int j = 0; i < n; ++i, ++j) {
        double xi = double(x[i]);
        acc[j] += xi * xi;
    }
    double total = 0;
    for (int j = 0; j < LANES; ++j) total += acc[j];
    return total;
}

template <class S>
FASTOPT_INLINE double sumsq_16(const fo_u16* __restrict x, int64_t n) {
    double acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; ++j) {
            double xi = S::template load<double>(x[i + j]);
            acc[j] += xi * xi;
        }
    for (int j = 0; i < n; ++i, ++j) {
        double xi = S::template load<double>(x[i]);
        acc[j] += xi * xi;
    }
    double total = 0;
    for (int j = 0; j < LANES; ++j) total += acc[j];
    return total;
}

FASTOPT_CLONES double sumsq(int dtype, const void* x, int64_t n) {
    if (dtype == DTYPE_F32) return sumsq_typed<float>(static_cast<const float*>(x), n);
    if (dtype == DTYPE_BF16) return sumsq_16<Bf16>(static_cast<const fo_u16*>(x), n);
    if (dtype == DTYPE_F16) return sumsq_16<F16>(static_cast<const fo_u16*>(x), n);
    return sumsq_typed<double>(static_cast<const double*>(x), n);
}

template <typename T>
FASTOPT_INLINE void scale_typed(T* __restrict x, int64_t n, T c) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] * c;
}

// 16-bit arrays: float32 math, stored with round-to-nearest-even
template <class S>
FASTOPT_INLINE void scale_16(fo_u16* __restrict x, int64_t n, float c) {
    for (int64_t i = 0; i < n; ++i) x[i] = S::template store<float>(S::template load<float>(x[i]) * c);
}

FASTOPT_CLONES void scale(int dtype, void* x, int64_t n, double c) {
    if (dtype == DTYPE_F32)
        scale_typed<float>(static_cast<float*>(x), n, float(c));
    else if (dtype == DTYPE_BF16)
        scale_16<Bf16>(static_cast<fo_u16*>(x), n, float(c));
    else if (dtype == DTYPE_F16)
        scale_16<F16>(static_cast<fo_u16*>(x), n, float(c));
    else
        scale_typed<double>(static_cast<double*>(x), n, c);
}

template <typename T>
FASTOPT_INLINE void clamp_typed(T* __restrict x, int64_t n, T c) {
    for (int64_t i = 0; i < n; ++i) x[i] = clamp_math<T>(x[i], c);
}

template <class S>
FASTOPT_INLINE void clamp_16(fo_u16* __restrict x, int64_t n, float c) {
    for (int64_t i = 0; i < n; ++i) x[i] = S::template store<float>(clamp_math<float>(S::template load<float>(x[i]), c));
}

FASTOPT_CLONES void clamp(int dtype, void* x, int64_t n, double c) {
    if (dtype == DTYPE_F32)
        clamp_typed<float>(static_cast<float*>(x), n, float(c));
    else if (dtype == DTYPE_BF16)
        clamp_16<Bf16>(static_cast<fo_u16*>(x), n, float(c));
    else if (dtype == DTYPE_F16)
        clamp_16<F16>(static_cast<fo_u16*>(x), n, float(c));
    else
        clamp_typed<double>(static_cast<double*>(x), n, c);
}

}  // namespace cpu
}  // namespace fastopt
