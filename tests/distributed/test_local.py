"""fastopt.distributed in one process (a world-1 communicator, tests/distributed/local_comm.py): the shard
layout for any world size, bad input at construction (checked before anything is written), sharded
checkpoint files that are damaged or do not fit (CheckpointError, nothing changed), the conversion to and
from fastopt.save's format, and the imports (fastopt.distributed imports neither torch nor mpi4py)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastopt
from fastopt.distributed import (CheckpointError, ShardedOptimizer, ShardLayout, gather, read_manifest, scatter,
                                 unsupported_reason)
from fastopt.distributed.layout import ALIGN_BYTES
from fastopt.specs import REGISTRY
from tests.distributed.local_comm import LocalCommunicator
from tests.distributed.thread_comm import run_ranks

COMM = LocalCommunicator()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=8), world=st.integers(1, 9),
       bucket_bytes=st.sampled_from([1, 64, 400, 1 << 20]), f64=st.lists(st.booleans(), min_size=8, max_size=8))
def test_layout_covers_every_element_once(sizes, world, bucket_bytes, f64):
    dtypes = [np.float64 if f64[i] else np.float32 for i in range(len(sizes))]
    layout = ShardLayout.build([(n,) for n in sizes], dtypes, world, bucket_bytes)
    seen = {i: np.zeros(n, int) for i, n in enumerate(sizes)}
    for b in layout.buckets:
        assert b.shard * b.dtype.itemsize % ALIGN_BYTES == 0 and b.numel <= world * b.shard
        assert b.numel == sum(b.sizes) and all(dtypes[i] == b.dtype for i in b.params)
        for rank in range(world):
            lo, hi = b.shard_range(rank)
            for i, e0, e1, pos in b.pieces(lo, hi):
                assert lo <= pos < hi and pos + (e1 - e0) <= hi
                seen[i][e0:e1] += 1
    assert all((s == 1).all() for s in seen.values())
    assert sorted(i for b in layout.buckets for i in b.params) == list(range(len(sizes)))


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(4, 5), (17,), (1,)]]


@pytest.mark.parametrize("args,kwargs,exc,text", [
    (("adam", "not a list"), {"lr": 1e-3}, TypeError, "params"),
    (("adam", []), {"lr": 1e-3}, ValueError, "empty"),
    (("adam", [{"params": []}]), {"lr": 1e-3}, TypeError, "param groups"),
    (("adam", [np.zeros(3, np.int32)]), {"lr": 1e-3}, TypeError, "params[0] has dtype int32"),
    (("nosuch", None), {}, ValueError, "Unknown optimizer"),
    ((42, None), {}, TypeError, "name_or_class"),
    (("adafactor", None), {"lr": 1e-3}, ValueError, "Unknown optimizer 'adafactor'"),  # composite, not a kernel
    (("adam", None), {"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    (("adam", None), {"lr": 1e-3, "betas": (0.9, 1.5)}, ValueError, "beta2"),
    (("adam", None), {"lr": 1e-3, "clip_grad_norm": -1}, ValueError, "clip_grad_norm"),
    (("adam", None), {"lr": 1e-3, "skip_nonfinite": "yes"}, TypeError, "skip_nonfinite"),
    (("adam", None), {"lr": 1e-3, "bucket_bytes": 0}, ValueError, "bucket_bytes"),
    (("adam", None), {"lr": 1e-3, "nonsense": 1}, TypeError, "nonsense"),
])
def test_bad_construction(args, kwargs, exc, text):
    name, params = args
    params = _params() if params is None else params
    arrays = isinstance(params, list) and params and isinstance(params[0], np.ndarray)
    before = [p.copy() for p in params] if arrays else []
    with pytest.raises(exc) as info:
        ShardedOptimizer(name, params, COMM, **kwargs)
    assert text in str(info.value)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, before))


def test_bad_params_memory_and_comm():
    p = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        ShardedOptimizer("adam", [p[:6], p[4:]], COMM, lr=1e-3)
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ShardedOptimizer("adam", [ro], COMM, lr=1e-3)
    with pytest.raises(TypeError, match="comm must be"):
        ShardedOptimizer("adam", [p], object(), lr=1e-3)


def _strided(n, shape, strides):
    return np.lib.stride_tricks.as_strided(np.zeros(n, np.float32), shape=shape, strides=strides, writeable=True)


@pytest.mark.parametrize("make,overlapping", [
    (lambda: _strided(4, (3, 4), (0, 4)), True),     # a broadcast row
    (lambda: _strided(8, (3, 4), (8, 4)), True),     # rows overlapping by half
    (lambda: _strided(24, (3, 4), (4, 12)), False),  # interleaved, each element its own
    (lambda: np.zeros((4, 6), np.float32)[::2, 1::2].T, False),  # strided and transposed
    (lambda: np.zeros((2, 0), np.float32), False),  # empty (NumPy gives it zero strides)
    (lambda: np.zeros(6, np.float32)[::-2], False),  # a negative stride
])
def test_a_param_whose_elements_share_memory_is_refused_on_every_rank(make, overlapping):
    """A broadcast or overlapping view as a param (its elements would be written over each other when the
    gathered params are copied back) is refused on every rank at construction, when one rank has it; a strided,
    interleaved or transposed view is updated as the single-process class updates a copy of it."""
    param = make()
    if overlapping:
        def body(comm):
            try:
                ShardedOptimizer("sgd", [param if comm.rank == 1 else np.zeros(param.shape, param.dtype)], comm, lr=1.0)
            except ValueError as e:
                return e
        errors = run_ranks(2, body)
        assert "params[0] has elements that share memory" in str(errors[1])
        assert "failed the checks on 1 other rank" in str(errors[0])
        return
    param[...] = np.arange(param.size, dtype=param.dtype).reshape(param.shape)
    before = param.copy()
    opt = ShardedOptimizer("sgd", [param], COMM, lr=1.0)
    grad = np.full(param.shape, 0.5, param.dtype)
    opt.step([grad])
    assert np.array_equal(param, before - grad)


def test_fastopt_torch_classes_take_their_own_keywords():
    """A fastopt.torch class is configured with its own (torch's) keywords: Rprop's etas and step_sizes, Adan's
    three betas; the same hyperparameters as the NumPy class's keywords give."""
    ft = pytest.importorskip("fastopt.torch")
    for cls, torch_kw, numpy_kw in [
            (ft.Rprop, {"etas": (0.4, 1.1), "step_sizes": (1e-5, 10.0)},
             {"etaminus": 0.4, "etaplus": 1.1, "step_size_min": 1e-5, "step_size_max": 10.0}),
            (ft.Adan, {"betas": (0.9, 0.8, 0.95)}, {"betas": (0.9, 0.8), "beta3": 0.95}),
            (ft.Adam, {"betas": (0.8, 0.99)}, {"betas": (0.8, 0.99)})]:
        theirs = ShardedOptimizer(cls, _params(), COMM, lr=0.1, **torch_kw)
        ours = ShardedOptimizer(cls.__name__.lower(), _params(), COMM, lr=0.1, **numpy_kw)
        assert theirs.hyperparameters == ours.hyperparameters
    with pytest.raises(ValueError, match=r"betas must be a tuple of 3 numbers \('beta1', 'beta2', 'beta3'\)"):
        ShardedOptimizer(ft.Adan, _params(), COMM, lr=0.1, betas=(0.9, 0.9))


@pytest.mark.parametrize("name", ["Adafactor", "Muon", "SparseAdam", "LBFGS"])
def test_a_composite_class_is_refused_with_the_reason(name):
    with pytest.raises(ValueError, match=f"does not support fastopt.*{name}: it shards the registry's optimizers"):
        ShardedOptimizer(getattr(fastopt, name), _params(), COMM, lr=0.1)
    with pytest.raises(TypeError, match="or a fastopt optimizer class, got <class 'fastopt.schedules.cosine'>"):
        ShardedOptimizer(fastopt.schedules.cosine, _params(), COMM, lr=0.1)  # a fastopt class, not an optimizer


def test_a_rank_outside_a_torch_subgroup_is_told_so():
    """torch.distributed.new_group gives its non-members an int sentinel, not a group: named as such."""
    dist = pytest.importorskip("torch.distributed")
    with pytest.raises(ValueError, match="this process is not a member of the process group"):
        ShardedOptimizer("adam", _params(), dist.GroupMember.NON_GROUP_MEMBER, lr=0.1)


def test_grads_given_as_the_optimizers_own_views_in_another_order():
    """opt.grads passed in another order (each a view of another param's place in the send buffer): every
    gradient is read before any is packed, so each param gets the gradient at its position in the list."""
    shapes = [(4,), (4,), (2, 2)]
    params = [np.zeros(s, np.float32) for s in shapes]
    opt = ShardedOptimizer("sgd", params, COMM, lr=1.0)
    for view, value in zip(opt.grads, (1.0, 2.0, 3.0)):
        view[...] = value
    order = [1, 2, 0]
    opt.step([opt.grads[j].reshape(shapes[i]) for i, j in enumerate(order)])
    for p, j in zip(params, order):
        assert (p == -(j + 1.0)).all()



@pytest.mark.parametrize("bad", [
    {"lr": -1.0}, {"lr": 1e-3, "foo": 1}, {"lr": 1e-3, "bucket_bytes": 0}, {"lr": 1e-3, "name": "adma"},
    {"lr": 1e-3, "params": [np.zeros(3, np.int64)]}, {"lr": 1e-3, "params": []},
])
def test_bad_arguments_on_one_rank_raise_on_every_rank(bad):
    """A check failing on one rank only (its own error raised before any collective) left the other ranks
    waiting in the construction's all-reduce for ever (here: until the test barrier's timeout); now the
    failure is counted in that all-reduce and every rank raises."""
    def rank_body(comm):
        kwargs = dict(bad) if comm.rank == 1 else {"lr": 1e-3}
        name = kwargs.pop("name", "adam")
        params = kwargs.pop("params", [np.ones(5, np.float32), np.ones(3, np.float64)])
        try:
            ShardedOptimizer(name, params, comm, **kwargs)
        except Exception as e:  # noqa: BLE001  (each rank's error is the result)
            return e
        return None

    errors = run_ranks(3, rank_body)
    assert all(isinstance(e, ValueError) and "failed the checks on 1 other rank(s)" in str(e)
               for e in (errors[0], errors[2]))
    assert errors[1] is not None and "other rank" not in str(errors[1])


def test_an_error_of_any_kind_in_one_ranks_step_checks_raises_on_every_rank():
    """step() caught only TypeError and ValueError from this rank's checks: any other error (here the lr
    schedule raising RuntimeError on one rank; on torch, a gradient NumPy cannot view) left that rank before
    the collectives and the others waited in them (here: until the test barrier's timeout)."""
    def rank_body(comm):
        def lr(count):
            if comm.rank == 1 and count == 1:
                raise RuntimeError("schedule failed")
            return 0.1
        p = [np.ones(5, np.float32)]
        opt = ShardedOptimizer("sgd", p, comm, lr=lr)
        opt.step([np.ones(5, np.float32)])
        try:
            opt.step([np.ones(5, np.float32)])
        except Exception as e:  # noqa: BLE001  (each rank's error is the result)
            return e, p[0].copy(), opt.steps
        return None, p[0].copy(), opt.steps

    results = run_ranks(2, rank_body)
    assert isinstance(results[1][0], RuntimeError) and "schedule failed" in str(results[1][0])
    assert isinstance(results[0][0], ValueError) and "failed the checks there" in str(results[0][0])
    assert all(np.array_equal(p, np.full(5, 0.9, np.float32)) and steps == 1 for _, p, steps in results)

@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
def test_an_lr_that_differs_between_ranks_is_refused_on_every_rank(clip):
    """A schedule that gives the ranks different lrs (ReduceLROnPlateau fed each rank's own loss) made each
    rank update its shard with its own lr, silently: half a param moved by 1.0, half by 0.5. Now every rank
    raises, nothing updated; with the same lr again the step runs (the lr travels in the step's all-reduce)."""
    def rank_body(comm):
        schedule = fastopt.schedules.ReduceLROnPlateau(1.0, patience=0, factor=0.5)
        p = [np.zeros(64, np.float32)]
        opt = ShardedOptimizer("sgd", p, comm, lr=schedule, clip_grad_norm=clip)
        schedule.update(1.0)
        schedule.update(0.5 if comm.rank == 0 else 2.0)  # only rank 1's own loss got worse: its lr halves
        try:
            opt.step([np.full(64, 1 / 64, np.float32)])
        except ValueError as e:
            error = e
        before = p[0].copy(), opt.steps
        schedule.load_state_dict(dict(schedule.state_dict(), lr=0.5))
        opt.step([np.full(64, 1 / 64, np.float32)])
        return error, before, p[0].copy()

    results = run_ranks(3, rank_body)
    for rank, (error, (p, steps), after) in enumerate(results):
        assert "the learning rate differs between the ranks" in str(error) and f"rank {rank}," in str(error)
        assert not p.any() and steps == 0
        np.testing.assert_array_equal(after, np.full(64, -0.5 / 64, np.float32))


def test_equal_arguments_of_other_types_or_processes_are_the_same_configuration():
    """The configuration digest compared across ranks held reprs: np.float64(0.01) on one rank and 0.01 on
    another, or a schedule wrapping a function (its repr holds the function's address, different in each
    process), were refused as "hyperparameters differ" though equal."""
    def rank_body(comm):
        def decay(count):  # a new function object on each rank: another address, as in another process
            return 0.01 * 0.99 ** count

        p = [np.ones(10, np.float32)]
        first = ShardedOptimizer("adam", p, comm, lr=np.float64(0.01) if comm.rank else 0.01,
                                 betas=(np.float64(0.9), np.float64(0.999)) if comm.rank else (0.9, 0.999))
        second = ShardedOptimizer("adam", [np.ones(10, np.float32)], comm, lr=fastopt.schedules.warmup(decay, 5))
        return repr(decay), first.steps, second.steps

    results = run_ranks(2, rank_body)
    assert results[0][0] != results[1][0] and [r[1:] for r in results] == [(0, 0), (0, 0)]


def test_bad_grads_leave_everything_unchanged():
    params = _params()
    opt = ShardedOptimizer("adam", params, COMM, lr=1e-3)
    opt.step([np.ones_like(p) for p in params])
    before = [p.copy() for p in params]
    states = [{k: v.copy() for k, v in s.items()} for s in opt.shard_states()]
    for grads, exc in [([np.ones_like(p) for p in params[:2]], ValueError),
                       ([np.ones_like(params[0]), np.ones(16, np.float32), np.ones(1, np.float32)], ValueError),
                       ([np.ones_like(params[0], dtype=np.float64), np.ones(17, np.float32), np.ones(1, np.float32)],
                        TypeError),
                       ([np.ones_like(params[0]), None, np.ones(1, np.float32)], TypeError),
                       ("grads", TypeError)]:
        with pytest.raises(exc):
            opt.step(grads)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(params, before))
        assert all(np.array_equal(v, states[i][k]) for i, s in enumerate(opt.shard_states()) for k, v in s.items())
        assert opt.steps == 1


