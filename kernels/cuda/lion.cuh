// Lion (Chen et al. 2023).
//   g <- g * grad_scale
//   p <- p * decay                              (decay = 1 - lr * weight_decay)
//   p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
//   m <- beta2 * m + (1 - beta2) * g
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct LionParams {
    M grad_scale, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
};

template <typename M>
FASTOPT_HD void lion_math(M& p, M g, M& m, const LionParams<M>& h) {
    g = g * h.grad_scale;
    p = p * h.decay;
    M c = h.beta1 * m + h.one_minus_beta1 * g;
    p = p - h.lr * fo_sign(c);
    m = h.beta2 * m + h.one_minus_beta2 * g;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct LionOp {
    typedef LionParams<M> P;
    enum { USED = 1 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M&, M&) const { lion_math<M>(p, g, a, h); }
};

}  // namespace fastopt
