// Per-element math of the clipping ops and norms.
//   clip_by_value: g <- min(max(g, -c), c)   (NaN stays NaN, like torch.clamp)
//   scale:         g <- g * coef
//   global-norm coefficient (host or device): coef = min(1, max_norm / (total_norm + 1e-6)), NaN kept
#pragma once
#include "common.cuh"

namespace fastopt {

template <typename M>
FASTOPT_HD M clamp_math(M g, M c) {
    M lo = -c;
    return g < lo ? lo : (g > c ? c : g);
}

template <typename M>
FASTOPT_HD M clip_coefficient(M total_norm, M max_norm) {
    M coef = max_norm / (total_norm + M(1e-6));
    return coef >= M(1) ? M(1) : coef;  // a NaN norm gives a NaN coefficient, as torch.clamp(max=1)
}

}  // namespace fastopt