def test_every_registry_optimizer_is_sharded_or_rejected_with_a_reason():
    for spec in REGISTRY.values():
        reason = unsupported_reason(spec)
        if reason is None:
            ShardedOptimizer(spec.name, _params(), COMM, lr=0.01)
        else:
            with pytest.raises(ValueError, match="does not support"):
                ShardedOptimizer(spec.name, _params(), COMM, lr=0.01)
    assert unsupported_reason(REGISTRY["lamb"]) is None and unsupported_reason(REGISTRY["adam"]) is None
    # a two-phase family without separate passes would be refused (every registry optimizer has them now)
    assert "two-phase" in unsupported_reason(dataclasses.replace(REGISTRY["lamb"], name="lamb_without_passes"))


def test_grads_views_skip_the_copy_and_give_the_same_result():
    params, other = _params(4), _params(4)
    opt = ShardedOptimizer("adamw", params, COMM, lr=1e-2)
    viewed = ShardedOptimizer("adamw", other, COMM, lr=1e-2)
    for t in range(3):
        g = [np.full_like(p, 0.5 * t - 0.25) for p in params]
        for view, gi in zip(viewed.grads, g):
            view[...] = gi
        opt.step(g)
        viewed.step(viewed.grads)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, other))
    assert all(v.shape == p.shape for v, p in zip(viewed.grads, params))


