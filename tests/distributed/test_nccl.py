"""fastopt.distributed over CuPy's NCCL on a GPU (skipped without one, or without NCCL): one rank on one
GPU (NCCL refuses two ranks on the same device), bit for bit the single-process class on CuPy arrays,
with clipping and NaN skipping, and a sharded checkpoint round trip."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.distributed import ShardedOptimizer, unsupported_reason
from fastopt.specs import REGISTRY

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_comm():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except Exception as e:  # no driver
        pytest.skip(f"no CUDA GPU ({type(e).__name__})")
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("CuPy was built without NCCL, or libnccl is missing")
    return nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)


@pytest.mark.parametrize("name", [s.name for s in REGISTRY.values() if unsupported_reason(s) is None])
def test_nccl_one_rank_equals_single_process(nccl_comm, name, tmp_path):
    import cupy as cp
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) for s in [(7, 3), (1001,), (1,)]]
    params = [cp.asarray(h) for h in host]
    ref = [cp.asarray(h) for h in host]
    hp = dict(lr=1e-3, clip_grad_norm=1.0, skip_nonfinite=True)
    opt = ShardedOptimizer(name, params, nccl_comm, **hp)
    single = getattr(fastopt, REGISTRY[name].class_name)(ref, **{k: v for k, v in hp.items() if k != "clip_grad_norm"})
    for t in range(5):
        g = [cp.asarray(rng.standard_normal(h.shape).astype(np.float32) * 0.01) for h in host]  # norm < 1: no clip
        opt.step(g)
        single.step(g)
    for a, b in zip(params, ref):
        assert cp.array_equal(a, b)
    opt.save(str(tmp_path / "ck"))
    again = ShardedOptimizer(name, [cp.zeros_like(p) for p in params], nccl_comm, **hp)
    again.load(str(tmp_path / "ck"))
    assert all(cp.array_equal(a, b) for a, b in zip(again.params, params))


@pytest.mark.parametrize("mode", ["bf16-params", "bf16-state", "bf16-kahan", "bf16-stochastic", "int8",
                                  "int8-bf16-stochastic"])
def test_nccl_one_rank_precision_modes_equal_the_cpu_class(nccl_comm, mode, tmp_path):
    """The precision modes over NCCL (bfloat16 flat buffers gathered as their bits, float32 grads of 16-bit
    params, 8-bit shards): bit for bit the CPU class on the mean gradient (tests/gpu/test_sharded_emulation.py
    checks worlds 1-3 without a GPU); a sharded checkpoint round trip."""
    import cupy as cp
    pytest.importorskip("ml_dtypes")
    from tests.distributed import test_precision as host_tests
    dtype, options = host_tests.MODES[mode]
    params = [cp.asarray(p) for p in host_tests.make_params(dtype)]
    opt = ShardedOptimizer("adam", params, nccl_comm, **host_tests.OPTIMIZERS["adam"], **options)
    for t in range(5):
        opt.step([cp.asarray(g) for g in host_tests.grads_for(1, t, 0, params)])
    ref_params, ref = host_tests.single_process("adam", dtype, options, 5, 1)
    host_tests.check_against(ref_params, ref, [(params, opt)])
    opt.save(str(tmp_path / "ck"))
    again = ShardedOptimizer("adam", [cp.zeros_like(p) for p in params], nccl_comm, **host_tests.OPTIMIZERS["adam"],
                             **options)
    again.load(str(tmp_path / "ck"))
    host_tests.check_against(ref_params, ref, [(again.params, again)])
