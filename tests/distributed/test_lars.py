"""ShardedOptimizer over LARS (issue 15 x issue 14), 1-4 ranks in one process (one thread per rank,
tests/distributed/thread_comm.py; the MPI runs are in test_mpi.py, scenario "lars").

LARS's trust ratio needs the norms of each WHOLE param and of its (mean, scaled) gradient, and the param's
real ndim (exclude_1d), while a shard holds flat pieces of params: each rank sums the squares of its pieces
(float64), ONE all-reduce (with the step's failed/clip/skip scalars) gives every param's sums, the ratios are
computed on the host from the scaled mean gradient as the class computes them (specs._lars_coefs), and the
shard's pieces are updated in one list call with their params' ratios given (functional.apply_update's
tensor_coefs=).

What is asserted:
- every rank ends with the same bits (each element is updated by its owner only, then all-gathered);
- against the single-process fastopt.LARS applied to the mean gradient: the sums of squares are added in
  another order (pieces per rank, then over ranks; and the class sums the rounded mean gradient, the shard
  the exact sum times 1/world), so the ratios differ in the last bits and the results agree within
  TOL (float32: rtol 1e-6, float64: rtol 1e-14, atol of that times the largest magnitude) after 6 steps
  (measured over 25 seeds x worlds 2-4 x every option: at most 6% of it in float32, 1% in float64);
  bit for bit at world 1 (one piece per param: the same sums);
- params cut across shard boundaries (small buckets, 3-4 ranks), of ndim 0 to 4, sizes 0 and 1, with
  exclude_1d on and off, float32, float64 and both in one optimizer; the momentum buffer pieces too;
- clip_grad_norm and skip_nonfinite (a NaN on one rank skips the step on every rank, nothing written);
- 16-bit params (+ Kahan, + stochastic rounding) and 8-bit state; a checkpoint saved at world 3 loads at
  world 2 and via gather() into the class;
- tensor_coefs= of functional.apply_update on the compiled, NumPy, CuPy (fake launches) and Numba (CUDA
  simulator) backends: flat views with the whole tensors' ratios given equal the whole tensors bit for bit;
  bad tensor_coefs raise naming it, with nothing written.
"""
from __future__ import annotations

import functools

import os
import subprocess
import sys

import numpy as np
import pytest

from fastopt import functional
from fastopt.distributed import unsupported_reason
from fastopt.specs import REGISTRY, get_spec
from tests.distributed import per_tensor
from tests.distributed.per_tensor import DTYPES, assert_close, assert_ranks_agree, cut_params, make_params

LARS = get_spec("lars")
OPTIONS = {
    "default": dict(lr=1.0),
    "wd-nesterov": dict(lr=1.0, weight_decay=0.01, nesterov=True),
    "no-momentum": dict(lr=0.5, momentum=0.0, weight_decay=0.02),
    "all-adapted": dict(lr=1.0, exclude_1d=False, weight_decay=0.01, dampening=0.1, maximize=True),
    "trust-eps": dict(lr=0.2, trust_coefficient=0.02, eps=1e-8, momentum=0.5, weight_decay=1e-3),
}


sharded = functools.partial(per_tensor.sharded, "lars")
single_process = functools.partial(per_tensor.single_process, "lars")


def state_pieces(ranks):
    """(param, first element, values) of every piece of momentum buffer the ranks hold."""
    out = []
    for _, opt in ranks:
        for b, states in zip(opt.layout.buckets, opt.shard_states()):
            lo, hi = b.shard_range(opt.rank)
            for i, e0, e1, pos in b.pieces(lo, hi):
                if "momentum_buffer" in states:
                    out.append((i, e0, states["momentum_buffer"][pos - lo:pos - lo + e1 - e0]))
    return out


def test_lars_and_lamb_are_sharded():
    assert unsupported_reason(LARS) is None
    assert unsupported_reason(REGISTRY["lamb"]) is None  # its two passes: tests/distributed/test_lamb.py


