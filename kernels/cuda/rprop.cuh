// Rprop (torch.optim.Rprop): per-element step sizes driven by the sign of successive gradients.
//   g <- g * grad_scale
//   x = g * prev:  factor = etaplus if x > 0, etaminus if x < 0, else 1 (x == 0, and NaN: torch.sign(NaN)
//                  is 0, so a NaN gradient, or inf times a zero prev, leaves the step size as it is)
//   step_size <- clamp(step_size * factor, step_size_min, step_size_max)   (max first, then min, as
//                torch.clamp; NaN propagates)
//   g <- 0 where x < 0 (torch zeroes the gradient where the factor is etaminus: the same elements)
//   p <- p - sign(g) * step_size;  prev <- g   (sign(NaN) = 0, as torch's: a NaN gradient leaves p)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct RpropParams {
    M grad_scale, etaminus, etaplus, step_size_min, step_size_max;
};

template <typename M>
FASTOPT_HD void rprop_math(M& p, M g, M& prev, M& step_size, const RpropParams<M>& h) {
    g = g * h.grad_scale;
    M x = g * prev;
    M factor = x > M(0) ? h.etaplus : (x < M(0) ? h.etaminus : M(1));
    M s = step_size * factor;
    s = s < h.step_size_min ? h.step_size_min : s;
    s = s > h.step_size_max ? h.step_size_max : s;
    step_size = s;
    if (x < M(0)) g = M(0);
    p = p - (g == g ? fo_sign(g) : M(0)) * s;
    prev = g;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits (none)
template <typename M, int V>
struct RpropOp {
    typedef RpropParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { rprop_math<M>(p, g, a, b, h); }
};

}  // namespace fastopt
