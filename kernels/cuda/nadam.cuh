// NAdam (torch.optim.NAdam), with L2 or decoupled weight decay.
//   g <- g * grad_scale + l2 * p;   p <- p * decay
//   m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g * g
//   denom = sqrt(v * (1 / (1 - beta2^t))) + eps
//   p <- p - (grad_coef * g + exp_avg_coef * m) / denom
// (torch makes two addcdiv passes; one division per element instead of three keeps the loop at the
// memory bound)
// with (host, float64)  mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay)),
//   grad_coef = lr * (1 - mu_t) / (1 - prod_{i<=t} mu_i),
//   exp_avg_coef = lr * mu_{t+1} / (1 - prod_{i<=t+1} mu_i)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct NadamParams {
    M grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, inv_bias_correction2,
        grad_coef, exp_avg_coef;
};

template <typename M>
FASTOPT_HD void nadam_math(M& p, M g, M& m, M& v, const NadamParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.l2, p);
    p = p * h.decay;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    M denom = fo_sqrt(v * h.inv_bias_correction2) + h.eps;
    p = p - (h.grad_coef * g + h.exp_avg_coef * m) / denom;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct NadamOp {
    typedef NadamParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { nadam_math<M>(p, g, a, b, h); }
};

}  // namespace fastopt
