"""Scenarios run under mpiexec by tests/distributed/test_mpi.py (`python -m mpi4py mpi_worker.py NAME ...`:
an assertion on any rank aborts the whole job, so a failure is never a hang). Prints "OK <name>" on rank 0."""
from __future__ import annotations

import os
import sys

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt.distributed import ShardedOptimizer, gather, unsupported_reason
from fastopt.specs import REGISTRY, REQUIRED

COMM = MPI.COMM_WORLD
RANK, WORLD = COMM.Get_rank(), COMM.Get_size()
# odd sizes, a size-0 and a size-1 param, a float64 param mixed in
SHAPES = [(7, 3), (101,), (1,), (0,), (33, 5), (2, 2, 3)]

# the options of each optimizer that change its code path (momentum, nesterov, amsgrad, centered, ...); a
# registry entry without a row here runs with its defaults (and lr 0.01 where it has no default)
CONFIGS = {
    "sgd": [dict(lr=0.1), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
            dict(lr=0.05, momentum=0.5, dampening=0.5, maximize=True)],
    "adagrad": [dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)],
    "rmsprop": [dict(lr=0.01), dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.01)],
    "adam": [dict(lr=0.01), dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)],
    "adamw": [dict(lr=0.01, amsgrad=True)],
    "nadam": [dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.01)],
    "radam": [dict(lr=0.01, weight_decay=0.01)],
    "adabelief": [dict(lr=0.01)],
    "lion": [dict(lr=0.001, weight_decay=0.1)],
    "adamax": [dict(lr=0.01, weight_decay=0.01)],
    "lars": [dict(lr=1.0, weight_decay=0.01, nesterov=True), dict(lr=0.5, momentum=0.0, exclude_1d=False)],
    "lamb": [dict(lr=0.01, weight_decay=0.01), dict(lr=0.02, bias_correction=False, maximize=True, eps=1e-8)],
}
# LARS (spec.tensor_coefs) and LAMB (spec.two_phase): their ratios come from sums of squares added per piece, then
# over ranks (MPI's order), so against the class they agree within these (tests/distributed/test_lars.py and
# test_lamb.py state them), not bit for bit
NORMS_RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-14}


def configs():
    for spec in REGISTRY.values():
        if unsupported_reason(spec) is None:
            lr = spec.defaults["lr"]
            yield spec.name, CONFIGS.get(spec.name, [dict(lr=0.01 if lr is REQUIRED else lr)])


def grads_for(seed, t, rank, params):
    """Rank `rank`'s local gradients at step t: multiples of 1/8 (sums over ranks are exact)."""
    rng = np.random.default_rng([seed, t, rank])
    return [(np.round(rng.standard_normal(p.shape) * 16) / 8).astype(p.dtype) for p in params]


def mean_grads(seed, t, params, world=WORLD):
    """The mean gradient as the sharded step applies it: the exact sum times 1/world in the param's dtype."""
    per_rank = [grads_for(seed, t, r, params) for r in range(world)]
    return [sum(g[i] for g in per_rank) * p.dtype.type(1.0 / world) for i, p in enumerate(params)]


def make_params(seed, dtypes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtypes[i % len(dtypes)]) for i, s in enumerate(SHAPES)]


def close(a, b) -> bool:
    """a equals b within NORMS_RTOL (atol: that times the largest magnitude)."""
    tol = NORMS_RTOL[np.dtype(b.dtype)]
    return np.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max()) if b.size else 1.0))


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0


def check(cond, msg):
    if not cond:
        raise AssertionError(f"rank {RANK} of {WORLD}: {msg}")


