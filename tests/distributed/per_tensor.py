"""Shared scaffolding of the sharding tests of the optimizers whose update reads per-tensor numbers (LARS:
tests/distributed/test_lars.py, LAMB: test_lamb.py): params of many shapes and ndims, per-rank gradients whose
sums are exact in any order, the sharded run on in-process ranks against the single-process class on the mean
gradient, and the tolerance they agree within (the per-tensor norms are summed per piece, then over ranks)."""
from __future__ import annotations

import numpy as np

import fastopt
from fastopt.distributed import ShardedOptimizer
from fastopt.specs import get_spec
from tests.distributed.thread_comm import run_ranks

SHAPES = [(7, 3), (101,), (1,), (0,), (), (33, 5), (2, 2, 3), (3, 2, 2, 2)]
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
    means = []
    for i in range(len(params)):
        kind = per_rank[0][i].dtype
        total = np.asarray(sum(g[i] for g in per_rank), dtype=kind)  # exact: multiples of 1/8
        # in the grads' dtype under NumPy 1's value-based promotion too (0-d arrays went to float64 there)
        means.append(np.asarray(np.multiply(total, kind.type(1.0 / world), dtype=kind)))
    return means


def sharded(name, world, seed, dtypes, hp, bucket_bytes, steps=STEPS, shapes=SHAPES, cast=None, load=None,
            save=None, start=0):
    """Each rank's (params, optimizer) after `steps` steps of its own gradients, optimizer `name`."""
    def rank_fn(comm):
        params = make_params(seed, dtypes, shapes)
        if cast is not None:
            params = [p.astype(cast) for p in params]
        opt = ShardedOptimizer(name, params, comm, bucket_bytes=bucket_bytes, **hp)
        if load is not None:
            opt.load(load)
        for t in range(start, start + steps):
            assert opt.step(grads_for(seed, t, comm.rank, params, np.float32 if cast else None)) is True
        if save is not None:
            opt.save(save)
        return params, opt
    return run_ranks(world, rank_fn)


def single_process(name, world, seed, dtypes, hp, steps=STEPS, shapes=SHAPES, cast=None):
    """(params, optimizer) of the single-process class of `name` after `steps` steps of the mean gradient."""
    params = make_params(seed, dtypes, shapes)
    if cast is not None:
        params = [p.astype(cast) for p in params]
    opt = getattr(fastopt, get_spec(name).class_name)(params, **hp)
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


def cut_params(ranks):
    """The params whose elements are held by more than one rank (cut by a shard boundary)."""
    owners = {}
    for _, opt in ranks:
        for b in opt.layout.buckets:
            for i, _, _, _ in b.pieces(*b.shard_range(opt.rank)):
                owners.setdefault(i, set()).add(opt.rank)
    return {i for i, ranks_ in owners.items() if len(ranks_) > 1}


def clip_and_skip(name, hp, world, dtype, seed):
    """clip_grad_norm and skip_nonfinite (both in hp) through `name`'s sharded step: a NaN on the last rank at
    step 3 skips the step on every rank with nothing written (params and state pieces); the other steps run.
    The result equals the single-process class, which skips the same step, within TOL."""
    def rank_fn(comm):
        params = make_params(seed, [dtype])
        opt = ShardedOptimizer(name, params, comm, bucket_bytes=256, **hp)
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
    single = getattr(fastopt, get_spec(name).class_name)(ref, **hp)
    for t in range(5):
        g = mean_grads(seed, t, ref, world)
        if t == 3:
            g[1][7] = np.nan
        assert single.step(g) is (t != 3)
    assert ranks[0][1].skipped_steps == 1 and ranks[0][1].steps == 4
    for i, (a, b) in enumerate(zip(ranks[0][0], ref)):
        assert_close(a, b, f"params[{i}] (seed {seed})")


def precision_run(name, world, bucket_bytes, hp, cast, seed):
    """`name` with 16-bit or 8-bit options (hp) on params cast to `cast`, sharded against the class: bit for bit
    at world 1; else float32 params within TOL and 16-bit params within one ulp of their format (a ratio that
    differs in its last bits can round the other way), with at least 95% of all elements bit-equal."""
    shapes = [(7, 3), (300,), (1,), (0,), (33, 9), (2, 2, 3)]
    ranks = sharded(name, world, seed, [np.float32], hp, bucket_bytes, shapes=shapes, cast=cast)
    ref, _ = single_process(name, world, seed, [np.float32], hp, shapes=shapes, cast=cast)
    assert_ranks_agree(ranks)
    equal = total = 0
    for i, (a, b) in enumerate(zip(ranks[0][0], ref)):
        if world == 1:
            assert a.tobytes() == b.tobytes(), f"params[{i}]"
        elif a.dtype != np.float32:
            ulp = 2.0 ** -10 if a.dtype == np.float16 else 2.0 ** -7  # float16, else bfloat16
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=ulp, atol=1e-30,
                                       err_msg=f"params[{i}] (seed {seed})")
        else:
            assert_close(a, b, f"params[{i}] (seed {seed})")
        same = a.view(f"u{a.dtype.itemsize}") == b.view(f"u{b.dtype.itemsize}")  # bit-equal elements
        equal += int(same.sum())
        total += a.size
    assert equal >= 0.95 * total, f"{total - equal} of {total} elements differ (seed {seed})"


def checkpoint_world3_to_world2(name, hp, directory, seed):
    """Saved at world 3 after 4 steps (the states in the files), loaded at world 2, 3 more steps: within TOL of
    the class's 7 steps (the mean of 3 ranks, then of 2). gather() gives the ordinary checkpoint the class
    resumes from, with the sharded params bit for bit."""
    from fastopt.distributed import gather
    dtypes = [np.float32, np.float64]
    ck = str(directory / "ck")
    saved = sharded(name, 3, seed, dtypes, hp, 256, steps=4, save=ck)
    ranks = sharded(name, 2, seed, dtypes, hp, 512, steps=3, load=ck, start=4)
    assert_ranks_agree(ranks)
    assert ranks[0][1].steps == 7
    gathered = str(directory / "ck.npz")
    gather(ck, gathered)
    resumed_params = make_params(seed + 1, dtypes)
    resumed = getattr(fastopt, get_spec(name).class_name)(resumed_params, **hp)
    fastopt.load(gathered, resumed, params=True)
    for a, b in zip(resumed_params, saved[0][0]):
        assert a.tobytes() == b.tobytes()
    ref, ref_opt = single_process(name, 3, seed, dtypes, hp, steps=4)
    for t in range(4, 7):
        ref_opt.step(mean_grads(seed, t, ref, 2))
        resumed.step(mean_grads(seed, t, resumed_params, 2))
    for i, (a, b, c) in enumerate(zip(ranks[0][0], ref, resumed_params)):
        assert_close(a, b, f"params[{i}] against the class's 7 steps (seed {seed})")
        assert_close(a, c, f"params[{i}] against the class resumed from gather() (seed {seed})")
