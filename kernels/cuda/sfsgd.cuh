// Schedule-free SGD (Defazio et al. 2024; schedulefree.SGDScheduleFree). The param holds y, slot a holds z
// (it starts as a copy of the param: specs.PARAM). ckp1, y_coef = lr_t * (momentum * (1 - ckp1) - 1) and
// lr = lr_t are computed on the host from the step count (specs.schedule_free_host).
//   g <- g * grad_scale + weight_decay * y
//   y <- lerp(y, z, ckp1) + y_coef * g      (torch's lerp: y + w (z - y) if |w| < 0.5, else z - (z - y)(1 - w))
//   z <- z - lr * g
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct SfsgdParams {
    M grad_scale, weight_decay, ckp1, y_coef, lr;
};

// torch.lerp(start, end, w) as the schedulefree package calls it (ckp1 in [0, 1]); without torch's FMA
template <typename M>
FASTOPT_HD M fo_lerp(M start, M end, M w) {
    return (w < M(0.5) && w > M(-0.5)) ? start + w * (end - start) : end - (end - start) * (M(1) - w);
}

template <typename M>
FASTOPT_HD void sfsgd_math(M& y, M g, M& z, const SfsgdParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.weight_decay, y);
    y = fo_lerp<M>(y, z, h.ckp1);
    y = y + h.y_coef * g;
    z = z - h.lr * g;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits (none)
template <typename M, int V>
struct SfsgdOp {
    typedef SfsgdParams<M> P;
    enum { USED = 1 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M&, M&) const { sfsgd_math<M>(p, g, a, h); }
};

}  // namespace fastopt
