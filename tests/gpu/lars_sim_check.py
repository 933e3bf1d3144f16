"""LARS on the Numba backend against fastopt.reference (run with NUMBA_ENABLE_CUDASIM=1: tests/test_lars.py)."""
import numpy as np
from numba import cuda

import fastopt
from fastopt import reference

rng = np.random.default_rng()
for dtype, options in ((np.float32, dict(lr=1.0, weight_decay=0.01, nesterov=True)),
                       (np.float64, dict(lr=0.5, momentum=0.0, exclude_1d=False)),
                       (np.float64, dict(lr=0.5, dampening=0.1, trust_coefficient=0.01))):
    shapes = [(5,), (0,), (70,), (2, 3), (1, 4, 2)]
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    bs = [(0.1 * rng.standard_normal(s)).astype(dtype) for s in shapes]
    ref_p, ref_b = [p.copy() for p in ps], [b.copy() for b in bs]
    dp, db = [cuda.to_device(p) for p in ps], [cuda.to_device(b) for b in bs]
    momentum = options.get("momentum", 0.9) > 0
    for t in range(3):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        dg = [cuda.to_device(g) for g in gs]
        fastopt.lars_step(dp, dg, db if momentum else None, **options, backend="numba", grad_scale=0.5)
        for p, g, b in zip(ref_p, gs, ref_b):
            reference.lars_step(p, g, b if momentum else None, **options, grad_scale=0.5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for i, (a, b) in enumerate(zip(dp, ref_p)):
        np.testing.assert_allclose(a.copy_to_host(), b, **tol, err_msg=f"{dtype.__name__} {options} params[{i}]")
    if momentum:
        for i, (a, b) in enumerate(zip(db, ref_b)):
            np.testing.assert_allclose(a.copy_to_host(), b, **tol, err_msg=f"{dtype.__name__} momentum_buffer[{i}]")
    # the 1-D param under exclude_1d moved like plain SGD with momentum (its ratio unused): it moved
    assert not np.array_equal(dp[0].copy_to_host(), ps[0])
print("LARS SIM: ok")
