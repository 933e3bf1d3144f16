// The functor glue of the elementwise families: each kernels/cuda/<family>.cuh defines, next to its math,
//
//   template <typename M, int V> struct <Family>Op {     // Family = the spec's `kernel`, capitalized
//       typedef <Family>Params<M> P;                     // the scalars it reads (fastopt/specs.py)
//       enum { USED = ... };                             // bit k set: state slot k is read and written
//       P h;
//       FASTOPT_OP void operator()(M& p, M g, M& s0, M& s1, M& s2) const;   // one element, in place
//   };
//
// A family with a fourth state (USED bit 8: Adan) takes one more argument, s3; the loops call every
// functor through fo_op_call below, so the three-state families keep their signature and a fourth slot
// is compiled out for them.
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

namespace fastopt {

// op(p, g, s0, s1, s2[, s3]): the fourth state only for a functor that uses it (Op::USED & 8).
template <bool FOUR>
struct FoOpCall {
    template <class Op, typename M>
    static FASTOPT_OP void call(const Op& op, M& p, M g, M& s0, M& s1, M& s2, M&) { op(p, g, s0, s1, s2); }
};
template <>
struct FoOpCall<true> {
    template <class Op, typename M>
    static FASTOPT_OP void call(const Op& op, M& p, M g, M& s0, M& s1, M& s2, M& s3) { op(p, g, s0, s1, s2, s3); }
};

// A family whose math reads one number per tensor (LARS's trust ratio: spec.tensor_coefs) has a member
// `M coef` after `h`; fo_make_op sets it from the loop's per-tensor value. The other functors have none.
template <class Op, class = void>
struct FoHasCoef {
    enum { value = 0 };
};
template <class Op>
struct FoHasCoef<Op, decltype((void)&Op::coef)> {
    enum { value = 1 };
};

template <class Op, typename M, bool COEF = FoHasCoef<Op>::value != 0>
struct FoMakeOp {
    static FASTOPT_OP Op make(const typename Op::P& h, M) {
        Op op = {h};
        return op;
    }
};
template <class Op, typename M>
struct FoMakeOp<Op, M, true> {
    static FASTOPT_OP Op make(const typename Op::P& h, M coef) {
        Op op = {h, coef};
        return op;
    }
};

template <class Op, typename M>
FASTOPT_OP Op fo_make_op(const typename Op::P& h, M coef) {
    return FoMakeOp<Op, M>::make(h, coef);
}

template <class Op, typename M>
FASTOPT_OP void fo_op_call(const Op& op, M& p, M g, M& s0, M& s1, M& s2, M& s3) {
    FoOpCall<(Op::USED & 8) != 0>::call(op, p, g, s0, s1, s2, s3);
}

}  // namespace fastopt
