"""ShardedOptimizer with the precision modes (issue 13 x issue 15): state_dtype (16-bit and "int8"),
kahan=True and stochastic_rounding=True (+ seed), on 1-3 ranks in one process (one thread per rank,
tests/distributed/thread_comm.py; the MPI runs are in test_mpi.py).

Each rank's params and state equal the single-process class with the same options on the separate tensors,
applied to the mean gradient in float32 (16-bit params take float32 gradients), bit for bit: stochastic
rounding keys element i of a param by (seed, step, i) whatever shard holds it, and 8-bit state's 256-blocks
are the param's own (each param starts at a multiple of 256 in the flat layout, shards are multiples of
256). 8-bit state per rank is 1/world of the total (+ padding, < 1% at these sizes). Sharded checkpoints
carry codes, scales and the Kahan compensation and re-shard from 3 ranks to 2; gather() gives the ordinary
checkpoint the class resumes from; a checkpoint saved with other precision options is refused clearly."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.distributed import CheckpointError, ShardedOptimizer, gather
from fastopt.precision import QUANT_BLOCK, QuantizedState
from tests.distributed.thread_comm import run_ranks

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

SHAPES = [(7, 3), (300,), (1,), (0,), (33, 5), (2, 2, 3)]
MODES = {
    "bf16-state": (np.float32, dict(state_dtype="bfloat16")),
    "bf16-params": (BF16, {}),
    "bf16-kahan": (BF16, dict(kahan=True)),
    "bf16-stochastic": (BF16, dict(stochastic_rounding=True, seed=5)),
    "int8": (np.float32, dict(state_dtype="int8")),
    "int8-bf16-stochastic": (BF16, dict(state_dtype="int8", stochastic_rounding=True, seed=9)),
    "int8-bf16-kahan": (BF16, dict(state_dtype="int8", kahan=True)),
}
OPTIMIZERS = {"adam": dict(lr=0.01, weight_decay=0.01), "sgd": dict(lr=0.05, momentum=0.9)}


def make_params(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]


def grads_for(seed, t, rank, params):
    """float32 multiples of 1/8: their sums over ranks are exact in any order."""
    rng = np.random.default_rng([seed, t, rank])
    return [(np.round(rng.standard_normal(p.shape) * 16) / 8).astype(np.float32) for p in params]


def mean_grads(seed, t, params, world):
    per_rank = [grads_for(seed, t, r, params) for r in range(world)]
    return [sum(g[i] for g in per_rank) * np.float32(1.0 / world) for i in range(len(params))]


def single_process(name, dtype, options, steps, world, seed=1):
    params = make_params(dtype)
    opt = getattr(fastopt, {"adam": "Adam", "sgd": "SGD"}[name])(params, **OPTIMIZERS[name], **options)
    for t in range(steps):
        opt.step(mean_grads(seed, t, params, world))
    return params, opt


def per_param_state(opt, i):
    """The single-process class's state of param i: name -> flat array, or (codes, absmax) for 8-bit."""
    out = {}
    for name, a in opt.state_arrays(i).items():
        out[name] = (a.codes.reshape(-1), a.absmax) if isinstance(a, QuantizedState) else a.reshape(-1)
    return out


def host(a):
    """A host copy of a device array (CuPy or the CUDA emulation's; an 8-bit state's codes and scales), else a."""
    if isinstance(a, QuantizedState):
        return QuantizedState(host(a.codes), host(a.absmax), a.signed)
    return a.get() if hasattr(a, "get") else a


