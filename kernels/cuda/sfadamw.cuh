// Schedule-free AdamW (Defazio et al. 2024; schedulefree.AdamWScheduleFree). The param holds y, slot a holds
// z (it starts as a copy of the param: specs.PARAM), slot b the second moment v. ckp1, y_coef =
// lr_t * (beta1 * (1 - ckp1) - 1), lr = lr_t and bias_correction2 = 1 - beta2^t come from the host
// (specs.schedule_free_host).
//   g <- g * grad_scale
//   v <- beta2 * v + (1 - beta2) * g * g
//   g <- g / (sqrt(v / bias_correction2) + eps) + weight_decay * y
//   y <- lerp(y, z, ckp1) + y_coef * g      (torch's lerp: sfsgd.cuh fo_lerp)
//   z <- z - lr * g
#pragma once
#include "common.cuh"
#include "ops.cuh"
#include "sfsgd.cuh"

namespace fastopt {

template <typename M>
struct SfadamwParams {
    M grad_scale, beta2, one_minus_beta2, bias_correction2, eps, weight_decay, ckp1, y_coef, lr;
};

template <typename M>
FASTOPT_HD void sfadamw_math(M& y, M g, M& z, M& v, const SfadamwParams<M>& h) {
    g = g * h.grad_scale;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    M denom = fo_sqrt(v / h.bias_correction2) + h.eps;
    g = g / denom;
    g = fo_add_scaled(g, h.weight_decay, y);
    y = fo_lerp<M>(y, z, h.ckp1);
    y = y + h.y_coef * g;
    z = z - h.lr * g;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits (none)
template <typename M, int V>
struct SfadamwOp {
    typedef SfadamwParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { sfadamw_math<M>(p, g, a, b, h); }
};

}  // namespace fastopt
