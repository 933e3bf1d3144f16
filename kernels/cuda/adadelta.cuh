// Adadelta (torch.optim.Adadelta).
//   g <- g * grad_scale + weight_decay * p
//   sq <- rho * sq + ((1 - rho) * g) * g   (torch's addcmul order: rho = 1 adds 0 where g * g overflows)
//   delta = sqrt(acc + eps) / sqrt(sq + eps) * g
//   acc <- rho * acc + ((1 - rho) * delta) * delta
//   p <- p - lr * delta
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AdadeltaParams {
    M grad_scale, lr, rho, one_minus_rho, eps, weight_decay;
};

template <typename M>
FASTOPT_HD void adadelta_math(M& p, M g, M& sq, M& acc, const AdadeltaParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.weight_decay, p);
    sq = h.rho * sq + (h.one_minus_rho * g) * g;
    M std = fo_sqrt(sq + h.eps);
    M delta = fo_sqrt(acc + h.eps) / std * g;
    acc = h.rho * acc + (h.one_minus_rho * delta) * delta;
    p = p - h.lr * delta;
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits (none)
template <typename M, int V>
struct AdadeltaOp {
    typedef AdadeltaParams<M> P;
    enum { USED = 3 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M& b, M&) const { adadelta_math<M>(p, g, a, b, h); }
};

}  // namespace fastopt
