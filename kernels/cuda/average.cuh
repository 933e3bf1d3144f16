// Weight averaging (fastopt.ema_update / swa_update; torch.optim.swa_utils): not an optimizer, but the same
// elementwise shape, so the same functor machinery runs it on every backend. The functor's written array
// (p in ops.cuh) is the average; its read-only array (g) is the model's parameter.
//   V = 0, EMA: a <- lerp(a, x, weight)   torch's lerp: a + w * (x - a) if |w| < 0.5, else
//                                          x - (x - a) * (1 - w)        (weight = 1 - decay)
//                                          rounded twice: torch's CPU lerp fuses the multiply-add (FMA),
//                                          fastopt never does (one ulp apart at most)
//   V = 1, SWA: a <- a + (x - a) / divisor (divisor = n_averaged + 1: AveragedModel's default on the CPU)
//   V = 2, copy: a <- x                   (the first average, n_averaged = 0)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AverageParams {
    M grad_scale, weight, divisor;  // grad_scale: every family's first scalar (update.cu); unused here
};

template <typename M>
FASTOPT_HD void average_math(M& a, M x, const AverageParams<M>& h, int mode) {
    if (mode == 2) {
        a = x;
    } else if (mode == 1) {
        a = a + (x - a) / h.divisor;
    } else {
        M w = h.weight;  // in [0, 1] for EMA; schedule-free's eval() lerps by 1 - 1/beta1 < 0 (train_eval.py)
        a = (w < M(0.5) && w > M(-0.5)) ? a + w * (x - a) : x - (x - a) * (M(1) - w);  // torch: |w| < 0.5
    }
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the mode above; no state slots
template <typename M, int V>
struct AverageOp {
    typedef AverageParams<M> P;
    enum { USED = 0 };
    P h;
    FASTOPT_OP void operator()(M& a, M x, M&, M&, M&) const { average_math<M>(a, x, h, V); }
};

}  // namespace fastopt
