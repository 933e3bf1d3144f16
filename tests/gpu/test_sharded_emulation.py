"""ShardedOptimizer on GPU arrays (issue 15 with issue 13's precision modes), on the CPU: the CUDA emulation's
stand-in CuPy arrays (tests/gpu/cuda_emulator.py runs the very kernels the CuPy backend launches) and ranks as
threads whose collectives exchange host views of the device memory (a stand-in for NCCL; sums in rank order,
exact for the tests' gradients). What it proves without a GPU: the sharded GPU path (flat device buffers, shard
states from init_state on device slices, pieces of 8-bit state with their blocks' scales, bfloat16 buffers moved
as their bits, float32 gradients of 16-bit params, checkpoints copied to and from the device) gives every rank
the params and state pieces of the single-process CPU class applied to the mean gradient, bit for bit, for the
precision modes of tests/distributed/test_precision.py and plain float32, at worlds 1-3. NCCL itself runs in
tests/distributed/test_nccl.py on a GPU."""
from __future__ import annotations

import functools
import platform
import shutil

import numpy as np
import pytest

import fastopt
from fastopt.backends import cuda_source
from fastopt.distributed import ShardedOptimizer
from tests.distributed import test_precision as host_tests
from tests.distributed.thread_comm import ThreadCommunicator, run_ranks
from test_cupy_launch_abi import use_cupy

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the emulated kernels are built with g++ for x86-64")

MODES = {"float32": (np.float32, {}), **host_tests.MODES}
_modules: dict = {}  # the backend's compiled modules, kept for the whole run


class EmulatedDeviceCommunicator(ThreadCommunicator):
    """ThreadCommunicator over the emulation's device arrays: buffers from its cupy.zeros, collectives on the
    host views of their memory (what NCCL would move on the device)."""
    engine = "emulated device"

    def __init__(self, world, rank, cp):
        super().__init__(world, rank)
        self.cp = cp

    def alloc(self, n, dtype):
        a = self.cp.zeros((n,), np.dtype(dtype))
        return a, a

    def as_array(self, x, name):
        import cuda_emulator
        if not isinstance(x, cuda_emulator.EmuArray):
            raise TypeError(f"{name} must be a device array, got {type(x).__name__}")
        return x

    def reduce_scatter(self, send, recv):
        return super().reduce_scatter(send.values, recv.values)

    def all_gather(self, flat, block):
        return super().all_gather(flat.values, block)


@pytest.fixture(scope="module")
def emu():
    import cuda_emulator
    return cuda_emulator.EmuCupy()


@pytest.fixture
def cp(emu, monkeypatch):
    monkeypatch.setattr(cuda_source, "IN_FLIGHT", 1)
    return use_cupy(monkeypatch, emu, _modules)


def _on_device(cp):
    """sharded_run's keywords for ranks on the emulated device."""
    return dict(communicator=lambda world, rank: EmulatedDeviceCommunicator(world, rank, cp), device=cp.from_host)


