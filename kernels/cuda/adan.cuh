// Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm"; as pytorch_optimizer.Adan):
// moments of the gradient, of the gradient difference and of a Nesterov-corrected square. Four states:
// m (exp_avg), d (exp_avg_diff), n (exp_avg_sq), q (previous_grad, stored negated as pytorch_optimizer does).
//   g <- g * grad_scale
//   diff <- q + first * g                  (first = 0 on step 1: the first difference is 0)
//   m <- beta1 * m + (1 - beta1) * g
//   d <- beta2 * d + (1 - beta2) * diff
//   u <- diff * beta2 + g
//   n <- beta3 * n + (1 - beta3) * u * u
//   p <- p * decay                         (weight_decouple: 1 - lr * weight_decay, else 1)
//   denom <- sqrt(n) / sqrt(1 - beta3^t) + eps
//   p <- p - step_size * m / denom - diff_step_size * d / denom,
//        step_size = lr / (1 - beta1^t), diff_step_size = lr * beta2 / (1 - beta2^t)
//   p <- p / prox                          (not weight_decouple: 1 + lr * weight_decay, else 1)
//   q <- -g
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AdanParams {
    M grad_scale, first, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3,
        bias_correction3_sqrt, eps, decay, step_size, diff_step_size, prox;
};

template <typename M>
FASTOPT_HD void adan_math(M& p, M g, M& m, M& d, M& n, M& q, const AdanParams<M>& h) {
    g = g * h.grad_scale;
    const M diff = q + g * h.first;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    d = h.beta2 * d + h.one_minus_beta2 * diff;
    const M u = diff * h.beta2 + g;
    n = h.beta3 * n + h.one_minus_beta3 * (u * u);
    const M denom = fo_sqrt(n) / h.bias_correction3_sqrt + h.eps;
    p = p * h.decay;
    p = p - h.step_size * (m / denom);
    p = p - h.diff_step_size * (d / denom);
    p = p / h.prox;
    q = -g;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh): the one family with a fourth state slot (bit 8)
template <typename M, int V>
struct AdanOp {
    typedef AdanParams<M> P;
    enum { USED = 15 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M& c, M& d) const { adan_math<M>(p, g, a, b, c, d, h); }
};

}  // namespace fastopt
