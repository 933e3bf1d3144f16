// CPU element loops over one contiguous chunk. The per-element math comes from kernels/cuda/*.cuh
// (the same code the CUDA kernels run); these loops add restrict pointers so compilers vectorize them, and
// runtime ISA dispatch (target_clones: AVX-512, AVX2, baseline) so a portable build still uses the
// wide units; where target_clones is unavailable (see platform.hpp) the loops are plain, portable C++.
// The parallel loop over chunks lives in _cpu_fast.pyx.
#pragma once
#include <stdint.h>

#include "platform.hpp"  // FASTOPT_CLONES, FASTOPT_INLINE: compiler/arch checks

#include "../cuda/adabelief.cuh"
#include "../cuda/adagrad.cuh"
#include "../cuda/adam.cuh"
#include "../cuda/clip.cuh"
#include "../cuda/lamb.cuh"
#include "../cuda/lion.cuh"
#include "../cuda/nadam.cuh"
#include "../cuda/radam.cuh"
#include "../cuda/rmsprop.cuh"
#include "../cuda/sgd.cuh"

namespace fastopt {
namespace cpu {

// Kernel kinds; the Cython module exposes them by name (fastopt/specs.py `kernel=`).
enum Kind {
    KIND_SGD = 0,
    KIND_ADAGRAD = 1,
    KIND_RMSPROP = 2,
    KIND_ADAM = 3,
    KIND_NADAM = 4,
    KIND_RADAM = 5,
    KIND_ADABELIEF = 6,
    KIND_LAMB_MOMENTS = 7,
    KIND_LAMB_APPLY = 8,
    KIND_LION = 9,
    KIND_TOUCH = 10,        // bandwidth ceiling: p, s0.. read+written, g read (variant = number of states)
    KIND_TOUCH_APPLY = 11,  // bandwidth ceiling of LAMB's phase 2: p read+written, s0, s1 read
};

enum { DTYPE_F32 = 0, DTYPE_F64 = 1 };

// Number of independent accumulators of the reductions: fixed, so the summation order (and the result)
// is the same for every ISA clone and thread count.
enum { LANES = 16 };

template <typename T>
struct Ptrs {
    T* __restrict p;
    const T* __restrict g;
    T* __restrict s0;
    T* __restrict s1;
    T* __restrict s2;
};

template <typename T, int V>
FASTOPT_INLINE void sgd_loop(Ptrs<T> a, int64_t n, const double* s) {
    const SgdParams<T> h = load_params<SgdParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict buf = a.s0;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], b = T(0);
        if (V & 1) b = buf[i];
        sgd_math<T>(pi, g[i], b, h, V & 1, V & 2, V & 4);
        p[i] = pi;
        if (V & 1) buf[i] = b;
    }
}

template <typename T>
FASTOPT_INLINE void adagrad_loop(Ptrs<T> a, int64_t n, const double* s) {
    const AdagradParams<T> h = load_params<AdagradParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict sum = a.s0;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], si = sum[i];
        adagrad_math<T>(pi, g[i], si, h);
        p[i] = pi;
        sum[i] = si;
    }
}

template <typename T, int V>
FASTOPT_INLINE void rmsprop_loop(Ptrs<T> a, int64_t n, const double* s) {
    const RmspropParams<T> h = load_params<RmspropParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict sq = a.s0;
    T* __restrict ga = a.s1;
    T* __restrict buf = a.s2;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], sqi = sq[i], gai = T(0), bi = T(0);
        if (V & 1) gai = ga[i];
        if (V & 2) bi = buf[i];
        rmsprop_math<T>(pi, g[i], sqi, gai, bi, h, V & 1, V & 2);
        p[i] = pi;
        sq[i] = sqi;
        if (V & 1) ga[i] = gai;
        if (V & 2) buf[i] = bi;
    }
}

template <typename T, int V>
FASTOPT_INLINE void adam_loop(Ptrs<T> a, int64_t n, const double* s) {
    const AdamParams<T> h = load_params<AdamParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict m = a.s0;
    T* __restrict v = a.s1;
    T* __restrict vmax = a.s2;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], mi = m[i], vi = v[i], xi = T(0);
        if (V & 1) xi = vmax[i];
        adam_math<T>(pi, g[i], mi, vi, xi, h, V & 1);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (V & 1) vmax[i] = xi;
    }
}