def equal(bucket_bytes):
    """Every elementwise optimizer and option, float32, float64 and both mixed: bit for bit the
    single-process class applied to the mean gradient, 6 steps (the sums of gradients are exact, and the
    kernel multiplies by grad_scale = 1/world first, as the oracle's mean does); LARS within NORMS_RTOL (bit
    for bit at world 1), every rank with the same bits."""
    seed = 1000
    for name, hps in configs():
        for hp in hps:
            for dtypes in ([np.float32], [np.float64], [np.float32, np.float64]):
                seed += 1
                params = make_params(seed, dtypes)
                ref = [p.copy() for p in params]
                opt = ShardedOptimizer(name, params, COMM, bucket_bytes=bucket_bytes, **hp)
                single = getattr(fastopt, REGISTRY[name].class_name)(ref, **hp)
                for t in range(1, 7):
                    check(opt.step(grads_for(seed, t, RANK, params)) is True, "step did not return True")
                    single.step(mean_grads(seed, t, ref))
                exact = WORLD == 1 or not REGISTRY[name].norms_per_tensor
                for i, (a, b) in enumerate(zip(params, ref)):
                    check(a.tobytes() == b.tobytes() if exact else close(a, b),
                          f"{name} {hp} {[np.dtype(d).name for d in dtypes]} param {i}: max diff {maxdiff(a, b)}")
                    everyone = COMM.allgather(a.tobytes())
                    check(all(x == everyone[0] for x in everyone), f"{name}: param {i} differs between ranks")
                for i, (a, b) in enumerate(zip(opt.params, params)):
                    check(a.tobytes() == b.tobytes(), f"{name}: opt.params[{i}] differs from the user's array")
                check(opt.steps == 6, "step count")


def clip_skip():
    """clip_grad_norm and skip_nonfinite: one all-reduce of the shard sums of squares; equal to the
    single-process class within rounding (the norm is summed in another order)."""
    for name in ("adam", "sgd", "lion", "lars", "lamb"):
        for dtype, rtol in ((np.float32, 2e-6), (np.float64, 1e-13)):
            seed = 77
            params = make_params(seed, [dtype])
            ref = [p.copy() for p in params]
            hp = dict(lr=0.01, clip_grad_norm=0.5, skip_nonfinite=True)
            opt = ShardedOptimizer(name, params, COMM, **hp)
            single = getattr(fastopt, REGISTRY[name].class_name)(ref, **hp)
            for t in range(1, 8):
                g = grads_for(seed, t, RANK, params)
                mean = mean_grads(seed, t, ref)
                if t == 4 and RANK == WORLD - 1:   # one rank's NaN: the step is skipped everywhere
                    g[1][3] = np.nan
                if t == 4:
                    mean[1][3] = np.nan
                before = [p.copy() for p in params]
                done = opt.step(g)
                check(single.step(mean) == done, f"{name}: skip decision differs at step {t}")
                if t == 4:
                    check(done is False and all(a.tobytes() == b.tobytes() for a, b in zip(params, before)),
                          "a skipped step changed the params")
            check(opt.skipped_steps == 1 and opt.steps == 6, f"counts {opt.skipped_steps} {opt.steps}")
            for i, (a, b) in enumerate(zip(params, ref)):
                check(np.allclose(a, b, rtol=rtol, atol=rtol), f"{name} clip param {i}: {maxdiff(a, b)}")


