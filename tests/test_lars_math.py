"""kernels/cuda/lars.cuh (compiled here with the host C++ compiler and the CPU build's flags) against the
NumPy reference fastopt.reference.lars_step, bit for bit: given the same per-tensor trust ratio (phase 1's
result, float64), phase 2's per-element math rounds exactly like the reference in float32 and float64, for
every variant (plain, momentum, Nesterov), an adapted and an excluded tensor, maximize and grad_scale.
The CPU backend runs this math through LarsOp (the coefficient per tensor from specs._lars_coefs);
tests/test_lars.py checks that path against pytorch_optimizer."""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from fastopt import reference
from fastopt.specs import LARS

KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "cuda")

SHIM = r"""
#include "lars.cuh"
using namespace fastopt;

template <typename M, int V>
static void apply(M* p, const M* g, M* buf, long n, const double* s, double trust, int adapt) {
    LarsParams<M> h = {M(s[0]), M(s[1]), M(s[2]), M(s[3]), M(s[4]), M(s[5]), M(s[6])};
    M dummy = M(0);
    for (long i = 0; i < n; ++i) lars_apply_math<M, V>(p[i], g[i], buf ? buf[i] : dummy, h, M(trust), adapt != 0);
}

template <typename M>
static void dispatch(M* p, const M* g, M* buf, long n, const double* s, double trust, int adapt, int variant) {
    if (variant == 0) apply<M, 0>(p, g, buf, n, s, trust, adapt);
    if (variant == 1) apply<M, LARS_MOMENTUM>(p, g, buf, n, s, trust, adapt);
    if (variant == 3) apply<M, LARS_MOMENTUM | LARS_NESTEROV>(p, g, buf, n, s, trust, adapt);
}

extern "C" {
void apply_f32(float* p, const float* g, float* buf, long n, const double* s, double trust, int adapt, int variant) {
    dispatch<float>(p, g, buf, n, s, trust, adapt, variant);
}
void apply_f64(double* p, const double* g, double* buf, long n, const double* s, double trust, int adapt, int variant) {
    dispatch<double>(p, g, buf, n, s, trust, adapt, variant);
}
double trust_ratio(double pn, double gn, double wd, double tc, double eps) {
    return lars_trust_ratio<double>(pn, gn, wd, tc, eps);
}
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("lars")
    src, out = d / "shim.cpp", d / "shim.so"
    src.write_text(SHIM)
    # the CPU build's flags that matter for rounding (setup.py): -O3, no FMA contraction
    subprocess.run([cxx, "-std=c++14", "-O3", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    f"-I{KERNELS}", str(src), "-o", str(out)], check=True, capture_output=True)
    so = ctypes.CDLL(str(out))
    P = ctypes.c_void_p
    for name in ("apply_f32", "apply_f64"):
        getattr(so, name).argtypes = [P, P, P, ctypes.c_long, P, ctypes.c_double, ctypes.c_int, ctypes.c_int]
    so.trust_ratio.restype = ctypes.c_double
    so.trust_ratio.argtypes = [ctypes.c_double] * 5
    return so


def _kernel_step(lib, p, g, buf, hp, grad_scale):
    """One LARS step the way a compiled backend would run it: phase 1's norms and ratio on the host in float64
    (the reference's norms here, so that only phase 2's rounding is compared), phase 2 in lars.cuh."""
    hp, _ = LARS.validate(hp, 1)
    s = np.array(LARS.scalars(hp, 1, 1.0 if grad_scale is None else grad_scale), np.float64)
    adapt = not (hp["exclude_1d"] and p.ndim <= 1)
    trust = 1.0
    if adapt:
        gs = abs(s[0])
        trust = lib.trust_ratio(math.sqrt(reference.sumsq(p)), math.sqrt(reference.sumsq(g * g.dtype.type(gs))),
                                hp["weight_decay"], hp["trust_coefficient"], hp["eps"])
    fn = lib.apply_f32 if p.dtype == np.float32 else lib.apply_f64
    fn(p.ctypes.data, g.ctypes.data, None if buf is None else buf.ctypes.data, p.size, s.ctypes.data, trust,
       int(adapt), LARS.variant(hp, 1))


OPTIONS = [dict(momentum=0.0), dict(), dict(nesterov=True, dampening=0.1), dict(weight_decay=0.05),
           dict(weight_decay=0.05, nesterov=True, maximize=True), dict(trust_coefficient=0.02, eps=1e-3, momentum=0.5),
           dict(exclude_1d=False, weight_decay=0.01)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
@pytest.mark.parametrize("shape", [(0,), (1,), (37,), (9, 7)])
@pytest.mark.parametrize("grad_scale", [None, 0.5])
def test_lars_header_equals_reference_bit_for_bit(lib, options, dtype, shape, grad_scale, rng):
    hp = dict(LARS.defaults, lr=0.5, **options)
    p = rng.standard_normal(shape).astype(dtype)
    q, start = p.copy(), p.copy()
    momentum = hp["momentum"] > 0
    buf = np.zeros_like(p) if momentum else None
    qbuf = np.zeros_like(p) if momentum else None
    for _ in range(20):
        g = rng.standard_normal(shape).astype(dtype)
        reference.lars_step(p, g, buf, grad_scale=grad_scale, **hp)
        _kernel_step(lib, q, g, qbuf, hp, grad_scale)
    np.testing.assert_array_equal(q, p)
    if momentum:
        np.testing.assert_array_equal(qbuf, buf)
    assert p.size == 0 or not np.array_equal(p, start)  # the steps did something


def test_lars_trust_ratio_header_equals_reference(lib):
    for pn, gn, wd, tc, eps in [(2.0, 3.0, 0.01, 1e-3, 0.0), (0.0, 1.0, 0.1, 1e-3, 0.0), (1.0, 0.0, 0.0, 1e-3, 0.0),
                                (1.0, 0.0, 0.0, 1e-3, 1e-8), (1e-30, 1e30, 0.5, 0.02, 1e-6), (5.0, 0.0, 0.1, 1.0, 0.0)]:
        assert lib.trust_ratio(pn, gn, wd, tc, eps) == reference.lars_trust_ratio(
            pn, gn, weight_decay=wd, trust_coefficient=tc, eps=eps)