def test_schedule_params_views_and_copy_params():
    params = _params(1)
    opt = ShardedOptimizer("sgd", params, COMM, lr=fastopt.schedules.step_decay(0.1, 2, 0.5), momentum=0.9,
                           copy_params=False)
    ref = [p.copy() for p in params]
    single = fastopt.SGD(ref, lr=fastopt.schedules.step_decay(0.1, 2, 0.5), momentum=0.9)
    before = [p.copy() for p in params]
    for t in range(5):
        g = [np.full_like(p, 0.25 * (t + 1)) for p in params]
        opt.step(g)
        single.step(g)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, before))  # copy_params=False: untouched
    assert all(a.tobytes() == b.tobytes() for a, b in zip(opt.params, ref))


def _trained(tmp_path, steps=3, **kw):
    params = _params(2, np.float64)
    opt = ShardedOptimizer("adam", params, COMM, lr=1e-2, amsgrad=True, **kw)
    for t in range(steps):
        opt.step([np.full_like(p, 0.5 - t) for p in params])
    path = str(tmp_path / "ck")
    opt.save(path)
    return opt, params, path


def test_checkpoint_files_and_round_trips(tmp_path):
    opt, params, path = _trained(tmp_path)
    m, layout, spec = read_manifest(path)
    assert m["optimizer"] == "adam" and m["steps"] == 3 and m["states"] == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
    opt.save(path)  # a second save replaces the files, the old ones are removed after the commit
    assert len([n for n in os.listdir(path) if n.endswith(".npz")]) == 1
    # gather -> the single-process class; scatter back for 3 ranks -> same arrays
    gathered = str(tmp_path / "one.npz")
    gather(path, gathered)
    single = fastopt.Adam([np.zeros_like(p) for p in params], lr=1e-2, amsgrad=True)
    fastopt.load(gathered, single)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(single.params, params))
    scatter(gathered, str(tmp_path / "three"), 3, bucket_bytes=64)
    m3, layout3, _ = read_manifest(str(tmp_path / "three"))
    assert m3["world_size"] == 3 and len(layout3.buckets) > 1
    fresh = [np.zeros_like(p) for p in params]
    again = ShardedOptimizer("adam", fresh, COMM, lr=1e-2, amsgrad=True)
    again.load(str(tmp_path / "three"))
    assert again.steps == 3 and all(a.tobytes() == b.tobytes() for a, b in zip(fresh, params))
    g = [np.full_like(p, 0.125) for p in params]
    opt.step(g)
    again.step(g)
    single.step(g)
    assert all(a.tobytes() == b.tobytes() == c.tobytes() for a, b, c in zip(fresh, params, single.params))


