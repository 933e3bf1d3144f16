// Yogi (Zaheer et al. 2018; pytorch_optimizer.Yogi): Adam with an additive, sign-controlled second moment.
//   g <- g * grad_scale + l2 * p;  p <- p * decay       (decoupled: l2 = 0; coupled: decay = 1)
//   m <- beta1 * m + (1 - beta1) * g
//   v <- v - (1 - beta2) * (sign(v - g * g) * g * g)    (NaN propagates through sign)
//   p <- p - step_size * m / (sqrt(v) * inv_bias_correction2_sqrt + eps),  step_size = lr / (1 - beta1^t)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct YogiParams {
    M grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, step_size,
        inv_bias_correction2_sqrt;
};

template <typename M>
FASTOPT_HD void yogi_math(M& p, M g, M& m, M& v, const YogiParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.l2, p);
    p = p * h.decay;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    M g2 = g * g;
    v = v - h.one_minus_beta2 * (fo_sign(v - g2) * g2);
    M denom = fo_sqrt(v) * h.inv_bias_correction2_sqrt + h.eps;
    p = p - h.step_size * (m / denom);
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits (none)
template <typename M, int V>
struct YogiOp {
    typedef YogiParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { yogi_math<M>(p, g, a, b, h); }
};

}  // namespace fastopt
