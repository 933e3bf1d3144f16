// Every compiler-, version- and architecture-specific choice of the CPU kernels, in one place, so that the
// same sources build with gcc, clang, MSVC, with or without OpenMP, on x86-64 and on aarch64.
// setup.py compiles a probe against this header with the real compiler and flags; when the probe fails
// (e.g. a musl toolchain without ifunc) it defines FASTOPT_NO_CLONES and says so.
#pragma once

// ---- forced inlining: the element loops must inline into the ISA clones below to be compiled for them ----
#if defined(_MSC_VER) && !defined(__clang__)
#define FASTOPT_INLINE static __forceinline
#elif defined(__GNUC__) || defined(__clang__)
#define FASTOPT_INLINE static inline __attribute__((always_inline))
#else
#define FASTOPT_INLINE static inline
#endif

// ---- runtime ISA dispatch ----
// target_clones compiles a function once per ISA level plus an ifunc resolver that picks one at load time,
// so a portable build still uses AVX2/AVX-512. It needs: an x86-64 ELF target (ifunc; not Mach-O, not
// Windows), GCC >= 11 (the arch=x86-64-vN names; GCC 9/10, e.g. manylinux2014, reject them) or
// clang >= 14 (first clang with target_clones on x86). Elsewhere (aarch64 included) no attribute at all:
// the loops are plain C++ that the compiler vectorizes for the build's -march.
#if !defined(FASTOPT_NO_CLONES) && defined(__x86_64__) && defined(__ELF__) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define FASTOPT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTOPT_ISA_DISPATCH "x86-64-v4,x86-64-v3,default"
#else
#define FASTOPT_CLONES
#define FASTOPT_ISA_DISPATCH "none"
#endif

// ---- OpenMP is optional ----
// Without it (FASTOPT_OPENMP=0, or a compiler without OpenMP such as clang with no libomp) the module must
// not reference any omp_* symbol: Cython's prange pragmas are guarded by _OPENMP and run serially, and the
// thread count is 1.
#ifdef _OPENMP
#include <omp.h>
static inline int fastopt_omp_max_threads(void) { return omp_get_max_threads(); }
#define FASTOPT_OPENMP 1
#else
static inline int fastopt_omp_max_threads(void) { return 1; }
#define FASTOPT_OPENMP 0
#endif

// The thread count of the kernels called from one Python thread, over the process-wide setting (0: none).
// fastopt.torch runs with torch's count this way without changing what fastopt.set_num_threads set, which
// another thread may be reading or setting meanwhile.
static thread_local int fastopt_thread_override = 0;
static inline int fastopt_get_thread_override(void) { return fastopt_thread_override; }
static inline void fastopt_set_thread_override(int n) { fastopt_thread_override = n; }
