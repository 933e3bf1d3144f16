// CPU element loops over one contiguous chunk. The per-element math comes from kernels/cuda/*.cuh
// (the same functors the CUDA kernels run: one generic cpu_loop for every elementwise family of the
// generated table kernels/cuda/families.cuh); the loops add restrict pointers so compilers vectorize them, and
// runtime ISA dispatch (target_clones: AVX-512, AVX2, baseline) so a portable build still uses the
// wide units; where target_clones is unavailable (see platform.hpp) the loops are plain, portable C++.
// The parallel loop over chunks lives in _cpu_fast.pyx.
#pragma once
#include <stdint.h>

#include <type_traits>

#include "platform.hpp"  // FASTOPT_CLONES, FASTOPT_INLINE: compiler/arch checks

#include "../cuda/clip.cuh"
#include "../cuda/precision.cuh"  // 16-bit loads and round-to-nearest-even stores
#include "../cuda/families.cuh"  // generated from the registry: every family, its variants, the two-phase ones
#include "int8_simd.hpp"  // the 8-bit state codec with AVX-512 (same bits as precision.cuh's)
#include "storage.hpp"  // Plain / Bf16 / F16: elements and blocks to float32 and back; the Kahan store of a block

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

// Storage dtypes of an array, and the layout of one call: the dtypes of its params, grads and states, and
// how the new param value is stored (LAYOUT(p, g, s) | rounding << 6). float32 and float64 calls keep one
// dtype for everything (layouts 0 and 21); 16-bit params (bfloat16, float16) take grads in their own dtype
// or float32; the state (state_dtype=) is float32, or 16 bits: bfloat16/float16 for float32 params, the
// params' own dtype for 16-bit params. Math is float32 for all of them (docs: DESIGN.md, "Precision").
// The new param of a 16-bit param is stored rounded to nearest even, or with a Kahan compensation buffer
// (kahan=True: its own pointer, ptrs[5]), or stochastically (random bits of (key, element index)).
//
// Compiled directly (every family instantiated): the layouts below with ROUND_NEAREST (bfloat16 params with
// bfloat16 state too: the all-bf16 case people train with). Every other valid layout (float16 params with
// float16 state, and Kahan or stochastic rounding) is STAGED: the params (and
// grads) of a block of STAGE elements are widened into float32 buffers on the stack, the direct float32
// loop of the same state dtype runs on them, and the new params are stored back by the rounding mode.
// Same bits as a direct loop (the same float32 values in, the same math), without compiling every family
// again per mode; the buffers stay in L1, so memory traffic is still one pass.
enum { DTYPE_F32 = 0, DTYPE_F64 = 1, DTYPE_BF16 = 2, DTYPE_F16 = 3 };
enum { ROUND_NEAREST = 0, ROUND_KAHAN = 1, ROUND_STOCHASTIC = 2 };
#define FASTOPT_LAYOUT(P, G, S) ((P) | ((G) << 2) | ((S) << 4))
enum {
    LAYOUT_F32 = FASTOPT_LAYOUT(DTYPE_F32, DTYPE_F32, DTYPE_F32),
    LAYOUT_F64 = FASTOPT_LAYOUT(DTYPE_F64, DTYPE_F64, DTYPE_F64),
    LAYOUT_F32_BF16S = FASTOPT_LAYOUT(DTYPE_F32, DTYPE_F32, DTYPE_BF16),
    LAYOUT_F32_F16S = FASTOPT_LAYOUT(DTYPE_F32, DTYPE_F32, DTYPE_F16),
    LAYOUT_BF16 = FASTOPT_LAYOUT(DTYPE_BF16, DTYPE_BF16, DTYPE_F32),
    LAYOUT_BF16_F32G = FASTOPT_LAYOUT(DTYPE_BF16, DTYPE_F32, DTYPE_F32),
    LAYOUT_F16 = FASTOPT_LAYOUT(DTYPE_F16, DTYPE_F16, DTYPE_F32),
    LAYOUT_F16_F32G = FASTOPT_LAYOUT(DTYPE_F16, DTYPE_F32, DTYPE_F32),
    LAYOUT_BF16_BF16S = FASTOPT_LAYOUT(DTYPE_BF16, DTYPE_BF16, DTYPE_BF16),
    LAYOUT_BF16_F32G_BF16S = FASTOPT_LAYOUT(DTYPE_BF16, DTYPE_F32, DTYPE_BF16),
};
// Elements per staged block: 2 x 16 KiB of float32 on the stack, in L1/L2. Long enough blocks keep the
// hardware prefetchers streaming (measured at 1e7 on one thread: 1024-element blocks ran bf16 params with
// bf16 state at 2x the time of a direct loop).
// Elements staged at a time: the float32 buffers of one stage (p and g, or the five of the 8-bit path: 20 KiB)
// stay in the L1 cache across the widen, update and store passes; 4096 (32-80 KiB) went through L2 on each.
enum { STAGE = 1024 };