@pytest.mark.parametrize("world,bucket_bytes", [(1, 32 << 20), (1, 256), (2, 32 << 20), (3, 256), (4, 128)])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_equal_to_single_process_within_tolerance(world, bucket_bytes, dtypes, option, rng):
    seed = int(rng.integers(2 ** 31))
    hp = OPTIONS[option]
    ranks = sharded(world, seed, DTYPES[dtypes], hp, bucket_bytes)
    ref, ref_opt = single_process(world, seed, DTYPES[dtypes], hp)
    assert_ranks_agree(ranks)
    if world >= 3:
        assert cut_params(ranks), "no param is cut by a shard boundary: the test would not test the all-reduce"
    for i, (a, b) in enumerate(zip(ranks[0][0], ref)):
        if world == 1:  # one piece per param: the same sums of squares, the same ratios
            assert a.tobytes() == b.tobytes(), f"params[{i}]"
        else:
            assert_close(a, b, f"params[{i}] (seed {seed})")
    for i, e0, values in state_pieces(ranks):
        ref_buf = ref_opt.state_arrays(i)["momentum_buffer"].reshape(-1)[e0:e0 + values.size]
        assert_close(values, ref_buf, f"momentum_buffer of params[{i}] from {e0} (seed {seed})")
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ranks[0][1].params, ranks[0][0]))


def test_exclude_1d_reads_the_params_real_ndim(rng):
    """A (1, n) matrix and an (n,) vector of the same values, cut into pieces on 3 ranks: with exclude_1d the
    vector takes plain momentum SGD, the matrix its trust ratio (a piece alone is 1-D and would be excluded)."""
    seed = int(rng.integers(2 ** 31))
    shapes = [(1, 90), (90,)]
    hp = dict(lr=1.0, weight_decay=0.01)
    ranks = sharded(3, seed, [np.float64], hp, 256, steps=2, shapes=shapes)
    ref, _ = single_process(3, seed, [np.float64], hp, steps=2, shapes=shapes)
    assert cut_params(ranks) == {0, 1}
    for a, b in zip(ranks[0][0], ref):
        assert_close(a, b, "exclude_1d")
    plain = make_params(seed, [np.float64], shapes)[1]
    assert np.abs(ranks[0][0][1] - plain).max() > 0.1  # lr 1 plain SGD moves by the gradient
    assert np.abs(ranks[0][0][0] - make_params(seed, [np.float64], shapes)[0]).max() < 0.05  # ratio ~1e-3


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_and_skip_nonfinite(world, dtype, rng):
    """clip_grad_norm (it clips: the norm of the mean gradient is ~30) scales the gradient before the ratio
    (the ratio's ||g|| is the clipped mean's, as the class); a NaN on the last rank at step 3 skips the step on
    every rank with nothing written, and the class skips it too."""
    hp = dict(lr=1.0, weight_decay=0.01, clip_grad_norm=0.5, skip_nonfinite=True)
    per_tensor.clip_and_skip("lars", hp, world, dtype, int(rng.integers(2 ** 31)))


