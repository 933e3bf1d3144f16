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

enum { DTYPE_F32 = 0, DTYPE_F64 = 1 };

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

template <typename T>
struct Ptrs {
    T* __restrict p;
    const T* __restrict g;
    T* __restrict s0;
    T* __restrict s1;
    T* __restrict s2;
};

// Every elementwise family: the functor the CUDA kernels run (kernels/cuda/<family>.cuh, ops.cuh) with
// math type T, over one contiguous chunk. Unused state slots (Op::USED) are neither read nor written.
template <typename T, class Op>
FASTOPT_INLINE void cpu_loop(Ptrs<T> a, int64_t n, const double* s) {
    const Op op = {load_params<typename Op::P, T>(s)};  // a const aggregate: the scalars stay in registers
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict s0 = a.s0;
    T* __restrict s1 = a.s1;
    T* __restrict s2 = a.s2;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], x0 = T(0), x1 = T(0), x2 = T(0);
        if (Op::USED & 1) x0 = s0[i];
        if (Op::USED & 2) x1 = s1[i];
        if (Op::USED & 4) x2 = s2[i];
        op(pi, g[i], x0, x1, x2);
        p[i] = pi;
        if (Op::USED & 1) s0[i] = x0;
        if (Op::USED & 2) s1[i] = x1;
        if (Op::USED & 4) s2[i] = x2;
    }
}

// Two-phase families, phase 1: the states, and the squared norms of p and of the update, per LANES
// accumulators.
template <typename T, class F>
FASTOPT_INLINE void two_phase_moments_loop(Ptrs<T> a, int64_t n, const double* s, double* acc) {
    typedef typename F::template Params<T> P;
    const P h = load_params<P, T>(s);
    const T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict m = a.s0;
    T* __restrict v = a.s1;
    double pp[LANES] = {0}, uu[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int j = 0; j < LANES; ++j) {
            T mi = m[i + j], vi = v[i + j];
            double pi = double(p[i + j]);
            double u = double(F::moments(p[i + j], g[i + j], mi, vi, h));
            m[i + j] = mi;
            v[i + j] = vi;
            pp[j] += pi * pi;
            uu[j] += u * u;
        }
    }
    for (int j = 0; i < n; ++i, ++j) {
        T mi = m[i], vi = v[i];
        double pi = double(p[i]);
        double u = double(F::moments(p[i], g[i], mi, vi, h));
        m[i] = mi;
        v[i] = vi;
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
template <typename T, class F>
FASTOPT_INLINE void two_phase_apply_loop(Ptrs<T> a, int64_t n, const double* s, double scaled_lr) {
    typedef typename F::template Params<T> P;
    const P h = load_params<P, T>(s);
    const T lr = T(scaled_lr);
    T* __restrict p = a.p;
    const T* __restrict m = a.s0;
    const T* __restrict v = a.s1;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i];
        F::apply(pi, m[i], v[i], h, lr);
        p[i] = pi;
    }
}

// Same memory traffic as an optimizer with NS states, trivial math: the bandwidth ceiling. p is read
// and written, or only read when P_READ_ONLY (LAMB's first phase).
template <typename T, int NS, bool P_READ_ONLY>
FASTOPT_INLINE void touch_loop(Ptrs<T> a, int64_t n) {
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict s0 = a.s0;
    T* __restrict s1 = a.s1;
    T* __restrict s2 = a.s2;
    for (int64_t i = 0; i < n; ++i) {
        T gi = P_READ_ONLY ? g[i] + p[i] : g[i];
        if (!P_READ_ONLY) p[i] = p[i] + gi;
        if (NS > 0) s0[i] = s0[i] + gi;
        if (NS > 1) s1[i] = s1[i] + gi;
        if (NS > 2) s2[i] = s2[i] + gi;
    }
}

template <typename T>
FASTOPT_INLINE void touch_apply_loop(Ptrs<T> a, int64_t n) {
    T* __restrict p = a.p;
    const T* __restrict s0 = a.s0;
    const T* __restrict s1 = a.s1;
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] + (s0[i] + s1[i]);
}

