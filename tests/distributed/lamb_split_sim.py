"""LAMB's two passes on the Numba backend (run with NUMBA_ENABLE_CUDASIM=1 by tests/distributed/test_lamb.py):
run_phase1's per-array sums of p^2 and u^2 and run_phase2 with given scaled lrs on device arrays equal the NumPy
backend's passes within rounding, and a wrong count of scaled lrs is refused before any launch."""
import numpy as np
from numba import cuda

from fastopt.backends import numba_backend, numpy_backend
from fastopt.specs import get_spec

LAMB = get_spec("lamb")
NAMES = ("params", "grads", "exp_avg", "exp_avg_sq")
rng = np.random.default_rng()
shapes = [(5,), (0,), (40,), (2, 3), (1, 4, 2)]
for dtype in (np.float32, np.float64):
    hp, step = LAMB.validate(dict(LAMB.defaults, lr=0.01, weight_decay=0.01), 2)
    host = [[rng.standard_normal(s).astype(dtype).reshape(-1) for s in shapes] for _ in range(2)]
    host += [[(0.1 * np.abs(rng.standard_normal(s))).astype(dtype).reshape(-1) for s in shapes] for _ in range(2)]
    dev = [[cuda.to_device(a) for a in lst] for lst in host]
    ref = [[a.copy() for a in lst] for lst in host]
    sums = numba_backend.run_phase1(numba_backend.prepare(tuple(dev), NAMES), LAMB, hp, step, 0.5)
    ref_sums = numpy_backend.run_phase1(numpy_backend.prepare(tuple(ref), NAMES), LAMB, hp, step, 0.5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    assert sums.shape == (len(shapes), 2) and sums[1].tolist() == [0.0, 0.0], sums
    np.testing.assert_allclose(sums, ref_sums, **tol)
    lrs = np.array([0.01, 0.5, 0.02, 0.003, 0.04])
    numba_backend.run_phase2(numba_backend.prepare(tuple(dev), NAMES), LAMB, hp, step, 0.5, lrs)
    numpy_backend.run_phase2(numpy_backend.prepare(tuple(ref), NAMES), LAMB, hp, step, 0.5, lrs)
    for k, name in ((0, "params"), (2, "exp_avg"), (3, "exp_avg_sq")):
        for i in range(len(shapes)):
            np.testing.assert_allclose(dev[k][i].copy_to_host(), ref[k][i], **tol, err_msg=f"{name}[{i}]")
    before = [a.copy_to_host() for a in dev[0]]
    try:
        numba_backend.run_phase2(numba_backend.prepare(tuple(dev), NAMES), LAMB, hp, step, 0.5, lrs[:2])
    except ValueError as e:
        assert "scaled_lr" in str(e), e
    else:
        raise AssertionError("a wrong count of scaled_lr was accepted")
    assert all(np.array_equal(a.copy_to_host(), b) for a, b in zip(dev[0], before))
print("LAMB SPLIT SIM: ok")