template <typename T>
FASTOPT_INLINE void nadam_loop(Ptrs<T> a, int64_t n, const double* s) {
    const NadamParams<T> h = load_params<NadamParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict m = a.s0;
    T* __restrict v = a.s1;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], mi = m[i], vi = v[i];
        nadam_math<T>(pi, g[i], mi, vi, h);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

template <typename T, int V>
FASTOPT_INLINE void radam_loop(Ptrs<T> a, int64_t n, const double* s) {
    const RadamParams<T> h = load_params<RadamParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict m = a.s0;
    T* __restrict v = a.s1;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], mi = m[i], vi = v[i];
        radam_math<T>(pi, g[i], mi, vi, h, V & 1);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

template <typename T>
FASTOPT_INLINE void adabelief_loop(Ptrs<T> a, int64_t n, const double* s) {
    const AdabeliefParams<T> h = load_params<AdabeliefParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict m = a.s0;
    T* __restrict sv = a.s1;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], mi = m[i], si = sv[i];
        adabelief_math<T>(pi, g[i], mi, si, h);
        p[i] = pi;
        m[i] = mi;
        sv[i] = si;
    }
}

// LAMB phase 1: moments, and the squared norms of p and of the update, per LANES accumulators.
template <typename T>
FASTOPT_INLINE void lamb_moments_loop(Ptrs<T> a, int64_t n, const double* s, double* acc) {
    const LambParams<T> h = load_params<LambParams<T>, T>(s);
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
            double u = double(lamb_moments_math<T>(p[i + j], g[i + j], mi, vi, h));
            m[i + j] = mi;
            v[i + j] = vi;
            pp[j] += pi * pi;
            uu[j] += u * u;
        }
    }
    for (int j = 0; i < n; ++i, ++j) {
        T mi = m[i], vi = v[i];
        double pi = double(p[i]);
        double u = double(lamb_moments_math<T>(p[i], g[i], mi, vi, h));
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

template <typename T>
FASTOPT_INLINE void lamb_apply_loop(Ptrs<T> a, int64_t n, const double* s, double scaled_lr) {
    const LambParams<T> h = load_params<LambParams<T>, T>(s);
    const T lr = T(scaled_lr);
    T* __restrict p = a.p;
    const T* __restrict m = a.s0;
    const T* __restrict v = a.s1;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i];
        lamb_apply_math<T>(pi, m[i], v[i], h, lr);
        p[i] = pi;
    }
}

template <typename T>
FASTOPT_INLINE void lion_loop(Ptrs<T> a, int64_t n, const double* s) {
    const LionParams<T> h = load_params<LionParams<T>, T>(s);
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict m = a.s0;
    for (int64_t i = 0; i < n; ++i) {
        T pi = p[i], mi = m[i];
        lion_math<T>(pi, g[i], mi, h);
        p[i] = pi;
        m[i] = mi;
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
        case KIND_SGD:
            switch (variant) {
                case 0: sgd_loop<T, 0>(a, n, s); return 0;
                case 1: sgd_loop<T, 1>(a, n, s); return 0;
                case 3: sgd_loop<T, 3>(a, n, s); return 0;
                case 5: sgd_loop<T, 5>(a, n, s); return 0;
                case 7: sgd_loop<T, 7>(a, n, s); return 0;
            }
            return -1;
        case KIND_ADAGRAD: adagrad_loop<T>(a, n, s); return 0;
        case KIND_RMSPROP:
            switch (variant) {
                case 0: rmsprop_loop<T, 0>(a, n, s); return 0;
                case 1: rmsprop_loop<T, 1>(a, n, s); return 0;
                case 2: rmsprop_loop<T, 2>(a, n, s); return 0;
                case 3: rmsprop_loop<T, 3>(a, n, s); return 0;
            }
            return -1;
        case KIND_ADAM:
            switch (variant) {
                case 0: adam_loop<T, 0>(a, n, s); return 0;
                case 1: adam_loop<T, 1>(a, n, s); return 0;
            }
            return -1;
        case KIND_NADAM: nadam_loop<T>(a, n, s); return 0;
        case KIND_RADAM:
            switch (variant) {
                case 0: radam_loop<T, 0>(a, n, s); return 0;
                case 1: radam_loop<T, 1>(a, n, s); return 0;
            }
            return -1;
        case KIND_ADABELIEF: adabelief_loop<T>(a, n, s); return 0;
        case KIND_LAMB_MOMENTS: lamb_moments_loop<T>(a, n, s, acc); return 0;
        case KIND_LAMB_APPLY: lamb_apply_loop<T>(a, n, s, coef); return 0;
        case KIND_LION: lion_loop<T>(a, n, s); return 0;
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