@pytest.mark.parametrize("world,bucket_bytes", [(1, 32 << 20), (2, 32 << 20), (3, 256)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(host_tests.OPTIMIZERS))
def test_device_shards_equal_the_cpu_class_bit_for_bit(cp, name, mode, world, bucket_bytes):
    dtype, options = MODES[mode]
    ranks = host_tests.sharded_run(name, dtype, options, world, steps=6, bucket_bytes=bucket_bytes, **_on_device(cp))
    assert all(type(opt.params[0]).__name__ == "EmuArray" for _, opt in ranks)  # the device path, not a copy
    ref_params, ref_opt = host_tests.single_process(name, dtype, options, 6, world)
    host_tests.check_against(ref_params, ref_opt, ranks)


@pytest.mark.parametrize("mode", ["int8", "bf16-kahan", "int8-bf16-stochastic"])
def test_device_checkpoint_saved_at_world3_loads_at_world2(cp, tmp_path, mode):
    """The shards' device state copied to the files (codes, scales, compensation) at world 3 and back onto the
    device at world 2: 4 + 3 steps equal the class's (the mean gradient of 3 ranks, then of 2)."""
    dtype, options = MODES[mode]
    ck = str(tmp_path / "ck")
    run = functools.partial(host_tests.sharded_run, "adam", dtype, options, **_on_device(cp))
    run(3, steps=4, save=ck)
    ranks = run(2, steps=3, load=ck)
    ref_params = host_tests.make_params(dtype)
    ref = fastopt.Adam(ref_params, **host_tests.OPTIMIZERS["adam"], **options)
    for t in range(7):
        ref.step(host_tests.mean_grads(1, t, ref_params, 3 if t < 4 else 2))
    host_tests.check_against(ref_params, ref, ranks)


@pytest.mark.parametrize("mode", ["float32", "bf16-params", "int8"])
def test_device_nan_on_one_rank_skips_the_step_everywhere_and_clipping_matches(cp, mode):
    """skip_nonfinite: a NaN in one rank's gradient skips the step on every rank, every device byte unchanged;
    clip_grad_norm: the norm of the mean gradient from the shards' sums (another summation order than the
    class's, so compared within float32 rounding)."""
    dtype, options = MODES[mode]
    options = dict(options, clip_grad_norm=1.0, skip_nonfinite=True)

    def rank_fn(comm):
        params = [cp.from_host(p) for p in host_tests.make_params(dtype)]
        opt = ShardedOptimizer("adam", params, comm, **host_tests.OPTIMIZERS["adam"], **options)
        for t in range(3):
            opt.step([cp.from_host(g) for g in host_tests.grads_for(1, t, comm.rank, params)])
        before = [p.get().tobytes() for p in params] + [host_tests.host(s).tobytes() for s in _plain_states(opt)]
        grads = host_tests.grads_for(1, 3, comm.rank, params)
        if comm.rank == 1:
            grads[2][0] = np.nan
        assert opt.step([cp.from_host(g) for g in grads]) is False
        after = [p.get().tobytes() for p in params] + [host_tests.host(s).tobytes() for s in _plain_states(opt)]
        assert after == before and opt.skipped_steps == 1
        return params, opt

    ranks = run_ranks(2, rank_fn, _on_device(cp)["communicator"])
    ref_params = host_tests.make_params(dtype)
    ref = fastopt.Adam(ref_params, **host_tests.OPTIMIZERS["adam"], **options)
    for t in range(3):
        ref.step(host_tests.mean_grads(1, t, ref_params, 2))
    for params, _ in ranks:
        for a, b in zip(params, ref_params):
            np.testing.assert_allclose(a.get().astype(np.float64), b.astype(np.float64), rtol=1e-5, atol=1e-7)


def _plain_states(opt):
    """Every state array of a rank (an 8-bit state's codes and scales), for byte comparisons."""
    out = []
    for states in opt.shard_states():
        for a in states.values():
            out.extend((a.codes, a.absmax) if hasattr(a, "codes") else (a,))
    return out


@pytest.mark.parametrize("mode", ["bf16-kahan", "bf16-stochastic"])
def test_device_lamb_shards_round_as_the_host_shards(cp, monkeypatch, mode):
    """LAMB's two passes on device shards of bfloat16 params with kahan=True or stochastic rounding (run_phase1's
    sums, the all-reduce, run_phase2 in the rounding's module: the compensation in the table's c column, the key
    and each piece's index offset in the scalars) at world 2: every rank's params and state pieces equal the host
    shards' (the CPU kernels') bit for bit; the trust ratios' sums are float64 and the tests' sizes fit one chunk."""
    monkeypatch.setitem(host_tests.OPTIMIZERS, "lamb", dict(lr=0.01, weight_decay=0.01))
    dtype, options = MODES[mode]
    device = host_tests.sharded_run("lamb", dtype, options, 2, steps=5, **_on_device(cp))
    assert all(type(opt.params[0]).__name__ == "EmuArray" for _, opt in device)
    hosted = host_tests.sharded_run("lamb", dtype, options, 2, steps=5)
    for (dp, dopt), (hp, hopt) in zip(device, hosted):
        assert [host_tests.host(a).tobytes() for a in dp] == [a.tobytes() for a in hp]
        for ds, hs in zip(dopt.shard_states(), hopt.shard_states()):
            assert {k: host_tests.host(a).tobytes() for k, a in ds.items()} == {k: a.tobytes() for k, a in hs.items()}
        assert ("kahan_comp" in dopt.shard_states()[0]) == ("kahan" in mode)