template <typename T>
FASTOPT_INLINE int run_chunk_typed(int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                                   double coef, double* acc) {
    Ptrs<T> a = {static_cast<T*>(ptrs[0]), static_cast<const T*>(ptrs[1]), static_cast<T*>(ptrs[2]),
                 static_cast<T*>(ptrs[3]), static_cast<T*>(ptrs[4])};
    switch (kind) {
#define FASTOPT_TWO_PHASE_CASES(I, FAMILY, PARAMS)                                                  \
    case KIND_TWO_PHASE + 2 * (I): two_phase_moments_loop<T, FAMILY##_two_phase>(a, n, s, acc); return 0; \
    case KIND_TWO_PHASE + 2 * (I) + 1: two_phase_apply_loop<T, FAMILY##_two_phase>(a, n, s, coef); return 0;
        FASTOPT_TWO_PHASE_FAMILIES(FASTOPT_TWO_PHASE_CASES)
#undef FASTOPT_TWO_PHASE_CASES
        case KIND_TOUCH:
            switch (variant) {  // number of states, + 4 when p is only read
                case 0: touch_loop<T, 0, false>(a, n); return 0;
                case 1: touch_loop<T, 1, false>(a, n); return 0;
                case 2: touch_loop<T, 2, false>(a, n); return 0;
                case 3: touch_loop<T, 3, false>(a, n); return 0;
                case 6: touch_loop<T, 2, true>(a, n); return 0;
            }
            return -1;
        case KIND_TOUCH_APPLY: touch_apply_loop<T>(a, n); return 0;
    }
    if (kind < 0 || kind >= FASTOPT_FAMILY_COUNT || variant < 0 || variant > 255) return -1;
    switch (kind * 256 + variant) {  // every (family, variant) of the generated table
#define FASTOPT_CPU_CASE(K, FAMILY, OP, V) \
    case (K) * 256 + (V): cpu_loop<T, OP<T, V> >(a, n, s); return 0;
        FASTOPT_UPDATE_VARIANTS(FASTOPT_CPU_CASE)
#undef FASTOPT_CPU_CASE
    }
    return -1;
}

// One chunk of one tensor: ptrs = {p, g, state0, state1, state2} (unused ones NULL). Returns -1 for an
// unknown kind/variant (validated in Python before any write, so never in practice).
FASTOPT_CLONES int run_chunk(int dtype, int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                             double coef, double* acc) {
    if (dtype == DTYPE_F32) return run_chunk_typed<float>(kind, variant, ptrs, n, s, coef, acc);
    return run_chunk_typed<double>(kind, variant, ptrs, n, s, coef, acc);
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

FASTOPT_CLONES double sumsq(int dtype, const void* x, int64_t n) {
    if (dtype == DTYPE_F32) return sumsq_typed<float>(static_cast<const float*>(x), n);
    return sumsq_typed<double>(static_cast<const double*>(x), n);
}

template <typename T>
FASTOPT_INLINE void scale_typed(T* __restrict x, int64_t n, T c) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] * c;
}

FASTOPT_CLONES void scale(int dtype, void* x, int64_t n, double c) {
    if (dtype == DTYPE_F32)
        scale_typed<float>(static_cast<float*>(x), n, float(c));
    else
        scale_typed<double>(static_cast<double*>(x), n, c);
}

template <typename T>
FASTOPT_INLINE void clamp_typed(T* __restrict x, int64_t n, T c) {
    for (int64_t i = 0; i < n; ++i) x[i] = clamp_math<T>(x[i], c);
}

FASTOPT_CLONES void clamp(int dtype, void* x, int64_t n, double c) {
    if (dtype == DTYPE_F32)
        clamp_typed<float>(static_cast<float*>(x), n, float(c));
    else
        clamp_typed<double>(static_cast<double*>(x), n, c);
}

}  // namespace cpu
}  // namespace fastopt
