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

namespace fastopt {

FASTOPT_HD float fo_sqrt(float x) { return sqrtf(x); }
FASTOPT_HD double fo_sqrt(double x) { return sqrt(x); }

// max that propagates NaN from either side, like torch.maximum (a plain a > b ? a : b drops it).
template <typename M>
FASTOPT_HD M fo_max_nan(M a, M b) { return (a != a || a > b) ? a : b; }

// sign(x) in {-1, 0, 1}; NaN stays NaN, like torch.sign.
template <typename M>
FASTOPT_HD M fo_sign(M x) { return x > M(0) ? M(1) : (x < M(0) ? M(-1) : x * M(0)); }

// g + c * p, but exactly g when c == 0: a zero weight decay must not turn an inf/NaN parameter into a
// NaN gradient (torch skips the term entirely when weight_decay == 0).
template <typename M>
FASTOPT_HD M fo_add_scaled(M g, M c, M p) { return c != M(0) ? g + c * p : g; }

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
