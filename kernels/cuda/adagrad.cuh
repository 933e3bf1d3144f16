// Adagrad (torch.optim.Adagrad).
//   g <- g * grad_scale + weight_decay * p
//   sum <- sum + g * g
//   p <- p - clr * g / (sqrt(sum) + eps),   clr = lr / (1 + (t - 1) * lr_decay)  (host)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AdagradParams {
    M grad_scale, clr, eps, weight_decay;
};

template <typename M>
FASTOPT_HD void adagrad_math(M& p, M g, M& sum, const AdagradParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.weight_decay, p);
    sum = sum + g * g;
    M std = fo_sqrt(sum) + h.eps;
    p = p - h.clr * (g / std);
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct AdagradOp {
    typedef AdagradParams<M> P;
    enum { USED = 1 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M&, M&) const { adagrad_math<M>(p, g, a, h); }
};

}  // namespace fastopt