// The storage struct of a dtype code (the states of the staged layouts).
template <int D>
struct SS_of;
template <>
struct SS_of<DTYPE_F32> {
    typedef Plain<float> type;
};
template <>
struct SS_of<DTYPE_BF16> {
    typedef Bf16 type;
};
template <>
struct SS_of<DTYPE_F16> {
    typedef F16 type;
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
    typename PS::type* __restrict c;  // the Kahan compensation (kahan=True), else NULL
};

// Every elementwise family: the functor the CUDA kernels run (kernels/cuda/<family>.cuh, ops.cuh) with
// math type M, over one contiguous chunk. Unused state slots (Op::USED) are neither read nor written. The
// fourth state (Adan's) is ptrs[6], after the Kahan compensation, read only by a functor with USED bit 8:
// the other families compile as they did with three slots.
template <typename M, class PS, class GS, class SS, class Op>
FASTOPT_INLINE void cpu_loop(Ptrs<PS, GS, SS> a, void* const* ptrs, int64_t n, const double* s, double coef) {
    // a const aggregate: the scalars stay in registers; coef: the tensor's number (LARS), if the functor reads one
    const Op op = fo_make_op<Op, M>(load_params<typename Op::P, M>(s), M(coef));
    typename PS::type* __restrict p = a.p;
    const typename GS::type* __restrict g = a.g;
    typename SS::type* __restrict s0 = a.s0;
    typename SS::type* __restrict s1 = a.s1;
    typename SS::type* __restrict s2 = a.s2;
    typename SS::type* __restrict s3 = (Op::USED & 8) ? static_cast<typename SS::type*>(ptrs[6]) : 0;
    for (int64_t i = 0; i < n; ++i) {
        M pi = PS::template load<M>(p[i]), x0 = M(0), x1 = M(0), x2 = M(0), x3 = M(0);
        if (Op::USED & 1) x0 = SS::template load<M>(s0[i]);
        if (Op::USED & 2) x1 = SS::template load<M>(s1[i]);
        if (Op::USED & 4) x2 = SS::template load<M>(s2[i]);
        if (Op::USED & 8) x3 = SS::template load<M>(s3[i]);
        fo_op_call(op, pi, GS::template load<M>(g[i]), x0, x1, x2, x3);
        p[i] = PS::template store<M>(pi);
        if (Op::USED & 1) s0[i] = SS::template store<M>(x0);
        if (Op::USED & 2) s1[i] = SS::template store<M>(x1);
        if (Op::USED & 4) s2[i] = SS::template store<M>(x2);
        if (Op::USED & 8) s3[i] = SS::template store<M>(x3);
    }
}

