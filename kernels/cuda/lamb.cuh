// LAMB (You et al. 2019), two phases per call.
//   phase 1: g <- g * grad_scale
//            m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g * g
//            u  = (m * (1 / bc1)) / (sqrt(v * (1 / bc2)) + eps) + weight_decay * p   (bc = 1 - beta^t, or 1)
//            per tensor: accumulate ||p||^2 and ||u||^2
//   phase 2: u recomputed from the new m, v and the unchanged p (same expression, same bits)
//            p <- p - lr * trust * u,   trust = ||p|| / ||u||, or 1 when either norm is 0
#pragma once
#include "common.cuh"

namespace fastopt {

template <typename M>
struct LambParams {
    M grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, inv_bias_correction1,
        inv_bias_correction2;
};

template <typename M>
FASTOPT_HD M lamb_direction(M p, M m, M v, const LambParams<M>& h) {
    M denom = fo_sqrt(v * h.inv_bias_correction2) + h.eps;
    return (m * h.inv_bias_correction1) / denom + h.weight_decay * p;
}

// phase 1: moments; returns the update direction u for the norm accumulation
template <typename M>
FASTOPT_HD M lamb_moments_math(M p, M g, M& m, M& v, const LambParams<M>& h) {
    g = g * h.grad_scale;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    return lamb_direction(p, m, v, h);
}

// phase 2: the step; scaled_lr = lr * trust ratio of this tensor
template <typename M>
FASTOPT_HD void lamb_apply_math(M& p, M m, M v, const LambParams<M>& h, M scaled_lr) {
    p = p - scaled_lr * lamb_direction(p, m, v, h);
}

template <typename M>
FASTOPT_HD M lamb_trust_ratio(M param_norm, M update_norm) {
    return (param_norm > M(0) && update_norm > M(0)) ? param_norm / update_norm : M(1);
}

}  // namespace fastopt