def _plateau_run(params, comm, steps=4):
    """A sharded SGD whose ReduceLROnPlateau has cut its lr twice (the losses rise), and its schedule."""
    schedule = fastopt.schedules.ReduceLROnPlateau(0.1, patience=0, factor=0.1)
    opt = ShardedOptimizer("sgd", params, comm, lr=schedule, momentum=0.9)
    for t in range(steps):
        opt.step([np.full_like(p, 0.25 * (t + 1)) for p in params])
        schedule.update(float(t))
    return opt, schedule


def test_a_stateful_schedule_is_restored_by_load_gather_and_scatter(tmp_path):
    """The sharded checkpoint keeps the lr schedule's own state (ReduceLROnPlateau's reduced lr, best metric,
    counters), as fastopt.save does: a load restores it into the loading optimizer's schedule; gather() writes
    it into the ordinary checkpoint and scatter() back; a saved state that does not fit changes nothing."""
    params = _params(3, np.float64)
    opt, schedule = _plateau_run(params, COMM)
    assert schedule.lr < 0.1 / 50
    path = str(tmp_path / "ck")
    opt.save(path)
    g = [np.full_like(p, 0.375) for p in params]

    def fresh_sharded(where):
        fresh = ShardedOptimizer("sgd", [np.zeros_like(p) for p in params], COMM,
                                 lr=fastopt.schedules.ReduceLROnPlateau(0.1, patience=0, factor=0.1), momentum=0.9)
        fresh.load(where)
        return fresh
    again = fresh_sharded(path)
    assert again.hyperparameters["lr"].state_dict() == schedule.state_dict()
    assert again.lr_for_next_step() == opt.lr_for_next_step() == schedule.lr
    gathered = str(tmp_path / "one.npz")
    gather(path, gathered)
    single_schedule = fastopt.schedules.ReduceLROnPlateau(0.1, patience=0, factor=0.1)
    single = fastopt.SGD([np.zeros_like(p) for p in params], lr=single_schedule, momentum=0.9)
    fastopt.load(gathered, single)
    assert single_schedule.state_dict() == schedule.state_dict()
    scatter(gathered, str(tmp_path / "two"), 2, bucket_bytes=64)
    scattered = fresh_sharded(str(tmp_path / "two"))
    assert scattered.hyperparameters["lr"].state_dict() == schedule.state_dict()
    for o in (opt, again, scattered):
        o.step(g)
    single.step(g)
    assert all(a.tobytes() == b.tobytes() == c.tobytes() == d.tobytes()
               for a, b, c, d in zip(opt.params, again.params, scattered.params, single.params))

    manifest = os.path.join(path, "manifest.json")
    m = json.load(open(manifest))
    m["lr_schedule_state"]["lr"] = -1.0
    json.dump(m, open(manifest, "w"))
    target_schedule = fastopt.schedules.ReduceLROnPlateau(0.1, patience=0, factor=0.1)
    target = [p + 1 for p in params]
    opt2 = ShardedOptimizer("sgd", target, COMM, lr=target_schedule, momentum=0.9)
    before, schedule_before = [p.copy() for p in target], target_schedule.state_dict()
    with pytest.raises(CheckpointError, match="the saved state of its lr schedule does not fit"):
        opt2.load(path)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(target, before)) and opt2.steps == 0
    assert target_schedule.state_dict() == schedule_before


