// Adamax (torch.optim.Adamax): Adam with the infinity norm of the gradients.
//   g <- g * grad_scale + weight_decay * p
//   m <- beta1 * m + (1 - beta1) * g
//   u <- max(beta2 * u, |g| + eps)              (NaN propagates, like torch.maximum)
//   p <- p - step_size * m / u,                 step_size = lr / (1 - beta1^t)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AdamaxParams {
    M grad_scale, beta1, one_minus_beta1, beta2, eps, weight_decay, step_size;
};

template <typename M>
FASTOPT_HD void adamax_math(M& p, M g, M& m, M& u, const AdamaxParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.weight_decay, p);
    m = h.beta1 * m + h.one_minus_beta1 * g;
    M a = g < M(0) ? -g : g;  // |g| (fabs is not host-device in every toolchain this header meets)
    u = fo_max_nan(h.beta2 * u, a + h.eps);
    p = p - h.step_size * (m / u);
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits (none)
template <typename M, int V>
struct AdamaxOp {
    typedef AdamaxParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { adamax_math<M>(p, g, a, b, h); }
};

}  // namespace fastopt