def check_against(ref_params, ref_opt, ranks):
    """Every rank's params equal the reference; the pieces of state each rank holds equal the reference's (host
    or device arrays)."""
    for params, _ in ranks:
        for a, b in zip(params, ref_params):
            assert host(a).tobytes() == b.tobytes()
    covered = {}
    for _, opt in ranks:
        for b, states in zip(opt.layout.buckets, opt.shard_states()):
            lo, hi = b.shard_range(opt.rank)
            for i, e0, e1, pos in b.pieces(lo, hi):
                ref = per_param_state(ref_opt, i)
                at = pos - lo
                for name, a in states.items():
                    a = host(a)
                    if isinstance(a, QuantizedState):
                        codes, absmax = ref[name]
                        assert a.codes[at:at + e1 - e0].tobytes() == codes[e0:e1].tobytes(), (i, name)
                        assert e0 % QUANT_BLOCK == 0 and at % QUANT_BLOCK == 0
                        k0, k1 = e0 // QUANT_BLOCK, -(-e1 // QUANT_BLOCK)
                        got = a.absmax[at // QUANT_BLOCK:at // QUANT_BLOCK + k1 - k0]
                        assert got.tobytes() == absmax[k0:k1].tobytes(), (i, name)
                    else:
                        assert a[at:at + e1 - e0].tobytes() == ref[name][e0:e1].tobytes(), (i, name)
                covered[i] = covered.get(i, 0) + e1 - e0
    assert covered == {i: int(np.prod(s)) for i, s in enumerate(SHAPES) if np.prod(s)}


def sharded_run(name, dtype, options, world, steps, bucket_bytes=32 << 20, seed=1, save=None, load=None,
                communicator=None, device=None):
    """Every rank's (params, optimizer) after `steps` steps on its own grads (ranks as threads; communicator:
    run_ranks'). device: a host array -> the array the rank trains on (None: the host arrays themselves)."""
    move = (lambda a: a) if device is None else device

    def rank_fn(comm):
        params = [move(p) for p in make_params(dtype)]
        opt = ShardedOptimizer(name, params, comm, bucket_bytes=bucket_bytes, **OPTIMIZERS[name], **options)
        if load is not None:
            opt.load(load)
        for t in range(opt.steps, opt.steps + steps):
            opt.step([move(g) for g in grads_for(seed, t, comm.rank, params)])
        if save is not None:
            opt.save(save)
        return params, opt
    return run_ranks(world, rank_fn, communicator)


@pytest.mark.parametrize("world,bucket_bytes", [(1, 32 << 20), (2, 32 << 20), (3, 256)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equal_to_single_process_bit_for_bit(name, mode, world, bucket_bytes):
    dtype, options = MODES[mode]
    ranks = sharded_run(name, dtype, options, world, steps=6, bucket_bytes=bucket_bytes)
    ref_params, ref_opt = single_process(name, dtype, options, 6, world)
    check_against(ref_params, ref_opt, ranks)


def test_int8_layout_blocks_and_state_bytes_per_rank():
    """Each param starts at a multiple of 256 elements and shards are multiples of 256; 8-bit Adam state per
    rank (2 bytes per element + 8 per 256) is within 1% of the single process's total / world."""
    shapes = [(100_000,), (3000,), (5,)]
    single = fastopt.Adam(make_params(np.float32, shapes=shapes), lr=0.01, state_dtype="int8")
    total = sum(a.nbytes for i in range(len(shapes)) for a in single.state_arrays(i).values())
    assert total == sum(2 * int(np.prod(s)) + 8 * -(-int(np.prod(s)) // 256) for s in shapes)
    for world in (2, 3):
        def rank_fn(comm):
            opt = ShardedOptimizer("adam", make_params(np.float32, shapes=shapes), comm, lr=0.01, state_dtype="int8")
            b = opt.layout.buckets[0]
            assert all(off % QUANT_BLOCK == 0 for off in b.offsets) and b.shard % QUANT_BLOCK == 0
            return opt.state_bytes()
        per_rank = run_ranks(world, rank_fn)
        assert all(total / world <= n <= 1.01 * total / world for n in per_rank), (world, per_rank, total)


@pytest.mark.parametrize("mode", ["int8", "bf16-kahan", "int8-bf16-stochastic"])
def test_checkpoint_world3_to_world2_and_gather(tmp_path, mode):
    """Saved at world 3 after 4 steps (codes, scales, compensation in the files), loaded at world 2, 3 more
    steps: equal to the single-process class's 7 steps (the mean gradient of 3 ranks, then of 2). gather()
    writes the ordinary checkpoint that fastopt.load resumes into the class with the same options."""
    dtype, options = MODES[mode]
    ck = str(tmp_path / "ck")
    sharded_run("adam", dtype, options, 3, steps=4, save=ck)
    ranks = sharded_run("adam", dtype, options, 2, steps=3, load=ck)
    ref_params = make_params(dtype)
    ref = fastopt.Adam(ref_params, **OPTIMIZERS["adam"], **options)
    for t in range(4):
        ref.step(mean_grads(1, t, ref_params, 3))
    gathered = str(tmp_path / "ck.npz")
    gather(ck, gathered)
    resumed_params = make_params(dtype)
    resumed = fastopt.Adam(resumed_params, **OPTIMIZERS["adam"], **options)
    fastopt.load(gathered, resumed, params=True)
    for a, b in zip(resumed_params, ref_params):
        assert a.tobytes() == b.tobytes()
    for t in range(4, 7):
        ref.step(mean_grads(1, t, ref_params, 2))
    check_against(ref_params, ref, ranks)


@pytest.mark.parametrize("mode", ["int8", "bf16-kahan"])
def test_scatter_an_ordinary_checkpoint_for_two_ranks(tmp_path, mode):
    """fastopt.save of the single-process class (4 steps) scattered for 2 ranks with the same options: the
    sharded optimizer loads it and goes on like the class."""
    from fastopt.distributed import scatter
    dtype, options = MODES[mode]
    ref_params = make_params(dtype)
    ref = fastopt.Adam(ref_params, **OPTIMIZERS["adam"], **options)
    for t in range(4):
        ref.step(mean_grads(1, t, ref_params, 2))
    fastopt.save(str(tmp_path / "single.npz"), ref, params=True)
    ck = str(tmp_path / "ck")
    scatter(str(tmp_path / "single.npz"), ck, 2, **{k: v for k, v in options.items() if k in ("state_dtype", "kahan")})
    ranks = sharded_run("adam", dtype, options, 2, steps=3, load=ck)
    for t in range(4, 7):
        ref.step(mean_grads(1, t, ref_params, 2))
    check_against(ref_params, ref, ranks)


def test_checkpoint_with_other_precision_is_refused(tmp_path):
    ck = str(tmp_path / "ck")
    sharded_run("adam", np.float32, dict(state_dtype="int8"), 2, steps=1, save=ck)
    with pytest.raises(CheckpointError, match=r"state_dtype='int8'; this optimizer has state_dtype=None"):
        sharded_run("adam", np.float32, {}, 2, steps=0, load=ck)


@pytest.mark.parametrize("options,exc,text", [
    (dict(kahan=True), ValueError, "kahan=True is for float16 or bfloat16 params"),
    (dict(stochastic_rounding=True), ValueError, "stochastic_rounding"),
    (dict(state_dtype="int4"), ValueError, "Invalid state_dtype: 'int4'"),
])
def test_precision_options_checked_by_the_class(options, exc, text):
    params = make_params(np.float32)
    before = [p.copy() for p in params]
    with pytest.raises(exc, match=text):
        run_ranks(1, lambda comm: ShardedOptimizer("adam", params, comm, lr=0.01, **options))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, before))


def test_lamb_and_asgd_int8_refused():
    with pytest.raises(ValueError, match="int8"):
        run_ranks(1, lambda comm: ShardedOptimizer("asgd", make_params(np.float32), comm, lr=0.01, state_dtype="int8"))
    # LAMB is sharded (two passes), but its state stays exact: the class's refusal, at construction
    with pytest.raises(ValueError, match="Invalid state_dtype: 'int8' for 'lamb'"):
        run_ranks(1, lambda comm: ShardedOptimizer("lamb", make_params(np.float32), comm, lr=0.01, state_dtype="int8"))


def test_int8_layout_property():
    """segment=256 layouts for random sizes and worlds: every param starts a 256-block, every shard is whole
    blocks, each element is in exactly one shard, and a piece's first element is a multiple of 256 in its param
    (so its blocks are the param's own)."""
    from fastopt.distributed import ShardLayout
    rng = np.random.default_rng(0)
    for _ in range(40):
        sizes = [int(n) for n in rng.integers(0, 900, rng.integers(1, 7))]
        world = int(rng.integers(1, 6))
        layout = ShardLayout.build([(n,) for n in sizes], [np.float32] * len(sizes), world,
                                   int(rng.choice([1, 2048, 1 << 20])), QUANT_BLOCK)
        seen = {i: np.zeros(n, int) for i, n in enumerate(sizes)}
        for b in layout.buckets:
            assert b.shard % QUANT_BLOCK == 0 and all(off % QUANT_BLOCK == 0 for off in b.offsets)
            assert b.numel <= world * b.shard
            for rank in range(world):
                lo, hi = b.shard_range(rank)
                for i, e0, e1, pos in b.pieces(lo, hi):
                    assert e0 % QUANT_BLOCK == 0 and (pos - lo) % QUANT_BLOCK == 0
                    seen[i][e0:e1] += 1
        assert all((s == 1).all() for s in seen.values())
