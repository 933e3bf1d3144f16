// Adam and AdamW, optionally AMSGrad (torch.optim.Adam / AdamW).
//   g <- g * grad_scale + l2 * p           (Adam's weight decay; l2 = 0 for AdamW)
//   p <- p * decay                         (AdamW: decay = 1 - lr * weight_decay; 1 for Adam)
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g * g
//   amsgrad: vmax <- max(vmax, v), and vmax replaces v below
//   p <- p - step_size * m / (sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps),   step_size = lr / (1 - beta1^t)
// (torch divides by sqrt(1 - beta2^t); multiplying by its inverse, computed on the host, saves one of
// the three divider operations per element, which bound the loop when the data sits in cache)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AdamParams {
    M grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, step_size,
        inv_bias_correction2_sqrt;
};

// variant bits: 1 amsgrad
template <typename M>
FASTOPT_HD void adam_math(M& p, M g, M& m, M& v, M& vmax, const AdamParams<M>& h, bool amsgrad) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.l2, p);
    p = p * h.decay;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    M vv = v;
    if (amsgrad) {
        vmax = fo_max_nan(vmax, v);
        vv = vmax;
    }
    M denom = fo_sqrt(vv) * h.inv_bias_correction2_sqrt + h.eps;
    p = p - h.step_size * (m / denom);
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct AdamOp {
    typedef AdamParams<M> P;
    enum { USED = 3 | ((V & 1) ? 4 : 0) };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M& c) const { adam_math<M>(p, g, a, b, c, h, V & 1); }
};

}  // namespace fastopt
