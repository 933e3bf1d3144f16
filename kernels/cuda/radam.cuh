// RAdam (torch.optim.RAdam), with L2 or decoupled weight decay.
//   g <- g * grad_scale + l2 * p;   p <- p * decay
//   m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g * g
//   rectified (rho_t > 5, decided on the host):
//       p <- p - rect_step_size * m / (sqrt(v) + eps),  rect_step_size = lr / (1 - beta1^t) * sqrt(1 - beta2^t) * rect_t
//   otherwise:
//       p <- p - step_size * m,                         step_size = lr / (1 - beta1^t)
// (the host folds the per-step factors: one division per element)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct RadamParams {
    M grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, step_size, rect_step_size;
};

// variant bits: 1 rectified
template <typename M>
FASTOPT_HD void radam_math(M& p, M g, M& m, M& v, const RadamParams<M>& h, bool rectified) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.l2, p);
    p = p * h.decay;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    if (rectified)
        p = p - h.rect_step_size * (m / (fo_sqrt(v) + h.eps));
    else
        p = p - h.step_size * m;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct RadamOp {
    typedef RadamParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { radam_math<M>(p, g, a, b, h, V & 1); }
};

}  // namespace fastopt