// Two-phase families, phase 1: the states, and the squared norms of p and of the update, added to LANES
// accumulators each (acc[0..LANES) for p, acc[LANES..2 LANES) for the update; the caller zeroes them and
// sums them in lane order). Element i of a chunk goes to lane i % LANES except the last n % LANES, which
// go to lanes 0, 1, ...: a staged chunk, run in blocks of STAGE (a multiple of LANES) on the same lanes,
// adds in exactly the same order.
template <typename M, class PS, class GS, class SS, class F>
FASTOPT_INLINE void two_phase_moments_loop(Ptrs<PS, GS, SS> a, int64_t n, const double* s, double* acc) {
    typedef typename F::template Params<M> P;
    const P h = load_params<P, M>(s);
    const typename PS::type* __restrict p = a.p;
    const typename GS::type* __restrict g = a.g;
    typename SS::type* __restrict m = a.s0;
    typename SS::type* __restrict v = a.s1;
    double pp[LANES], uu[LANES];
    for (int j = 0; j < LANES; ++j) {
        pp[j] = acc[j];
        uu[j] = acc[LANES + j];
    }
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
    for (int j = 0; j < LANES; ++j) {
        acc[j] = pp[j];
        acc[LANES + j] = uu[j];
    }
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

template <class PS, class GS, class SS, int NS, bool P_READ_ONLY, bool COMP = false>
FASTOPT_INLINE void touch_loop(Ptrs<PS, GS, SS> a, int64_t n, typename SS::type* s3_ = 0) {
    typedef typename PS::type TP;
    typedef typename SS::type TS;
    TP* __restrict p = a.p;
    const typename GS::type* __restrict g = a.g;
    TS* __restrict s0 = a.s0;
    TS* __restrict s1 = a.s1;
    TS* __restrict s2 = a.s2;
    TS* __restrict s3 = s3_;  // the fourth state (ptrs[6]), NS == 4 only
    TP* __restrict c = a.c;
    for (int64_t i = 0; i < n; ++i) {
        TS gi = P_READ_ONLY ? TS(TouchCast<TS>::of(g[i]) + TouchCast<TS>::of(p[i])) : TouchCast<TS>::of(g[i]);
        if (!P_READ_ONLY) p[i] = TP(p[i] + TouchCast<TP>::of(g[i]));
        if (NS > 0) s0[i] = TS(s0[i] + gi);
        if (NS > 1) s1[i] = TS(s1[i] + gi);
        if (NS > 2) s2[i] = TS(s2[i] + gi);
        if (NS > 3) s3[i] = TS(s3[i] + gi);
        if (COMP) c[i] = TP(c[i] + TouchCast<TP>::of(g[i]));  // Kahan: the compensation read and written
    }
}

template <class PS, class GS, class SS>
FASTOPT_INLINE void touch_apply_loop(Ptrs<PS, GS, SS> a, int64_t n) {
    typedef typename PS::type TP;
    TP* __restrict p = a.p;
    const typename SS::type* __restrict s0 = a.s0;
    const typename SS::type* __restrict s1 = a.s1;
    typedef typename SS::type TS;
    for (int64_t i = 0; i < n; ++i) p[i] = TP(p[i] + TouchCast<TP>::of(TS(s0[i] + s1[i])));
}

template <class PS, class GS, class SS>
FASTOPT_INLINE Ptrs<PS, GS, SS> typed_ptrs(void* const* ptrs) {
    Ptrs<PS, GS, SS> a = {static_cast<typename PS::type*>(ptrs[0]), static_cast<const typename GS::type*>(ptrs[1]),
                          static_cast<typename SS::type*>(ptrs[2]), static_cast<typename SS::type*>(ptrs[3]),
                          static_cast<typename SS::type*>(ptrs[4]), static_cast<typename PS::type*>(ptrs[5])};
    return a;
}

// The bandwidth-ceiling kernels of any layout (variant = number of states, 0 to 4 (the fourth at ptrs[6]);
// 6: two states with p only read; a Kahan layout also reads and writes the compensation).
template <class PS, class GS, class SS, bool COMP>
FASTOPT_INLINE int run_touch(int kind, int variant, void* const* ptrs, int64_t n) {
    Ptrs<PS, GS, SS> a = typed_ptrs<PS, GS, SS>(ptrs);
    if (kind == KIND_TOUCH_APPLY) {
        touch_apply_loop<PS, GS, SS>(a, n);
        return 0;
    }
    switch (variant) {
        case 0: touch_loop<PS, GS, SS, 0, false, COMP>(a, n); return 0;
        case 1: touch_loop<PS, GS, SS, 1, false, COMP>(a, n); return 0;
        case 2: touch_loop<PS, GS, SS, 2, false, COMP>(a, n); return 0;
        case 3: touch_loop<PS, GS, SS, 3, false, COMP>(a, n); return 0;
        case 4: touch_loop<PS, GS, SS, 4, false, COMP>(a, n, static_cast<typename SS::type*>(ptrs[6])); return 0;
        case 6: touch_loop<PS, GS, SS, 2, true, false>(a, n); return 0;
    }
    return -1;
}

template <typename M, class PS, class GS, class SS>
FASTOPT_INLINE int run_chunk_typed(int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                                   double coef, double* acc) {
    Ptrs<PS, GS, SS> a = typed_ptrs<PS, GS, SS>(ptrs);
    switch (kind) {
#define FASTOPT_TWO_PHASE_CASES(I, FAMILY, PARAMS)                                                  \
    case KIND_TWO_PHASE + 2 * (I): two_phase_moments_loop<M, PS, GS, SS, FAMILY##_two_phase>(a, n, s, acc); return 0; \
    case KIND_TWO_PHASE + 2 * (I) + 1: two_phase_apply_loop<M, PS, GS, SS, FAMILY##_two_phase>(a, n, s, coef); return 0;
        FASTOPT_TWO_PHASE_FAMILIES(FASTOPT_TWO_PHASE_CASES)
#undef FASTOPT_TWO_PHASE_CASES
    }
    if (kind < 0 || kind >= FASTOPT_FAMILY_COUNT || variant < 0 || variant > 255) return -1;
    switch (kind * 256 + variant) {  // every (family, variant) of the generated table
#define FASTOPT_CPU_CASE(K, FAMILY, OP, V) \
    case (K) * 256 + (V): cpu_loop<M, PS, GS, SS, OP<M, V> >(a, ptrs, n, s, coef); return 0;
        FASTOPT_UPDATE_VARIANTS(FASTOPT_CPU_CASE)
#undef FASTOPT_CPU_CASE
    }
    return -1;
}

FASTOPT_CLONES int run_chunk(int layout, int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                             double coef, double* acc, fo_u32 key, fo_u64 index0);

// The staged layouts (P, PS, G, GS, SD): 16-bit params and their storage, the grads' dtype and storage, the
// state dtype; each with any rounding mode.
#define FASTOPT_STAGED_LAYOUTS(X)                   \
    X(DTYPE_BF16, Bf16, DTYPE_BF16, Bf16, DTYPE_F32)  \
    X(DTYPE_BF16, Bf16, DTYPE_F32, F32, DTYPE_F32)    \
    X(DTYPE_BF16, Bf16, DTYPE_BF16, Bf16, DTYPE_BF16) \
    X(DTYPE_BF16, Bf16, DTYPE_F32, F32, DTYPE_BF16)   \
    X(DTYPE_F16, F16, DTYPE_F16, F16, DTYPE_F32)      \
    X(DTYPE_F16, F16, DTYPE_F32, F32, DTYPE_F32)      \
    X(DTYPE_F16, F16, DTYPE_F16, F16, DTYPE_F16)      \
    X(DTYPE_F16, F16, DTYPE_F32, F32, DTYPE_F16)

// The ceiling kernels (KIND_TOUCH, KIND_TOUCH_APPLY) of every layout, by storage (the compensation read and
// written under ROUND_KAHAN): a function of their own, called first thing by run_chunk, rather than branches
// inside its layouts, where GCC's static branch prediction took some of them for cold and left their loops
// scalar (measured: the staged layouts' ceilings at about 20 GB/s on two threads, half the bandwidth of the same
// traffic elsewhere, so that a Kahan Adam step ran "faster than its ceiling")
FASTOPT_CLONES int run_touch_layout(int layout, int kind, int variant, void* const* ptrs, int64_t n) {
    typedef Plain<float> F32;  // as in run_chunk
    typedef Plain<double> F64;
    switch (layout) {
        case LAYOUT_F32: return run_touch<F32, F32, F32, false>(kind, variant, ptrs, n);
        case LAYOUT_F64: return run_touch<F64, F64, F64, false>(kind, variant, ptrs, n);
        case LAYOUT_F32_BF16S: return run_touch<F32, F32, Bf16, false>(kind, variant, ptrs, n);
        case LAYOUT_F32_F16S: return run_touch<F32, F32, F16, false>(kind, variant, ptrs, n);
        case LAYOUT_BF16: return run_touch<Bf16, Bf16, F32, false>(kind, variant, ptrs, n);
        case LAYOUT_BF16_F32G: return run_touch<Bf16, F32, F32, false>(kind, variant, ptrs, n);
        case LAYOUT_F16: return run_touch<F16, F16, F32, false>(kind, variant, ptrs, n);
        case LAYOUT_F16_F32G: return run_touch<F16, F32, F32, false>(kind, variant, ptrs, n);
        case LAYOUT_BF16_BF16S: return run_touch<Bf16, Bf16, Bf16, false>(kind, variant, ptrs, n);
        case LAYOUT_BF16_F32G_BF16S: return run_touch<Bf16, F32, Bf16, false>(kind, variant, ptrs, n);
    }
    const int mode = layout >> 6, base = layout & 63;
    if (mode > ROUND_STOCHASTIC) return -1;
#define FASTOPT_STAGED_TOUCH(P, PS, G, GS, SD)                                               \
    if (base == FASTOPT_LAYOUT(P, G, SD))                                                   \
        return mode == ROUND_KAHAN ? run_touch<PS, GS, typename SS_of<SD>::type, true>(kind, variant, ptrs, n) \
                                   : run_touch<PS, GS, typename SS_of<SD>::type, false>(kind, variant, ptrs, n);
    FASTOPT_STAGED_LAYOUTS(FASTOPT_STAGED_TOUCH)
#undef FASTOPT_STAGED_TOUCH
    return -1;
}

// A staged layout (see LAYOUT above): PS/GS the 16-bit params' and grads' storage, SS the state's (float32 or
// the params' own), MODE the rounding of the new params. Blocks of STAGE elements: p (and g) widened into
// float32 buffers, the direct float32 layout of the same state dtype run on them (run_chunk, not inlined here:
// its families are compiled once), then the new params stored: to nearest even, by fo_kahan_store with the
// compensation ptrs[5], or stochastically with fo_random_bits(key, index0 + i). LAMB's phase 1 only reads p
// (nothing stored back); its lanes run on across blocks (two_phase_moments_loop).
template <class PS, class GS, int SDTYPE, int MODE>
FASTOPT_INLINE int run_staged(int kind, int variant, void* const* ptrs, int64_t n, const double* s, double coef,
                              double* acc, fo_u32 key, fo_u64 index0) {
    typedef typename PS::type TP;
    // float32 params or grads (only float16 states to stage) are passed as they are, not copied
    constexpr bool direct_p = std::is_same<PS, Plain<float> >::value;
    constexpr bool direct_g = std::is_same<GS, Plain<float> >::value;
    const bool two_phase = kind >= KIND_TWO_PHASE && kind < KIND_TOUCH;
    const bool writes_p = !(two_phase && (kind - KIND_TWO_PHASE) % 2 == 0);       // not LAMB's phase 1
    const bool writes_states = !(two_phase && (kind - KIND_TWO_PHASE) % 2 == 1);  // not its phase 2
    // float16 states are staged too (F16C blocks, f16_simd.hpp), the update then runs on float32 only: per
    // element, their software conversions cost more than the update's math. bfloat16's are a shift: in place.
    constexpr bool stage_states = SDTYPE == DTYPE_F16;
    const int inner = FASTOPT_LAYOUT(DTYPE_F32, DTYPE_F32, stage_states ? DTYPE_F32 : SDTYPE);
    const int ssize = SDTYPE == DTYPE_F32 ? 4 : 2;
    static const int STATE_SLOTS[4] = {2, 3, 4, 6};  // slot 5, the compensation, is stored below, not passed in
    TP* p = static_cast<TP*>(ptrs[0]);
    const typename GS::type* g = static_cast<const typename GS::type*>(ptrs[1]);
    TP* c = static_cast<TP*>(ptrs[5]);
    float pw[STAGE], gw[STAGE];
    float kw[MODE == ROUND_KAHAN ? STAGE : 1];  // the Kahan store's scratch
    float sw[stage_states ? 4 : 1][STAGE];
    for (int64_t off = 0; off < n; off += STAGE) {
        const int64_t m = n - off < STAGE ? n - off : int64_t(STAGE);
        void* inner_ptrs[7] = {pw, gw, 0, 0, 0, 0, 0};
        if constexpr (direct_p)
            inner_ptrs[0] = p + off;
        else
            PS::widen_block(p + off, pw, m);
        if (g == 0)
            inner_ptrs[1] = 0;
        else if constexpr (direct_g)
            inner_ptrs[1] = const_cast<float*>(g + off);  // only read
        else
            GS::widen_block(g + off, gw, m);
        for (int j = 0; j < 4; ++j) {
            const int k = STATE_SLOTS[j];
            if (ptrs[k] == 0) continue;
            void* at = static_cast<void*>(static_cast<char*>(ptrs[k]) + off * ssize);
            if (stage_states) {
                F16::widen_block(static_cast<const fo_u16*>(at), sw[j], m);
                inner_ptrs[k] = sw[j];
            } else {
                inner_ptrs[k] = at;
            }
        }
        const int r = run_chunk(inner, kind, variant, inner_ptrs, m, s, coef, acc, 0, 0);
        if (r != 0) return r;
        if (stage_states && writes_states)  // every state a kernel is given, it stores (as the direct loops do)
            for (int j = 0; j < 4; ++j)
                if (ptrs[STATE_SLOTS[j]] != 0)
                    F16::narrow_block(sw[j], reinterpret_cast<fo_u16*>(static_cast<char*>(ptrs[STATE_SLOTS[j]]) + off * ssize),
                                      m);
        if constexpr (!direct_p) {  // float32 params were updated in place (rounded to nearest: no other mode)
            typedef typename PS::Format Fmt;
            if (!writes_p) continue;
            TP* __restrict pb = p + off;
            if constexpr (MODE == ROUND_KAHAN) {
                kahan_store_block<PS>(pb, c + off, pw, gw, kw, m);  // gw: the grads are read by now
            } else if constexpr (MODE == ROUND_STOCHASTIC) {
                Fmt f;
                for (int64_t i = 0; i < m; ++i) pb[i] = f.store_sr(pw[i], fo_random_bits(key, index0 + fo_u64(off + i)));
            } else {
                PS::narrow_block(pw, pb, m);
            }
        }
    }
    return 0;
}

// One chunk of one tensor: ptrs = {p, g, state0, state1, state2, kahan compensation, state3} (unused ones
// NULL; state3 only for a four-state family: Adan);
// key and index0 (the index of the chunk's first element in its tensor, plus the caller's offset) feed
// stochastic rounding. Returns -1 for an unknown layout/kind/variant (validated in Python before any
// write, so never in practice).
FASTOPT_CLONES int run_chunk(int layout, int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                             double coef, double* acc, fo_u32 key, fo_u64 index0) {
    typedef Plain<float> F32;
    typedef Plain<double> F64;
    if (kind == KIND_TOUCH || kind == KIND_TOUCH_APPLY) return run_touch_layout(layout, kind, variant, ptrs, n);
    switch (layout) {  // the direct layouts
        case LAYOUT_F32: return run_chunk_typed<float, F32, F32, F32>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_F64: return run_chunk_typed<double, F64, F64, F64>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_F32_BF16S: return run_chunk_typed<float, F32, F32, Bf16>(kind, variant, ptrs, n, s, coef, acc);
        // float16 states of float32 params: staged (F16C blocks), the params and grads passed as they are
        case LAYOUT_F32_F16S:
            return run_staged<F32, F32, DTYPE_F16, ROUND_NEAREST>(kind, variant, ptrs, n, s, coef, acc, 0, 0);
        case LAYOUT_BF16: return run_chunk_typed<float, Bf16, Bf16, F32>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_BF16_F32G: return run_chunk_typed<float, Bf16, F32, F32>(kind, variant, ptrs, n, s, coef, acc);
        // float16 params: staged, so that their conversions run on whole blocks (F16C, f16_simd.hpp), not
        // in software inside the loop (measured on one AVX-512 core: 1.05 ns per Adam element that way)
        case LAYOUT_F16: return run_staged<F16, F16, DTYPE_F32, ROUND_NEAREST>(kind, variant, ptrs, n, s, coef, acc, 0, 0);
        case LAYOUT_F16_F32G:
            return run_staged<F16, Plain<float>, DTYPE_F32, ROUND_NEAREST>(kind, variant, ptrs, n, s, coef, acc, 0, 0);
        case LAYOUT_BF16_BF16S: return run_chunk_typed<float, Bf16, Bf16, Bf16>(kind, variant, ptrs, n, s, coef, acc);
        case LAYOUT_BF16_F32G_BF16S: return run_chunk_typed<float, Bf16, F32, Bf16>(kind, variant, ptrs, n, s, coef, acc);
    }
    // the staged layouts: 16-bit params, grads in their dtype or float32, state float32 or the params' dtype,
    // any rounding (ROUND_NEAREST with float32 state is direct, above)
    const int mode = layout >> 6, base = layout & 63;
    if (mode > ROUND_STOCHASTIC) return -1;
#define FASTOPT_STAGED_MODES(P, PS, G, GS, SD)                                                                  \
    if (base == FASTOPT_LAYOUT(P, G, SD)) {                                                                    \
        if (mode == ROUND_NEAREST) return run_staged<PS, GS, SD, ROUND_NEAREST>(kind, variant, ptrs, n, s, coef, acc, key, index0); \
        if (mode == ROUND_KAHAN) return run_staged<PS, GS, SD, ROUND_KAHAN>(kind, variant, ptrs, n, s, coef, acc, key, index0); \
        return run_staged<PS, GS, SD, ROUND_STOCHASTIC>(kind, variant, ptrs, n, s, coef, acc, key, index0);    \
    }
    FASTOPT_STAGED_LAYOUTS(FASTOPT_STAGED_MODES)
#undef FASTOPT_STAGED_MODES
    return -1;
}

// ---- 8-bit state (state_dtype="int8") ----

// One chunk of one tensor with block-wise 8-bit states: ptrs = {p, g, codes0, codes1, codes2, kahan
// compensation, codes3} (unused states NULL; codes3: a fourth state, Adan's, in the update's slot 6), absmax[k] the
// float32 scales of state k from the chunk's first block,
// codecs[k] its map's codec (int8_codec: signed or unsigned, fastopt/precision.py; made once per parallel region
// and thread, not per chunk: many small tensors are many chunks). The chunk
// starts on a 256-block boundary of its tensor (the Cython module's chunks are multiples of STAGE). Blocks
// of STAGE elements: params (and grads) widened, the states dequantized (map[code] * absmax) into float32
// buffers, the direct float32 loop run on them (run_chunk, LAYOUT_F32; float32 params and grads in place,
// unstaged), then every state requantized per 256-block (fo_quantize_block: NaN-propagating absmax, nearest
// map value; int8_simd.hpp's codec gives the same bits faster) and the new params stored by MODE as
// run_staged stores them. One pass over memory; the same bits as fastopt.precision's reference.
static_assert(STAGE % FO_QUANT_BLOCK == 0, "an 8-bit stage holds whole quantization blocks");

template <class PS, class GS, int MODE>
FASTOPT_INLINE int run_int8_typed(int kind, int variant, void* const* ptrs, float* const* absmax,
                                  const Int8Codec* const* codecs, int64_t n, const double* s,
                                  double coef, fo_u32 key, fo_u64 index0, float (*buf)[STAGE]) {
    typedef typename PS::type TP;
    TP* p = static_cast<TP*>(ptrs[0]);
    const typename GS::type* g = static_cast<const typename GS::type*>(ptrs[1]);
    TP* c = static_cast<TP*>(ptrs[5]);
    // float32 params and grads need no staging: the update runs on them in place
    const bool direct = sizeof(TP) == 4 && sizeof(typename GS::type) == 4 && MODE == ROUND_NEAREST;
    // state k's slot in ptrs and in the update's pointers (run_chunk's layout: the fourth state after the compensation)
    const int slot[4] = {2, 3, 4, 6};
    float* sw[4] = {buf[2], buf[3], buf[4], buf[5]};
    for (int64_t off = 0; off < n; off += STAGE) {
        const int64_t m = n - off < STAGE ? n - off : int64_t(STAGE);
        PS ps;
        GS gs;
        float* pw = buf[0];
        float* gw = buf[1];
        if (direct) {
            pw = reinterpret_cast<float*>(p + off);
            gw = const_cast<float*>(reinterpret_cast<const float*>(g + off));
        } else {
            for (int64_t i = 0; i < m; ++i) pw[i] = ps.template load<float>(p[off + i]);
            for (int64_t i = 0; i < m; ++i) gw[i] = gs.template load<float>(g[off + i]);
        }
        void* inner[7] = {pw, gw, 0, 0, 0, 0, 0};  // the compensation (slot 5) is applied below, not by the update
        for (int k = 0; k < 4; ++k) {
            if (ptrs[slot[k]] == 0) continue;
            const unsigned char* codes = static_cast<const unsigned char*>(ptrs[slot[k]]) + off;
            const float* am = absmax[k] + off / FO_QUANT_BLOCK;
            for (int64_t b = 0; b * FO_QUANT_BLOCK < m; ++b) {
                const int64_t start = b * FO_QUANT_BLOCK;
                const unsigned len = unsigned(m - start < FO_QUANT_BLOCK ? m - start : FO_QUANT_BLOCK);
                codec_dequantize_block(*codecs[k], codes + start, len, am[b], &sw[k][start]);
            }
            inner[slot[k]] = sw[k];
        }
        const int r = run_chunk(LAYOUT_F32, kind, variant, inner, m, s, coef, 0, 0, 0);
        if (r != 0) return r;
        for (int k = 0; k < 4; ++k) {
            if (ptrs[slot[k]] == 0) continue;
            unsigned char* codes = static_cast<unsigned char*>(ptrs[slot[k]]) + off;
            float* am = absmax[k] + off / FO_QUANT_BLOCK;
            for (int64_t b = 0; b * FO_QUANT_BLOCK < m; ++b) {
                const int64_t start = b * FO_QUANT_BLOCK;
                const unsigned len = unsigned(m - start < FO_QUANT_BLOCK ? m - start : FO_QUANT_BLOCK);
                am[b] = codec_quantize_block(*codecs[k], &sw[k][start], len, codes + start);
            }
        }
        if (direct) continue;  // the new params are already in place
        TP* __restrict pb = p + off;
        if constexpr (MODE == ROUND_KAHAN) {
            kahan_store_block<PS>(pb, c + off, pw, gw, sw[0], m);  // gw and sw[0]: read by now
        } else if constexpr (MODE == ROUND_STOCHASTIC) {
            typename PS::Format f;
            for (int64_t i = 0; i < m; ++i) pb[i] = f.store_sr(pw[i], fo_random_bits(key, index0 + fo_u64(off + i)));
        } else {
            PS::narrow_block(pw, pb, m);
        }
    }
    return 0;
}

// Kahan and stochastic stores exist for 16-bit params only (validated before any write).
template <class PS, class GS>
FASTOPT_INLINE int run_int8_modes(int mode, int kind, int variant, void* const* ptrs, float* const* absmax,
                                  const Int8Codec* const* codecs, int64_t n, const double* s,
                                  double coef, fo_u32 key, fo_u64 index0, float (*buf)[STAGE]) {
    if (mode == ROUND_NEAREST) return run_int8_typed<PS, GS, ROUND_NEAREST>(kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
    if (mode == ROUND_KAHAN) return run_int8_typed<PS, GS, ROUND_KAHAN>(kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
    if (mode == ROUND_STOCHASTIC) return run_int8_typed<PS, GS, ROUND_STOCHASTIC>(kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
    return -1;
}

// layout = P | G << 2 | rounding << 6 (the states' bits unused: 8-bit). Elementwise kinds only (LAMB's
// two-phase update keeps exact state). Returns -1 for an unknown layout/kind/variant.
FASTOPT_CLONES int run_chunk_int8(int layout, int kind, int variant, void* const* ptrs, float* const* absmax,
                                  const Int8Codec* const* codecs, int64_t n, const double* s,
                                  double coef, fo_u32 key, fo_u64 index0) {
    if (kind < 0 || kind >= FASTOPT_FAMILY_COUNT) return -1;
    float buf[6][STAGE];  // p, g, four states: 24 KiB, once here (not per inlined layout)
    const int mode = layout >> 6, pd = layout & 3, gd = (layout >> 2) & 3;
    if (pd == DTYPE_F32 && gd == DTYPE_F32 && mode == ROUND_NEAREST)
        return run_int8_typed<Plain<float>, Plain<float>, ROUND_NEAREST>(kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
    if (pd == DTYPE_BF16 && gd == DTYPE_BF16) return run_int8_modes<Bf16, Bf16>(mode, kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
    if (pd == DTYPE_BF16 && gd == DTYPE_F32) return run_int8_modes<Bf16, Plain<float> >(mode, kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
    if (pd == DTYPE_F16 && gd == DTYPE_F16) return run_int8_modes<F16, F16>(mode, kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
    if (pd == DTYPE_F16 && gd == DTYPE_F32) return run_int8_modes<F16, Plain<float> >(mode, kind, variant, ptrs, absmax, codecs, n, s, coef, key, index0, buf);
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