@pytest.mark.parametrize("world,bucket_bytes", [(1, 32 << 20), (3, 256), (4, 512)])
@pytest.mark.parametrize("mode", ["bf16", "bf16-kahan", "bf16-stochastic", "int8", "int8-bf16-stochastic"])
def test_precision_modes(world, bucket_bytes, mode, rng):
    """16-bit params (float32 gradients and math), with Kahan or stochastic rounding, and 8-bit state: bit for
    bit at world 1; else float32 results within TOL, and 16-bit params within one bfloat16 ulp (a ratio that
    differs in its last bits can round the other way) with at least 95% of the elements bit-equal."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    options = {"bf16": {}, "bf16-kahan": dict(kahan=True), "bf16-stochastic": dict(stochastic_rounding=True, seed=3),
               "int8": dict(state_dtype="int8"), "int8-bf16-stochastic": dict(state_dtype="int8",
                                                                              stochastic_rounding=True, seed=4)}[mode]
    cast = np.float32 if mode == "int8" else bf16
    hp = dict(lr=1.0, weight_decay=0.01, nesterov=True, **options)
    per_tensor.precision_run("lars", world, bucket_bytes, hp, cast, int(rng.integers(2 ** 31)))


def test_checkpoint_world3_to_world2_and_gather(tmp_path, rng):
    """Saved at world 3 after 4 steps (momentum buffers in the files), loaded at world 2, 3 more steps: within
    TOL of the class's 7 steps (the mean of 3 ranks, then of 2). gather() gives the ordinary checkpoint the
    class resumes from, with the sharded params bit for bit."""
    hp = dict(lr=1.0, weight_decay=0.01, nesterov=True)
    per_tensor.checkpoint_world3_to_world2("lars", hp, tmp_path, int(rng.integers(2 ** 31)))


# ---- tensor_coefs= on the backends ------------------------------------------------------------------------

def _whole_coefs(hp, grad_scale, params, grads):
    checked, _ = LARS.validate(hp, 1)
    sums = [[float(np.dot(a.astype(np.float64).ravel(), a.astype(np.float64).ravel())) for a in arrays]
            for arrays in (params, grads)]
    return LARS.tensor_coefs(checked, grad_scale, sums[0], sums[1], [p.ndim for p in params])


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_given_coefs_on_flat_views_equal_the_whole_tensors(backend, dtype, rng):
    """The whole tensors' ratios given to a call on their flattened views (all 1-D, which exclude_1d alone
    would leave unadapted) give the bits of the call on the tensors (the compiled backend: when its own sums
    are the ones given)."""
    from fastopt.kernels.cpu import _cpu_fast
    shapes = [(7, 3), (5,), (2, 2, 3), (1,), (0,), (3, 1, 2, 2)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    bufs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    hp = dict(LARS.defaults, lr=0.5, weight_decay=0.01, nesterov=True)
    whole, whole_buf = [p.copy() for p in params], [b.copy() for b in bufs]
    functional.apply_update(LARS, whole, grads, (whole_buf,), hp, 1, grad_scale=0.5, backend=backend)
    checked, _ = LARS.validate(hp, 1)
    if backend == "cython":  # the compiled sums (its own order), as its norms pass computes them
        coefs = LARS.tensor_coefs(checked, 0.5, _cpu_fast.sumsq_per_tensor(params), _cpu_fast.sumsq_per_tensor(grads),
                                  [p.ndim for p in params])
    else:
        coefs = _whole_coefs(hp, 0.5, params, grads)
    flat, flat_buf = [p.copy() for p in params], [b.copy() for b in bufs]
    functional.apply_update(LARS, [p.reshape(-1) for p in flat], [g.reshape(-1) for g in grads],
                            ([b.reshape(-1) for b in flat_buf],), hp, 1, grad_scale=0.5, backend=backend,
                            tensor_coefs=list(coefs))
    assert coefs[1] == coefs[3] == -1.0 and coefs[0] > 0
    for i in range(len(shapes)):
        assert flat[i].tobytes() == whole[i].tobytes() and flat_buf[i].tobytes() == whole_buf[i].tobytes(), i


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_given_coefs_with_int8_state_and_16bit_params(backend, rng):
    """The compiled 8-bit and 16-bit paths take the given ratios too: equal to the NumPy reference with the
    same ratios given."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    shapes = [(300,), (5, 7)]
    for dtype, state_dtype in ((np.float32, "int8"), (np.dtype(ml_dtypes.bfloat16), None)):
        params = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        coefs = np.array([float(rng.uniform(0.001, 0.01)), -1.0])
        out = []
        for be in (backend, "numpy"):
            ps = [p.copy() for p in params]
            state = functional.init_state("lars", ps, state_dtype=state_dtype)
            functional.apply_update(LARS, ps, grads, (state["momentum_buffer"],), dict(LARS.defaults, lr=1.0), 1,
                                    backend=be, tensor_coefs=coefs)
            out.append(ps)
        for a, b in zip(*out):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bad,exc,text", [
    ([0.1], ValueError, "tensor_coefs has shape (1,)"),
    ([0.1, 0.2, 0.3], ValueError, "one coefficient per array of the call (2)"),
    ([[0.1, 0.2]], ValueError, "tensor_coefs has shape (1, 2)"),
    ([True, False], TypeError, "tensor_coefs must hold real numbers"),
    ([1j, 2j], TypeError, "tensor_coefs must hold real numbers"),
    (["a", "b"], TypeError, "tensor_coefs must hold real numbers"),
    ([[0.1], [0.2, 0.3]], TypeError, "tensor_coefs must be a host array"),
])
@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_bad_tensor_coefs_write_nothing(bad, exc, text, backend, rng):
    params = [rng.standard_normal((4, 3)), rng.standard_normal(5)]
    grads = [rng.standard_normal(p.shape) for p in params]
    bufs = [np.ones_like(p) for p in params]
    before = [a.copy() for a in params + bufs]
    with pytest.raises(exc) as info:
        functional.apply_update(LARS, params, grads, (bufs,), dict(LARS.defaults, lr=1.0), 1, backend=backend,
                                tensor_coefs=bad)
    assert text in str(info.value)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params + bufs, before))
    # the backends check it themselves too (run() called directly, as the classes do)
    be = __import__(f"fastopt.backends.{backend}_backend", fromlist=["run"])
    prepared = be.prepare((params, grads, bufs), ("params", "grads", "momentum_buffer"))
    with pytest.raises(exc, match="tensor_coefs"):
        be.run(prepared, LARS, LARS.validate(dict(LARS.defaults, lr=1.0), 1)[0], 1, None, tensor_coefs=bad)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params + bufs, before))


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_tensor_coefs_for_an_optimizer_without_them_is_refused(backend):
    p, g = np.ones(4), np.ones(4)
    state = functional.init_state("adam", p)
    with pytest.raises(ValueError, match="tensor_coefs: adam_step reads no per-tensor coefficients"):
        functional.apply_update(get_spec("adam"), p, g, (state["exp_avg"], state["exp_avg_sq"], None),
                                dict(get_spec("adam").defaults, lr=0.1), 1, backend=backend, tensor_coefs=[1.0])
    assert np.array_equal(p, np.ones(4)) and not state["exp_avg"].any()


