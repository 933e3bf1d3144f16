// ASGD (torch.optim.ASGD): averaged SGD. eta and mu are functions of the step, computed on the host.
//   g <- g * grad_scale + weight_decay * p
//   p <- p * decay - eta * g,             decay = 1 - lambd * eta
//   mu != 1: ax <- ax + (p - ax) * mu
//   mu == 1: ax <- p                        (torch copies then; mu is compared in the math type, as
//                                            torch compares its stored mu)
#pragma once
#include "common.cuh"
#include "ops.cuh"

namespace fastopt {

template <typename M>
struct AsgdParams {
    M grad_scale, weight_decay, decay, eta, mu;
};

template <typename M>
FASTOPT_HD void asgd_math(M& p, M g, M& ax, const AsgdParams<M>& h) {
    g = g * h.grad_scale;
    g = fo_add_scaled(g, h.weight_decay, p);
    p = p * h.decay;
    p = p - h.eta * g;
    ax = fo_uniform_select(h.mu != M(1), ax + (p - ax) * h.mu, p);  // ax read either way (common.cuh)
}

// the functor of update.cu and cpu_loops.hpp (ops.cuh); V: the variant bits (none)
template <typename M, int V>
struct AsgdOp {
    typedef AsgdParams<M> P;
    enum { USED = 1 };
    P h;
    FASTOPT_OP void operator()(M& p, M g, M& a, M&, M&) const { asgd_math<M>(p, g, a, h); }
};

}  // namespace fastopt