def memory():
    """State bytes per rank: 1/world of the single-process optimizer's (+ padding, within 1%)."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(n).astype(np.float32) for n in (100_003, 77_777, 5, 31_000)]
    opt = ShardedOptimizer("adam", params, COMM, lr=1e-3, amsgrad=True)
    total = 3 * sum(p.nbytes for p in params)  # exp_avg, exp_avg_sq, max_exp_avg_sq
    mine = opt.state_bytes()
    check(total / WORLD <= mine <= 1.01 * total / WORLD, f"state bytes {mine} vs total/world {total / WORLD}")
    everyone = COMM.allreduce(mine)
    check(everyone <= 1.01 * total, f"all ranks together hold {everyone} bytes of state, total {total}")


def errors():
    """Mismatches detected at construction raise on every rank; a bad gradient on one rank raises on
    every rank with nothing updated anywhere, and the next good step works (the ranks stay in step)."""
    params = make_params(3, [np.float32])
    cases = {
        "the values of the params": lambda ps: ps[0].__setitem__((0, 0), ps[0][0, 0] + (RANK == WORLD - 1)),
        "the shapes or dtypes": lambda ps: ps.__setitem__(1, ps[1][:100] if RANK == WORLD - 1 else ps[1]),
    }
    for what, spoil in cases.items():
        ps = [p.copy() for p in params]
        spoil(ps)
        try:
            ShardedOptimizer("adam", ps, COMM, lr=1e-3)
        except ValueError as e:
            check(WORLD > 1 and what in str(e), f"wrong message: {e}")
        else:
            check(WORLD == 1, f"mismatched {what} not detected")
    try:
        ShardedOptimizer("adam", [p.copy() for p in params], COMM, lr=1e-3 * (1 + (RANK == WORLD - 1)))
    except ValueError as e:
        check(WORLD > 1 and "hyperparameters" in str(e), f"wrong message: {e}")
    else:
        check(WORLD == 1, "mismatched hyperparameters not detected")
    # bad hyperparameters: the single-process class's checks and messages, before any collective
    for bad, exc, text in ((dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
                           (dict(lr=0.1, betas=(0.9,)), TypeError, "betas"),
                           (dict(lr=0.1, nonsense=1), TypeError, "nonsense")):
        try:
            ShardedOptimizer("adam", params, COMM, **bad)
        except exc as e:
            check(text in str(e), f"message {e!r} lacks {text!r}")
        else:
            check(False, f"{bad} accepted")
    for spec in REGISTRY.values():
        reason = unsupported_reason(spec)
        if reason is not None:
            try:
                ShardedOptimizer(spec.name, params, COMM, lr=1e-3)
            except ValueError as e:
                check(reason in str(e), str(e))
            else:
                check(False, f"{spec.name} accepted")
    check(unsupported_reason(REGISTRY["lamb"]) is None, "LAMB refused")
    ps = [p.copy() for p in params]
    opt = ShardedOptimizer("adam", ps, COMM, lr=1e-3)
    state = [{k: v.copy() for k, v in s.items()} for s in opt.shard_states()]
    before = [p.copy() for p in ps]
    g = grads_for(9, 1, RANK, ps)
    if RANK == WORLD - 1:
        g[4] = g[4][:-1]
    try:
        opt.step(g)
    except ValueError as e:
        mine = RANK == WORLD - 1
        check(("grads[4] has shape" in str(e)) if mine else ("other rank" in str(e)), f"message: {e}")
    else:
        check(False, "a bad gradient was accepted")
    check(all(a.tobytes() == b.tobytes() for a, b in zip(ps, before)), "params changed by a rejected step")
    check(all(np.array_equal(v, state[i][k]) for i, s in enumerate(opt.shard_states()) for k, v in s.items()),
          "state changed by a rejected step")
    check(opt.steps == 0, "a rejected step counted")
    check(opt.step(grads_for(9, 1, RANK, ps)) is True and opt.steps == 1, "the next step failed")


def dead_rank():
    """The last rank dies (exit status 3) before a step the others take: MPI has no timeout, but the
    launcher aborts the whole job, so nobody waits forever in the reduce-scatter."""
    params = [np.ones(1000, np.float32)]
    opt = ShardedOptimizer("sgd", params, COMM, lr=0.1)
    if RANK == WORLD - 1:
        os._exit(3)
    opt.step([np.ones(1000, np.float32)])
    print(f"step returned on rank {RANK}", flush=True)


def save(path, steps):
    """Run `steps` steps of Adam at this world size and save a sharded checkpoint into `path`."""
    params = make_params(11, [np.float32, np.float64])
    opt = ShardedOptimizer("adamw", params, COMM, lr=fastopt.schedules.cosine(1e-2, 100), amsgrad=True,
                           bucket_bytes=512)
    for t in range(1, steps + 1):
        opt.step(grads_for(11, t, RANK, params))
    opt.save(path)


def resume(path, gathered, steps, more):
    """Load `path` (saved at any world size) here, take `more` steps, and compare bit for bit with the
    single-process class resumed from the gathered checkpoint taking the same mean gradients."""
    params = make_params(999, [np.float32, np.float64])   # overwritten by the checkpoint
    opt = ShardedOptimizer("adamw", params, COMM, lr=fastopt.schedules.cosine(1e-2, 100), amsgrad=True)
    opt.load(path)
    check(opt.steps == steps, f"steps {opt.steps}")
    ref = [p.copy() for p in params]
    single = fastopt.AdamW(ref, lr=fastopt.schedules.cosine(1e-2, 100), amsgrad=True)
    fastopt.load(gathered, single)
    check(all(a.tobytes() == b.tobytes() for a, b in zip(params, ref)), "loaded params differ")
    for t in range(steps + 1, steps + more + 1):
        opt.step(grads_for(12, t, RANK, params))
        single.step(mean_grads(12, t, ref))
    for i, (a, b) in enumerate(zip(params, ref)):
        check(a.tobytes() == b.tobytes(), f"resumed param {i} differs: {maxdiff(a, b)}")
    # saving again here and gathering gives the single-process optimizer's state exactly
    opt.save(path + "-again")
    if RANK == 0:
        gather(path + "-again", path + "-again.npz")
        sd_a = fastopt.checkpoint.read(path + "-again.npz")
        sd_b = single.state_dict()
        for i, entry in sd_b["state"].items():
            for k, v in entry.items():
                got = sd_a["state"][i][k]
                check(np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v, f"state {i} {k}")


def precision():
    """The precision modes over MPI (bfloat16 params move as their uint16 bits; float32 gradients): adam and
    SGD momentum with bf16 params + Kahan, + stochastic rounding, and 8-bit state on float32 and bf16 params
    equal the single-process class on the mean gradient bit for bit; 8-bit state per rank ~ 1/world."""
    import ml_dtypes
    bf16 = np.dtype(ml_dtypes.bfloat16)
    modes = [(bf16, dict(kahan=True)), (bf16, dict(stochastic_rounding=True, seed=3)),
             (np.float32, dict(state_dtype="int8")), (bf16, dict(state_dtype="int8", stochastic_rounding=True, seed=4))]
    for name, hp in (("adam", dict(lr=0.01)), ("sgd", dict(lr=0.05, momentum=0.9))):
        for dtype, options in modes:
            params = [p.astype(np.float32).astype(dtype) for p in make_params(21, [np.float32])]
            ref = [p.copy() for p in params]
            opt = ShardedOptimizer(name, params, COMM, bucket_bytes=512, **hp, **options)
            single = getattr(fastopt, REGISTRY[name].class_name)(ref, **hp, **options)
            for t in range(4):
                opt.step(grads_for(22, t, RANK, [p.astype(np.float32) for p in params]))
                single.step(mean_grads(22, t, [p.astype(np.float32) for p in ref]))
            for i, (a, b) in enumerate(zip(params, ref)):
                check(a.tobytes() == b.tobytes(), f"{name} {options} param {i} differs")
    big = [np.ones(200_000, np.float32), np.ones(3000, np.float32)]
    opt = ShardedOptimizer("adam", big, COMM, lr=0.01, state_dtype="int8")
    total = sum(2 * p.size + 8 * -(-p.size // 256) for p in big)
    check(total / WORLD <= opt.state_bytes() <= 1.01 * total / WORLD, f"state bytes {opt.state_bytes()} of {total}")


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    {"precision": precision, "equal": lambda: equal(int(args[0])), "clip_skip": clip_skip, "memory": memory, "errors": errors,
     "dead_rank": dead_rank, "save": lambda: save(args[0], int(args[1])),
     "resume": lambda: resume(args[0], args[1], int(args[2]), int(args[3]))}[name]()
    COMM.Barrier()
    if RANK == 0:
        print(f"OK {name} world={WORLD}", flush=True)