@pytest.mark.parametrize("odd", ["not JSON", "raises on rank 0", "raises on rank 1"])
def test_a_schedule_state_that_cannot_be_saved_fails_the_save_on_every_rank(tmp_path, odd):
    """A schedule whose state_dict() JSON cannot hold, or which raises: rank 0 (the one that reads it and writes
    the manifest) reports it, the other ranks say rank 0 could not write the manifest (none waits for it
    forever), and no manifest is committed; the other ranks' schedules are not read at all."""
    class Odd(fastopt.schedules.constant):
        rank = None

        def state_dict(self):
            if odd == "not JSON":
                return {"when": object()}
            if odd == f"raises on rank {self.rank}":
                raise RuntimeError("no state here")
            return {}

    def body(comm):
        schedule = Odd(0.1)
        schedule.rank = comm.rank
        opt = ShardedOptimizer("sgd", _params(), comm, lr=schedule)
        opt.step([np.ones_like(p) for p in _params()])
        try:
            opt.save(str(tmp_path / "ck"))
        except Exception as e:  # noqa: BLE001 - compared below
            return e
    errors = run_ranks(2, body)
    if odd == "raises on rank 1":
        assert errors == [None, None] and os.path.exists(tmp_path / "ck" / "manifest.json")
        return
    assert isinstance(errors[0], TypeError if odd == "not JSON" else RuntimeError), errors[0]
    assert isinstance(errors[1], OSError) and "rank 0 could not write the manifest" in str(errors[1])
    assert not os.path.exists(tmp_path / "ck" / "manifest.json")


