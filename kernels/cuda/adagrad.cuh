// Adagrad (torch.optim.Adagrad).
//   g <- g * grad_scale + weight_decay * p
//   sum <- sum + g * g
//   p <- p - clr * g / (sqrt(sum) + eps),   clr = lr / (1 + (t - 1) * lr_decay)  (host)
#pragma once
#include "common.cuh"

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

}  // namespace fastopt
