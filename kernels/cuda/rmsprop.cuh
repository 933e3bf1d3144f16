// RMSprop, plain or centered, with or without momentum (torch.optim.RMSprop).
//   g <- g * grad_scale + weight_decay * p
//   sq <- alpha * sq + ((1 - alpha) * g) * g   (torch's addcmul order: alpha = 1 adds 0 where g * g overflows)
//   centered: ga <- alpha * ga + (1 - alpha) * g;  avg = sqrt(sq - ga * ga) + eps
//   else:     avg = sqrt(sq) + eps
//   momentum: buf <- momentum * buf + g / avg;  p <- p - lr * buf
//   else:     p <- p - lr * g / avg
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct RmspropParams {
    M grad_scale, lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
};

// variant bits: 1 centered, 2 momentum
template <typename M>
FASTOPT_HD void rmsprop_math(M& p, M g, M& sq, M& ga, M& buf, const RmspropParams<M>& h, bool centered,
                             bool momentum) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.weight_decay, p);
    sq = h.alpha * sq + (h.one_minus_alpha * g) * g;
    M avg;
    if (centered) {
        ga = h.alpha * ga + h.one_minus_alpha * g;
        avg = fo_sqrt(sq - ga * ga) + h.eps;
    } else {
        avg = fo_sqrt(sq) + h.eps;
    }
    if (momentum) {
        buf = h.momentum * buf + g / avg;
        p = p - h.lr * buf;
    } else {
        p = p - h.lr * (g / avg);
    }
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct RmspropOp {
    typedef RmspropParams<M> P;
    enum { USED = 1 | ((V & 1) ? 2 : 0) | ((V & 2) ? 4 : 0) };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M& c) const { rmsprop_math<M>(p, g, a, b, c, h, V & 1, V & 2); }
};

}  // namespace fastopt
