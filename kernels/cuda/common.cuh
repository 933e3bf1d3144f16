// Shared by every per-element math header. Compiles under nvcc, NVRTC and plain C++ (gcc/clang),
// so the exact same update math runs in the CUDA kernels and in the Cython CPU loops.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#if defined(_MSC_VER) && !defined(__clang__)  // the CPU build's compilers; same guard as kernels/cpu/platform.hpp
#define FASTOPT_HD static __forceinline
#elif defined(__GNUC__) || defined(__clang__)
#define FASTOPT_HD static inline __attribute__((always_inline))
#else
#define FASTOPT_HD static inline
#endif
#endif
#if !defined(__CUDACC_RTC__) && !defined(__CUDA_ARCH__)
#include <string.h>
#endif

namespace fastopt {

FASTOPT_HD float fo_sqrt(float x) { return sqrtf(x); }
FASTOPT_HD double fo_sqrt(double x) { return sqrt(x); }

// max that propagates NaN from either side, like torch.maximum (a plain a > b ? a : b drops it).
template <typename M>
FASTOPT_HD M fo_max_nan(M a, M b) { return (a != a || a > b) ? a : b; }

// sign(x) in {-1, 0, 1}, +0 for -0 too; NaN stays NaN, as np.sign (the reference). torch.sign(NaN) is 0: Rprop,
// the one torch.optim user of a sign, maps NaN to 0 itself (rprop.cuh).
template <typename M>
FASTOPT_HD M fo_sign(M x) { return x > M(0) ? M(1) : (x < M(0) ? M(-1) : (x == x ? M(0) : x)); }

// g + c * p, but exactly g when c == 0: a zero weight decay must not turn an inf/NaN parameter into a
// NaN gradient (torch skips the term entirely when weight_decay == 0).
template <typename M>
FASTOPT_HD M fo_add_scaled(M g, M c, M p) { return c != M(0) ? g + c * p : g; }

// cond ? x : y for a cond that is the same for a whole loop (a test of a hyperparameter), with both sides
// computed: on the CPU a blend of the bits (exact, NaN and -0 included). A branch there lets GCC -O3 split the
// loop on it (unswitching), and the copy that keeps y need not read what only x reads: ASGD's running average,
// then stored without being read, a write-only stream that an Intel Xeon (AVX-512) stores slower than a read
// and write of the same array (ASGD at 1e7, 2 threads: 10.9 ms with the branch, 6.0 ms blended). On the GPU a
// select: a write-only stream costs less there.
template <typename M>
struct FoBitsOf;
template <>
struct FoBitsOf<float> {
    typedef unsigned int type;
};
template <>
struct FoBitsOf<double> {
    typedef unsigned long long type;
};

template <typename M>
FASTOPT_HD M fo_uniform_select(bool cond, M x, M y) {
#if defined(__CUDA_ARCH__)
    return cond ? x : y;
#else
    typedef typename FoBitsOf<M>::type U;
    const U mask = U(0) - U(cond);
    U ux, uy;
    memcpy(&ux, &x, sizeof ux);
    memcpy(&uy, &y, sizeof uy);
    const U u = (ux & mask) | (uy & ~mask);
    M out;
    memcpy(&out, &u, sizeof out);
    return out;
#endif
}

// Kernel hyperparameters arrive from the host as an array of float64 (computed once per call in
// fastopt/specs.py) and are narrowed to the math type M here. Every *Params struct below holds only
// M fields, in the order its spec lists them in `scalars`; tests/test_specs.py checks that order.
template <typename P, typename M>
FASTOPT_HD P load_params(const double* s) {
    P h;
    M* f = reinterpret_cast<M*>(&h);
    for (unsigned i = 0; i < sizeof(P) / sizeof(M); ++i) f[i] = static_cast<M>(s[i]);
    return h;
}

}  // namespace fastopt
