// AdaBelief (Zhuang et al. 2020, Algorithm 2), with L2 or decoupled weight decay.
//   g <- g * grad_scale + l2 * p;   p <- p * decay
//   m <- beta1 * m + (1 - beta1) * g
//   s <- beta2 * s + (1 - beta2) * (g - m)^2 + eps
//   p <- p - step_size * m / (sqrt(s) * (1 / sqrt(1 - beta2^t)) + eps),   step_size = lr / (1 - beta1^t)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AdabeliefParams {
    M grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, step_size,
        inv_bias_correction2_sqrt;
};

template <typename M>
FASTOPT_HD void adabelief_math(M& p, M g, M& m, M& s, const AdabeliefParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.l2, p);
    p = p * h.decay;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    M r = g - m;
    s = h.beta2 * s + h.one_minus_beta2 * (r * r);
    s = s + h.eps;
    M denom = fo_sqrt(s) * h.inv_bias_correction2_sqrt + h.eps;
    p = p - h.step_size * (m / denom);
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct AdabeliefOp {
    typedef AdabeliefParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { adabelief_math<M>(p, g, a, b, h); }
};

}  // namespace fastopt
