"""SparseAdam on a real GPU (skipped without one): fastopt.SparseAdam on CuPy arrays equals the same class on
NumPy arrays (same gradients, repeats and unsorted rows included), bad indices on the GPU raise and write
nothing, and fastopt.torch.SparseAdam on CUDA tensors matches torch.optim.SparseAdam on CUDA."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_cupy_equals_numpy(cp, dtype, maximize):
    rng = np.random.default_rng(0)
    shapes = [(300, 17), (5,), (7, 3, 2)]
    host = [rng.standard_normal(s).astype(dtype) for s in shapes]
    dev = [cp.asarray(p) for p in host]
    h_opt = fastopt.SparseAdam(host, lr=0.01, betas=(0.8, 0.95), maximize=maximize)
    d_opt = fastopt.SparseAdam(dev, lr=0.01, betas=(0.8, 0.95), maximize=maximize)
    for step in range(20):
        grads = []
        for s in shapes:
            nnz = int(rng.integers(0, 2 * s[0] + 1))
            grads.append((rng.integers(0, s[0], nnz), rng.standard_normal((nnz, *s[1:])).astype(dtype)))
        h_opt.step(grads)
        d_opt.step([(cp.asarray(i), cp.asarray(v)) for i, v in grads])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    for h, d in zip(host, dev):
        np.testing.assert_allclose(cp.asnumpy(d), h, **tol)
    for i in range(len(shapes)):
        np.testing.assert_allclose(cp.asnumpy(d_opt.state[i]["exp_avg_sq"]), h_opt.state[i]["exp_avg_sq"], **tol)
        assert d_opt.state[i]["step"] == h_opt.state[i]["step"] == 20


def test_cupy_bad_indices_write_nothing(cp):
    p = cp.zeros((4, 3), cp.float32)
    opt = fastopt.SparseAdam([p])
    with pytest.raises(ValueError, match=r"grads\[0\] indices out of range: row index 4"):
        opt.step([(cp.asarray([1, 4]), cp.ones((2, 3), cp.float32))])
    with pytest.raises(TypeError, match=r"grads\[0\] values are a host array"):
        opt.step([(cp.asarray([1]), np.ones((1, 3), np.float32))])
    assert opt.state == {} and not bool(p.any())


def test_torch_cuda_matches_torch(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import fastopt.torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    w0 = torch.randn(1000, 64, device="cuda", generator=gen)
    ref, mine = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    ro, mo = torch.optim.SparseAdam([ref], lr=0.01), fastopt.torch.SparseAdam([mine], lr=0.01)
    for _ in range(10):
        idx = torch.randint(0, 1000, (1, 300), device="cuda", generator=gen)
        g = torch.sparse_coo_tensor(idx, torch.randn(300, 64, device="cuda", generator=gen), (1000, 64))
        ref.grad, mine.grad = g.clone(), g.clone()
        ro.step(), mo.step()
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mo.state[mine]["exp_avg_sq"], ro.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-7)
