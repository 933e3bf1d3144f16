"""LARS on the Numba backend with tensor_coefs= given (run with NUMBA_ENABLE_CUDASIM=1 by
tests/distributed/test_lars.py): flat device views of the params with the whole tensors' trust ratios given
equal the NumPy backend given the same ratios, and a wrong count is refused before any launch."""
import numpy as np
from numba import cuda

from fastopt import functional
from fastopt.specs import get_spec

LARS = get_spec("lars")
rng = np.random.default_rng()
shapes = [(5,), (0,), (40,), (2, 3), (1, 4, 2)]
for dtype in (np.float32, np.float64):
    hp = dict(LARS.defaults, lr=0.5, weight_decay=0.01, nesterov=True)
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    bs = [(0.1 * rng.standard_normal(s)).astype(dtype) for s in shapes]
    coefs = np.array([-1.0, 0.5, 0.002, 0.003, -1.0])
    ref_p, ref_b = [p.copy() for p in ps], [b.copy() for b in bs]
    dp = [cuda.to_device(p.reshape(-1)) for p in ps]
    db = [cuda.to_device(b.reshape(-1)) for b in bs]
    for t in range(2):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        functional.apply_update(LARS, dp, [cuda.to_device(g.reshape(-1)) for g in gs], (db,), hp, 1,
                                grad_scale=0.5, backend="numba", tensor_coefs=coefs)
        functional.apply_update(LARS, ref_p, gs, (ref_b,), hp, 1, grad_scale=0.5, backend="numpy",
                                tensor_coefs=coefs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    for i in range(len(shapes)):
        np.testing.assert_allclose(dp[i].copy_to_host(), ref_p[i].reshape(-1), **tol, err_msg=f"params[{i}]")
        np.testing.assert_allclose(db[i].copy_to_host(), ref_b[i].reshape(-1), **tol, err_msg=f"buf[{i}]")
    try:
        functional.apply_update(LARS, dp, dp, (db,), hp, 1, backend="numba", tensor_coefs=coefs[:2])
    except ValueError as e:
        assert "tensor_coefs" in str(e), e
    else:
        raise AssertionError("a wrong count of tensor_coefs was accepted")
print("LARS COEFS SIM: ok")
