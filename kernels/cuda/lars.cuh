// LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), as pytorch_optimizer.LARS:
// SGD with momentum whose gradient is scaled per tensor by a trust ratio (a local learning rate).
//   phase 1 (per tensor, float64): ||p|| and ||g|| (g already times grad_scale), nothing written
//            trust = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps),
//                    1 when ||p|| or ||g|| + weight_decay * ||p|| is 0            (lars_trust_ratio)
//            excluded tensors (exclude_1d and ndim <= 1: biases, norm weights): no trust ratio, no weight decay
//   phase 2 (elementwise, per tensor `trust`, `adapt` = not excluded):
//            g <- g * grad_scale
//            adapt: g <- (g + weight_decay * p) * trust
//            momentum: buf <- momentum * buf + (1 - dampening) * g      (buf starts at 0)
//                      g   <- g + momentum * buf (nesterov)  or  buf
//            p <- p - lr * g
//
// Unlike LAMB, the norms are those of p and g BEFORE any state changes, and the per-tensor ratio
// multiplies the gradient before it enters the momentum buffer. So LARS is an elementwise family whose
// functor reads one number per tensor (`coef`, ops.cuh): the backends sum the squares of p and g per tensor
// first, compute the ratios on the host (fastopt/specs.py _lars_coefs: the same float64 formula as
// lars_trust_ratio below, -1 for an excluded tensor), then run LarsOp with its tensor's coef.
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct LarsParams {
    M grad_scale, lr, momentum, one_minus_dampening, weight_decay, trust_coefficient, eps;
};

// variant bits (fastopt/specs.py LARS_*): 1 momentum (the buffer is read and written), 2 nesterov
enum { LARS_MOMENTUM = 1, LARS_NESTEROV = 2 };

// phase 1's result, per tensor, float64 on every backend: the factor the (weight-decayed) gradient is scaled by
template <typename M>
FASTOPT_HD M lars_trust_ratio(M param_norm, M grad_norm, M weight_decay, M trust_coefficient, M eps) {
    M denom = grad_norm + weight_decay * param_norm;
    return (param_norm > M(0) && denom > M(0)) ? trust_coefficient * param_norm / (denom + eps) : M(1);
}

// phase 2, one element; trust and adapt are the tensor's (trust ignored when !adapt)
template <typename M, int V>
FASTOPT_HD void lars_apply_math(M& p, M g, M& buf, const LarsParams<M>& h, M trust, bool adapt) {
    g = g * h.grad_scale;
    if (adapt) g = fo_add_scaled(g, h.weight_decay, p) * trust;
    if (V & LARS_MOMENTUM) {
        buf = h.momentum * buf + h.one_minus_dampening * g;
        g = (V & LARS_NESTEROV) ? g + h.momentum * buf : buf;
    }
    p = p - h.lr * g;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits above. coef: the tensor's trust
// ratio, or a negative number for a tensor that takes none (exclude_1d): set per tensor by the loops
// (fo_make_op) and by update.cu's FO_PER_TENSOR_ENTRIES.
template <typename M, int V>
struct LarsOp {
    typedef LarsParams<M> P;
    enum { USED = (V & LARS_MOMENTUM) ? 1 : 0 };
    P h;
    M coef;
    FASTOPT_OP void operator()(M& p, M g, M& buf, M&, M&) const {
        lars_apply_math<M, V>(p, g, buf, h, coef, !(coef < M(0)));
    }
};

}  // namespace fastopt