@pytest.mark.parametrize("entry", [{"repr": 5, "state": None}, {"state": {"lr": 0.1}}, ["cosine"]])
def test_scatter_refuses_a_bad_schedule_entry_before_writing_anything(tmp_path, monkeypatch, entry):
    """The file's record of its lr schedule is checked before the first shard file is written: a repr that is
    not a string, a state without its repr (which read_manifest would refuse), an entry that is no dict."""
    opt = fastopt.SGD(_params(), lr=fastopt.schedules.ReduceLROnPlateau(0.1))
    opt.step([np.ones_like(p) for p in _params()])
    saved = opt.state_dict

    def patched():
        sd = saved()
        sd["fastopt"]["lr_schedules"] = [entry]
        return sd
    monkeypatch.setattr(opt, "state_dict", patched)
    fastopt.save(str(tmp_path / "one.npz"), opt)
    with pytest.raises(CheckpointError, match=r"lr_schedules\[0\]"):
        scatter(str(tmp_path / "one.npz"), str(tmp_path / "two"), 2)
    assert not (tmp_path / "two").exists() or not os.listdir(tmp_path / "two")


def _flip(path, name, offset=200):
    data = bytearray(open(name, "rb").read())
    data[offset] ^= 1
    open(name, "wb").write(bytes(data))