def test_cupy_backend_uses_the_given_coefs_without_a_norms_pass(monkeypatch):
    """CuPy (fake launches, tests/gpu/test_cupy_launch_abi.py): with tensor_coefs the call launches the update
    kernel only (no fo_sumsq), whose coefs argument holds the given numbers as float64."""
    from fastopt.backends import cuda_source, cupy_backend
    from tests.gpu import test_cupy_launch_abi as abi
    fake = abi.fake.__wrapped__(monkeypatch)
    hp = dict(LARS.defaults, lr=0.5, weight_decay=0.01)
    for dtype in (np.float32, np.float64):
        arrays, names = abi.update_arrays(fake, LARS, hp, dtype, 0, True)
        coefs = [0.25, -1.0, 0.5, 0.125]
        fake.launches.clear()
        cupy_backend.step(LARS, arrays, names, LARS.validate(hp, 1)[0], 1, None, tensor_coefs=coefs)
        abi.assert_launches_fit(fake, "given coefs")
        assert [launch.name for launch in fake.launches] == [
            cuda_source.update_kernel_name(LARS.kernel, LARS.variant(hp, 1), True)]
        given = abi.args_by_name(fake.launches[0])["coefs"]
        assert given.dtype == np.float64 and given.host.tolist() == coefs
        with pytest.raises(ValueError, match="one coefficient per array of the call"):
            cupy_backend.step(LARS, arrays, names, LARS.validate(hp, 1)[0], 1, None, tensor_coefs=coefs[:2])


def test_numba_backend_uses_the_given_coefs_on_the_simulator():
    """Numba on the CUDA simulator (a subprocess: NUMBA_ENABLE_CUDASIM must be set before numba is imported):
    flat device views with the whole tensors' ratios given equal the NumPy backend with the same ratios."""
    pytest.importorskip("numba")
    script = os.path.join(os.path.dirname(__file__), "lars_coefs_sim.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert out.returncode == 0 and "LARS COEFS SIM: ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
