"""ShardedOptimizer over LAMB (issue 15), 1-4 ranks in one process (one thread per rank,
tests/distributed/thread_comm.py; the MPI and gloo runs: test_mpi.py and test_torch.py, whose workers take
every registry optimizer the sharded optimizer accepts).

LAMB's trust ratio ||p|| / ||u|| per param needs the norm of the update direction u, which exists only once
the moments are written, while a shard holds flat pieces of params: after the step's first all-reduce
(failed checks, clip, skip), each rank runs the first pass on its pieces (run_phase1: the moments written,
per piece the float64 sums of p^2 and u^2), a second all-reduce gives every param's sums, the scaled lrs are
computed on the host (reference.lamb_trust_ratio) and the second pass (run_phase2) runs on the pieces.

What is asserted:
- every rank ends with the same bits (each element is updated by its owner only, then all-gathered);
- against the single-process fastopt.LAMB applied to the mean gradient: the sums of squares are added in
  another order (pieces per rank, then over ranks), so the ratios differ in their last bits and the results
  agree within TOL (float32: rtol 1e-6, float64: rtol 1e-14, atol that times the largest magnitude) after 6
  steps; bit for bit at world 1 (one piece per param: the same sums in the same order);
- params cut across shard boundaries (small buckets, 3-4 ranks), sizes 0 and 1, 0-d to 4-d, float32,
  float64 and both in one optimizer, every LAMB option (weight decay, bias correction off, maximize, eps);
  the moments' pieces too;
- clip_grad_norm and skip_nonfinite (a NaN on one rank skips the step on every rank, nothing written);
- 16-bit params (+ Kahan, + stochastic rounding), 16-bit state; 8-bit state refused (test_precision.py);
- a checkpoint saved at world 3 loads at world 2 and via gather() into the class;
- the backends' run_phase1 / run_phase2 (compiled, NumPy, CuPy with fake launches, Numba on the CUDA
  simulator): the two passes with the sums' own ratios equal run() bit for bit; bad scaled_lr raises naming
  it with every byte unchanged.
"""
from __future__ import annotations

import functools

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from fastopt import reference
from fastopt.distributed import unsupported_reason
from fastopt.specs import REGISTRY, get_spec
from tests.distributed import per_tensor
from tests.distributed.per_tensor import DTYPES, STEPS, assert_close, assert_ranks_agree, cut_params, make_params

LAMB = get_spec("lamb")
OPTIONS = {
    "default": dict(lr=1e-2),
    "wd": dict(lr=2e-2, weight_decay=0.01),
    "no-bias-correction": dict(lr=1e-2, bias_correction=False, weight_decay=0.1, maximize=True),
    "eps-betas": dict(lr=5e-3, eps=1e-8, betas=(0.8, 0.99), weight_decay=1e-3),
}
NAMES = ("params", "grads", "exp_avg", "exp_avg_sq")


sharded = functools.partial(per_tensor.sharded, "lamb")
single_process = functools.partial(per_tensor.single_process, "lamb")


def moment_pieces(ranks):
    """(param, state name, first element, values) of every piece of moment the ranks hold."""
    out = []
    for _, opt in ranks:
        for b, states in zip(opt.layout.buckets, opt.shard_states()):
            lo, hi = b.shard_range(opt.rank)
            for i, e0, e1, pos in b.pieces(lo, hi):
                for name in LAMB.states:
                    out.append((i, name, e0, states[name][pos - lo:pos - lo + e1 - e0]))
    return out


def test_lamb_is_sharded():
    assert unsupported_reason(LAMB) is None
    # a two-phase family without its split passes (reference.TWO_PHASE, run_phase1/2) would be refused
    assert "two-phase" in unsupported_reason(dataclasses.replace(LAMB, name="lamb_without_passes"))
    assert all(unsupported_reason(spec) is None for spec in REGISTRY.values())


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
        if b.size:
            assert not np.array_equal(a, make_params(seed, DTYPES[dtypes])[i]), f"params[{i}] did not move"
    for i, name, e0, values in moment_pieces(ranks):
        ref_state = ref_opt.state_arrays(i)[name].reshape(-1)[e0:e0 + values.size]
        if world == 1:
            assert values.tobytes() == ref_state.tobytes(), f"{name} of params[{i}]"
        else:  # the moments are elementwise: the same bits once the params they read agree (step 1: exactly)
            assert_close(values, ref_state, f"{name} of params[{i}] from {e0} (seed {seed})")
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ranks[0][1].params, ranks[0][0]))
    assert ranks[0][1].steps == STEPS


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_and_skip_nonfinite(world, dtype, rng):
    """clip_grad_norm (it clips: the norm of the mean gradient is ~30) scales g inside the first pass, so the
    clip coefficient is known before the moments are written; a NaN on the last rank at step 3 skips the step
    on every rank with nothing written (params and moments), and the class skips it too."""
    hp = dict(lr=1e-2, weight_decay=0.01, clip_grad_norm=0.5, skip_nonfinite=True)
    per_tensor.clip_and_skip("lamb", hp, world, dtype, int(rng.integers(2 ** 31)))


