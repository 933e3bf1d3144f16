// The functor glue of the elementwise families: each kernels/cuda/<family>.cuh defines, next to its math,
//
//   template <typename M, int V> struct <Family>Op {     // Family = the spec's `kernel`, capitalized
//       typedef <Family>Params<M> P;                     // the scalars it reads (fastopt/specs.py)
//       enum { USED = ... };                             // bit k set: state slot k is read and written
//       P h;
//       FASTOPT_OP void operator()(M& p, M g, M& s0, M& s1, M& s2) const;   // one element, in place
//   };
//
// with V the variant's bits (fastopt/specs.py `variants`). The same functor runs in the CUDA entry points
// (update.cu: single_kernel / multi_kernel) and in the CPU loop (kernels/cpu/cpu_loops.hpp: cpu_loop), so
// it compiles under nvcc, NVRTC, gcc, clang and MSVC. Which families and variants exist is the generated
// table families.cuh (from the registry; fastopt/backends/cuda_source.py).
#pragma once
#include "common.cuh"

// A member function: FASTOPT_HD carries `static` on the host, which a member operator() cannot have.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTOPT_OP __host__ __device__ __forceinline__
#elif defined(_MSC_VER) && !defined(__clang__)
#define FASTOPT_OP __forceinline
#elif defined(__GNUC__) || defined(__clang__)
#define FASTOPT_OP inline __attribute__((always_inline))
#else
#define FASTOPT_OP inline
#endif
