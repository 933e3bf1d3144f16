// SGD with momentum, dampening and Nesterov (torch.optim.SGD).
//   g <- g * grad_scale + weight_decay * p
//   momentum: buf <- g on the first step, else momentum * buf + (1 - dampening) * g
//             g   <- g + momentum * buf (nesterov)  or  buf
//   p <- p - lr * g
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct SgdParams {
    M grad_scale, lr, momentum, one_minus_dampening, weight_decay;
};

// variant bits (fastopt/specs.py SGD_*): 1 momentum, 2 nesterov, 4 first step (buffer <- g)
template <typename M>
FASTOPT_HD void sgd_math(M& p, M g, M& buf, const SgdParams<M>& h, bool momentum, bool nesterov, bool first) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.weight_decay, p);
    if (momentum) {
        buf = first ? g : h.momentum * buf + h.one_minus_dampening * g;
        g = nesterov ? g + h.momentum * buf : buf;
    }
    p = p - h.lr * g;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above
template <typename M, int V>
struct SgdOp {
    typedef SgdParams<M> P;
    enum { USED = (V & 1) ? 1 : 0 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M&, M&) const { sgd_math<M>(p, g, a, h, V & 1, V & 2, V & 4); }
};

}  // namespace fastopt
