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

import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import functional
from fastopt.distributed import ShardedOptimizer, gather, unsupported_reason
from fastopt.specs import REGISTRY, get_spec
from tests.distributed.thread_comm import run_ranks

LARS = get_spec("lars")
SHAPES = [(7, 3), (101,), (1,), (0,), (), (33, 5), (2, 2, 3), (3, 2, 2, 2)]
OPTIONS = {
    "default": dict(lr=1.0),
    "wd-nesterov": dict(lr=1.0, weight_decay=0.01, nesterov=True),
    "no-momentum": dict(lr=0.5, momentum=0.0, weight_decay=0.02),
    "all-adapted": dict(lr=1.0, exclude_1d=False, weight_decay=0.01, dampening=0.1, maximize=True),
    "trust-eps": dict(lr=0.2, trust_coefficient=0.02, eps=1e-8, momentum=0.5, weight_decay=1e-3),
}
DTYPES = {"float32": [np.float32], "float64": [np.float64], "mixed": [np.float32, np.float64]}
TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-14}  # ~8 float32 ulps; ~50 float64 ulps
STEPS = 6


def make_params(seed, dtypes, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s), dtype=dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]


def grads_for(seed, t, rank, params, dtype=None):
    """Rank `rank`'s gradients at step t: multiples of 1/8, so their sums over ranks are exact in any order."""
    rng = np.random.default_rng([seed, t, rank])
    return [np.asarray(np.round(rng.standard_normal(p.shape) * 16) / 8, dtype=dtype or p.dtype) for p in params]


def mean_grads(seed, t, params, world, dtype=None):
    per_rank = [grads_for(seed, t, r, params, dtype) for r in range(world)]
    return [np.asarray(sum(g[i] for g in per_rank) * per_rank[0][i].dtype.type(1.0 / world))
            for i in range(len(params))]


def sharded(world, seed, dtypes, hp, bucket_bytes, steps=STEPS, shapes=SHAPES, cast=None, load=None, save=None,
            start=0):
    """Each rank's (params, optimizer) after `steps` steps of its own gradients."""
    def rank_fn(comm):
        params = make_params(seed, dtypes, shapes)
        if cast is not None:
            params = [p.astype(cast) for p in params]
        opt = ShardedOptimizer("lars", params, comm, bucket_bytes=bucket_bytes, **hp)
        if load is not None:
            opt.load(load)
        for t in range(start, start + steps):
            assert opt.step(grads_for(seed, t, comm.rank, params, np.float32 if cast else None)) is True
        if save is not None:
            opt.save(save)
        return params, opt
    return run_ranks(world, rank_fn)


def single_process(world, seed, dtypes, hp, steps=STEPS, shapes=SHAPES, cast=None):
    params = make_params(seed, dtypes, shapes)
    if cast is not None:
        params = [p.astype(cast) for p in params]
    opt = fastopt.LARS(params, **hp)
    for t in range(steps):
        opt.step(mean_grads(seed, t, params, world, np.float32 if cast else None))
    return params, opt


def assert_close(ours, ref, what):
    tol = TOL[np.dtype(ref.dtype)]
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * scale, err_msg=what)


def assert_ranks_agree(ranks):
    for params, _ in ranks[1:]:
        for i, (a, b) in enumerate(zip(params, ranks[0][0])):
            assert a.tobytes() == b.tobytes(), f"rank params[{i}] differ between ranks"


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