@pytest.mark.parametrize("damage,text", [
    ("flip", "checksum"),
    ("manifest", "corrupted"),
    ("no manifest", "no manifest.json"),
    ("optimizer", "holds a adamw checkpoint"),
    ("shape", "are not this optimizer's"),
    ("hyper", "Invalid learning rate"),
    ("states", "state names"),
    ("files", "file list"),
    ("huge shape", "invalid param shapes"),  # was a bare OverflowError from the layout
])
def test_damaged_checkpoints_change_nothing(tmp_path, damage, text):
    opt, params, path = _trained(tmp_path)
    manifest = os.path.join(path, "manifest.json")
    m = json.load(open(manifest))
    if damage == "flip":
        _flip(path, os.path.join(path, m["files"][0]["name"]))
    elif damage == "manifest":
        open(manifest, "w").write(open(manifest).read()[:-10])
    elif damage == "no manifest":
        os.unlink(manifest)
    else:
        if damage == "optimizer":
            m["optimizer"] = "adamw"
            m["hyperparameters"] = dict(REGISTRY["adamw"].defaults, lr=0.01, amsgrad=True)
        elif damage == "shape":
            m["params"][1]["shape"] = [16]
            m["buckets"] = ShardLayout.build([p["shape"] for p in m["params"]], [p["dtype"] for p in m["params"]], 1,
                                             m["bucket_bytes"]).describe()
        elif damage == "hyper":
            m["hyperparameters"]["lr"] = -1
        elif damage == "states":
            m["states"] = ["exp_avg"]
        elif damage == "files":
            m["files"] = m["files"] * 2
        elif damage == "huge shape":
            m["params"][0]["shape"][0] = 10 ** 20
        json.dump(m, open(manifest, "w"))
    target = [p + 1 for p in params]
    opt2 = ShardedOptimizer("adam", target, COMM, lr=1e-2, amsgrad=True)
    before = [p.copy() for p in target]
    with pytest.raises(CheckpointError) as info:
        opt2.load(path)
    assert text in str(info.value)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(target, before)) and opt2.steps == 0
    assert all(not v.any() for s in opt2.shard_states() for v in s.values())


def test_import_needs_neither_torch_nor_mpi():
    code = ("import sys, fastopt.distributed; "
            "print(sorted(m for m in ('torch', 'mpi4py', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_save_needs_the_parent_directory(tmp_path):
    opt = ShardedOptimizer("adam", _params(), COMM, lr=1e-3)
    with pytest.raises(FileNotFoundError):
        opt.save(str(tmp_path / "missing" / "ck"))
    assert not (tmp_path / "missing").exists()