@pytest.mark.parametrize("world,bucket_bytes", [(1, 32 << 20), (3, 256), (4, 512)])
@pytest.mark.parametrize("mode", ["bf16", "bf16-kahan", "bf16-stochastic", "bf16-state", "f32-bf16-state",
                                  "f16-stochastic"])
def test_precision_modes(world, bucket_bytes, mode, rng):
    """16-bit params (float32 gradients and math) to nearest, with Kahan or stochastic rounding (keyed by each
    piece's first element in its param), 16-bit state: bit for bit at world 1; else float32 results within
    TOL, and 16-bit params within one ulp of their format with at least 95% of the elements bit-equal."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    options, cast = {
        "bf16": ({}, bf16), "bf16-kahan": (dict(kahan=True), bf16),
        "bf16-stochastic": (dict(stochastic_rounding=True, seed=3), bf16),
        "bf16-state": (dict(state_dtype="bfloat16"), bf16),
        "f32-bf16-state": (dict(state_dtype="bfloat16"), np.float32),
        "f16-stochastic": (dict(stochastic_rounding=True, seed=5, state_dtype="float16"), np.float16),
    }[mode]
    hp = dict(lr=1e-2, weight_decay=0.01, **options)
    per_tensor.precision_run("lamb", world, bucket_bytes, hp, cast, int(rng.integers(2 ** 31)))


def test_checkpoint_world3_to_world2_and_gather(tmp_path, rng):
    """Saved at world 3 after 4 steps (the moments in the files), loaded at world 2, 3 more steps: within TOL
    of the class's 7 steps (the mean of 3 ranks, then of 2). gather() gives the ordinary checkpoint the class
    resumes from, with the sharded params bit for bit."""
    hp = dict(lr=1e-2, weight_decay=0.01)
    per_tensor.checkpoint_world3_to_world2("lamb", hp, tmp_path, int(rng.integers(2 ** 31)))


# ---- run_phase1 / run_phase2 on the backends --------------------------------------------------------------

def _backend(name):
    return __import__(f"fastopt.backends.{name}_backend", fromlist=["run"])


def _call(rng, dtype, shapes=((7, 3), (5,), (0,), (1,), (3000,), (2, 2, 3))):
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    moments = [[(0.1 * np.abs(rng.standard_normal(s))).astype(dtype) for s in shapes] for _ in range(2)]
    return params, grads, moments


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_two_passes_equal_run(backend, dtype, option, rng):
    """run_phase1, lr x the ratio of its sums (reference.lamb_trust_ratio), run_phase2: run()'s bits, params and
    moments, step 3, grad_scale 0.5 (bfloat16 params: float32 state and math)."""
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    be = _backend(backend)
    hp, step = LAMB.validate(dict(LAMB.defaults, **{k: v for k, v in OPTIONS[option].items() if k != "betas"}), 3)
    params, grads, (m, v) = _call(rng, np.float32)
    params = [p.astype(dtype) for p in params]
    if dtype != np.float64 and dtype != np.float32:
        grads = [g.astype(np.float32) for g in grads]
    else:
        grads, m, v = [g.astype(dtype) for g in grads], [a.astype(dtype) for a in m], [a.astype(dtype) for a in v]
    whole = [[a.copy() for a in lst] for lst in (params, m, v)]
    be.run(be.prepare((whole[0], grads, whole[1], whole[2]), NAMES), LAMB, hp, step, 0.5)
    split = [[a.copy() for a in lst] for lst in (params, m, v)]
    prepared = be.prepare((split[0], grads, split[1], split[2]), NAMES)
    sums = be.run_phase1(prepared, LAMB, hp, step, 0.5)
    assert sums.shape == (len(params), 2) and sums.dtype == np.float64 and (sums >= 0).all()
    assert sums[2].tolist() == [0.0, 0.0] and sums[0, 1] > 0
    np.testing.assert_allclose(sums[:, 0], [float(np.sum(p.astype(np.float64) ** 2)) for p in params], rtol=1e-6)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(split[0], params)), "phase 1 wrote the params"
    scaled = [hp["lr"] * reference.lamb_trust_ratio(pp, uu) for pp, uu in sums]
    be.run_phase2(prepared, LAMB, hp, step, 0.5, scaled)
    for k, name in enumerate(("params", "exp_avg", "exp_avg_sq")):
        for i, (a, b) in enumerate(zip(split[k], whole[k])):
            assert a.tobytes() == b.tobytes(), f"{name}[{i}]"


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_pieces_with_the_whole_sums_equal_the_whole_tensors(backend, rng):
    """Flat pieces of tensors (cut anywhere) through run_phase1, their sums added per tensor, run_phase2 with
    the whole tensors' scaled lrs: within rounding of run() on the whole tensors (the sums are added in
    another order), the moments bit for bit (elementwise)."""
    be = _backend(backend)
    hp, step = LAMB.validate(dict(LAMB.defaults, lr=0.01, weight_decay=0.01), 2)
    params, grads, (m, v) = _call(rng, np.float64)
    whole = [[a.copy() for a in lst] for lst in (params, m, v)]
    be.run(be.prepare((whole[0], grads, whole[1], whole[2]), NAMES), LAMB, hp, step, None)
    flat = [[a.copy().reshape(-1) for a in lst] for lst in (params, m, v)]
    gflat = [g.reshape(-1) for g in grads]
    cuts = [sorted({0, a.size, *(int(c) for c in rng.integers(0, a.size + 1, 2))}) for a in flat[0]]
    pieces = [(i, lo, hi) for i, c in enumerate(cuts) for lo, hi in zip(c, c[1:])]
    arrays = tuple([lst[i][lo:hi] for i, lo, hi in pieces] for lst in (flat[0], gflat, flat[1], flat[2]))
    prepared = be.prepare(arrays, NAMES)
    sums = np.zeros((len(params), 2))
    for (i, _, _), s in zip(pieces, be.run_phase1(prepared, LAMB, hp, step, None)):
        sums[i] += s
    scaled = np.array([hp["lr"] * reference.lamb_trust_ratio(pp, uu) for pp, uu in sums])
    be.run_phase2(prepared, LAMB, hp, step, None, scaled[[i for i, _, _ in pieces]])
    for k in range(3):
        for i, (a, b) in enumerate(zip(flat[k], whole[k])):
            if k:
                assert a.tobytes() == b.reshape(-1).tobytes(), (k, i)
            else:
                np.testing.assert_allclose(a, b.reshape(-1), rtol=1e-14, atol=1e-14, err_msg=f"params[{i}]")


BAD_SCALED_LR = [
    ([0.1], ValueError, "scaled_lr has shape (1,)"),
    ([0.1] * 7, ValueError, "one lr per array"),
    ([[0.1] * 6], ValueError, "scaled_lr has shape (1, 6)"),
    ([0.1, 0.1, np.nan, 0.1, 0.1, 0.1], ValueError, "scaled_lr must be finite"),
    ([0.1, 0.1, 0.1, 0.1, 0.1, -np.inf], ValueError, "scaled_lr must be finite"),
    ([True] * 6, TypeError, "scaled_lr must hold real numbers"),
    ([1j] * 6, TypeError, "scaled_lr must hold real numbers"),
    (["a"] * 6, TypeError, "scaled_lr must hold real numbers"),
    ([[0.1], [0.2, 0.3]], TypeError, "scaled_lr must be a host array"),
    (None, TypeError, "scaled_lr must hold real numbers"),
]


@pytest.mark.parametrize("bad,exc,text", BAD_SCALED_LR)
@pytest.mark.parametrize("backend", ["cython", "numpy", "compiled-entry"])
def test_bad_scaled_lr_writes_nothing(bad, exc, text, backend, rng):
    """Every byte of every array unchanged (phase 1 done first: the moments stay as it wrote them)."""
    be = _backend("cython" if backend == "compiled-entry" else backend)
    hp, step = LAMB.validate(dict(LAMB.defaults, lr=0.01), 1)
    params, grads, (m, v) = _call(rng, np.float32)
    prepared = be.prepare((params, grads, m, v), NAMES)
    be.run_phase1(prepared, LAMB, hp, step, None)
    before = [a.copy() for a in params + grads + m + v]
    with pytest.raises(exc) as info:
        if backend == "compiled-entry":  # the extension checks it itself too
            from fastopt.kernels.cpu import _cpu_fast
            _cpu_fast.run_phase2(prepared, "lamb", LAMB.scalars(hp, step, 1.0), bad)
        else:
            be.run_phase2(prepared, LAMB, hp, step, None, bad)
    assert text in str(info.value)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params + grads + m + v, before))


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_passes_refuse_other_optimizers_and_bad_rounding(backend, rng):
    be = _backend(backend)
    adam = get_spec("adam")
    p, g = np.ones(4), np.ones(4)
    m, v = np.zeros(4), np.zeros(4)
    prepared = be.prepare((p, g, m, v), NAMES)
    for fn, args in ((be.run_phase1, ()), (be.run_phase2, ([0.1],))):
        with pytest.raises(ValueError, match="not a two-phase update"):
            fn(prepared, adam, adam.validate(dict(adam.defaults, lr=0.1), 1)[0], 1, None, *args)
    from fastopt.precision import StochasticRounding
    hp, step = LAMB.validate(dict(LAMB.defaults, lr=0.01), 1)
    with pytest.raises(ValueError, match="stochastic_rounding=True is for float16 or bfloat16"):
        be.run_phase1(prepared, LAMB, hp, step, None, stochastic=StochasticRounding(0, 1))
    with pytest.raises(ValueError, match="stochastic_rounding=True is for float16 or bfloat16"):
        be.run_phase2(prepared, LAMB, hp, step, None, [0.1], stochastic=StochasticRounding(0, 1))
    assert np.array_equal(p, np.ones(4)) and not m.any() and not v.any()


def test_compiled_entries_refuse_other_kernels(rng):
    from fastopt.kernels.cpu import _cpu_fast
    p, g, m, v = (rng.standard_normal(5) for _ in range(4))
    before = [a.copy() for a in (p, g, m, v)]
    prepared = _cpu_fast.prepare((p, g, m, v), NAMES)
    with pytest.raises(ValueError, match="run_phase1: kernel must be a two-phase family .*lamb.* got 'adam'"):
        _cpu_fast.run_phase1(prepared, "adam", 0, (1.0,) * 9)
    with pytest.raises(ValueError, match="run_phase2: kernel must be a two-phase family .*got 'nosuch'"):
        _cpu_fast.run_phase2(prepared, "nosuch", (1.0,) * 9, [0.1])
    assert all(a.tobytes() == b.tobytes() for a, b in zip((p, g, m, v), before))


def test_cupy_backend_split_launches(monkeypatch):
    """CuPy (fake launches, tests/gpu/test_cupy_launch_abi.py): run_phase1 launches the moments kernel only and
    returns one (sum p^2, sum u^2) row per array; run_phase2 launches the apply kernel only, whose scaled_lr
    argument holds the given numbers as float64; a bad scaled_lr launches nothing."""
    from fastopt.backends import cuda_source, cupy_backend
    from tests.gpu import test_cupy_launch_abi as abi
    fake = abi.fake.__wrapped__(monkeypatch)
    hp, step = LAMB.validate(dict(LAMB.defaults, lr=0.01, weight_decay=0.01), 2)
    moments, _, apply = cuda_source.two_phase_kernel_names(LAMB.kernel)
    for dtype in (np.float32, np.float64):
        arrays, names = abi.update_arrays(fake, LAMB, hp, dtype, 0, True)
        prepared = cupy_backend.prepare(arrays, names)
        n = len(arrays[0])
        fake.launches.clear()
        sums = cupy_backend.run_phase1(prepared, LAMB, hp, step, 0.5)
        abi.assert_launches_fit(fake, "run_phase1")
        assert [launch.name for launch in fake.launches] == [moments]
        assert sums.shape == (n, 2) and sums.dtype == np.float64  # the fake's partials read back as zeros
        lrs = [0.25 * (i + 1) for i in range(n)]
        fake.launches.clear()
        cupy_backend.run_phase2(prepared, LAMB, hp, step, 0.5, lrs)
        abi.assert_launches_fit(fake, "run_phase2")
        assert [launch.name for launch in fake.launches] == [apply]
        given = abi.args_by_name(fake.launches[0])["scaled_lr"]
        assert given.dtype == np.float64 and given.host.tolist() == lrs
        fake.launches.clear()
        with pytest.raises(ValueError, match="scaled_lr"):
            cupy_backend.run_phase2(prepared, LAMB, hp, step, 0.5, lrs[:1])
        assert not fake.launches


def test_numba_backend_split_on_the_simulator():
    """Numba on the CUDA simulator (a subprocess: NUMBA_ENABLE_CUDASIM must be set before numba is imported):
    run_phase1's sums and run_phase2 with given scaled lrs equal the NumPy backend's within rounding."""
    pytest.importorskip("numba")
    script = os.path.join(os.path.dirname(__file__), "lamb_split_sim.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert out.returncode == 0 and "LAMB SPLIT SIM: ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