def cut_params(ranks):
    """The params whose elements are held by more than one rank (cut by a shard boundary)."""
    owners = {}
    for _, opt in ranks:
        for b in opt.layout.buckets:
            for i, _, _, _ in b.pieces(*b.shard_range(opt.rank)):
                owners.setdefault(i, set()).add(opt.rank)
    return {i for i, ranks_ in owners.items() if len(ranks_) > 1}


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
    seed = int(rng.integers(2 ** 31))
    hp = dict(lr=1.0, weight_decay=0.01, clip_grad_norm=0.5, skip_nonfinite=True)

    def rank_fn(comm):
        params = make_params(seed, [dtype])
        opt = ShardedOptimizer("lars", params, comm, bucket_bytes=256, **hp)
        for t in range(5):
            g = grads_for(seed, t, comm.rank, params)
            if t == 3 and comm.rank == comm.size - 1:
                g[1][7] = np.nan
            before = [p.copy() for p in params], [{k: v.copy() for k, v in s.items()} for s in opt.shard_states()]
            done = opt.step(g)
            if t == 3:
                assert done is False and all(a.tobytes() == b.tobytes() for a, b in zip(params, before[0]))
                assert all(np.array_equal(v, before[1][j][k]) for j, s in enumerate(opt.shard_states())
                           for k, v in s.items())
            else:
                assert done is True
        return params, opt

    ranks = run_ranks(world, rank_fn)
    assert_ranks_agree(ranks)
    ref = make_params(seed, [dtype])
    single = fastopt.LARS(ref, **hp)
    for t in range(5):
        g = mean_grads(seed, t, ref, world)
        if t == 3:
            g[1][7] = np.nan
        assert single.step(g) is (t != 3)
    assert ranks[0][1].skipped_steps == 1 and ranks[0][1].steps == 4
    for i, (a, b) in enumerate(zip(ranks[0][0], ref)):
        assert_close(a, b, f"params[{i}] (seed {seed})")


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
    seed = int(rng.integers(2 ** 31))
    hp = dict(lr=1.0, weight_decay=0.01, nesterov=True, **options)
    shapes = [(7, 3), (300,), (1,), (0,), (33, 9), (2, 2, 3)]
    ranks = sharded(world, seed, [np.float32], hp, bucket_bytes, shapes=shapes, cast=cast)
    ref, _ = single_process(world, seed, [np.float32], hp, shapes=shapes, cast=cast)
    assert_ranks_agree(ranks)
    equal = total = 0
    for i, (a, b) in enumerate(zip(ranks[0][0], ref)):
        if world == 1:
            assert a.tobytes() == b.tobytes(), f"params[{i}]"
        elif a.dtype == bf16:
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2.0 ** -7, atol=1e-30,
                                       err_msg=f"params[{i}] (seed {seed})")
        else:
            assert_close(a, b, f"params[{i}] (seed {seed})")
        same = a.view(f"u{a.dtype.itemsize}") == b.view(f"u{b.dtype.itemsize}")  # bit-equal elements
        equal += int(same.sum())
        total += a.size
    assert equal >= 0.95 * total, f"{total - equal} of {total} elements differ (seed {seed})"


def test_checkpoint_world3_to_world2_and_gather(tmp_path, rng):
    """Saved at world 3 after 4 steps (momentum buffers in the files), loaded at world 2, 3 more steps: within
    TOL of the class's 7 steps (the mean of 3 ranks, then of 2). gather() gives the ordinary checkpoint the
    class resumes from, with the sharded params bit for bit."""
    seed = int(rng.integers(2 ** 31))
    hp = dict(lr=1.0, weight_decay=0.01, nesterov=True)
    ck = str(tmp_path / "ck")
    saved = sharded(3, seed, [np.float32, np.float64], hp, 256, steps=4, save=ck)
    ranks = sharded(2, seed, [np.float32, np.float64], hp, 512, steps=3, load=ck, start=4)
    assert_ranks_agree(ranks)
    assert ranks[0][1].steps == 7
    gathered = str(tmp_path / "ck.npz")
    gather(ck, gathered)
    resumed_params = make_params(seed + 1, [np.float32, np.float64])
    resumed = fastopt.LARS(resumed_params, **hp)
    fastopt.load(gathered, resumed, params=True)
    for a, b in zip(resumed_params, saved[0][0]):
        assert a.tobytes() == b.tobytes()
    ref, ref_opt = single_process(3, seed, [np.float32, np.float64], hp, steps=4)
    for t in range(4, 7):
        ref_opt.step(mean_grads(seed, t, ref, 2))
        resumed.step(mean_grads(seed, t, resumed_params, 2))
    for i, (a, b, c) in enumerate(zip(ranks[0][0], ref, resumed_params)):
        assert_close(a, b, f"params[{i}] against the class's 7 steps (seed {seed})")
        assert_close(a, c, f"params[{i}] against the class resumed from gather() (seed {seed})")


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
        given = fake.launches[0].args[-1]
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
