"""Schedule-free SGD and AdamW (Defazio et al. 2024) against the published implementation, the `schedulefree`
package 1.4.1 (SGDScheduleFree, AdamWScheduleFree; installed --no-deps by `make test`).

Documented differences (fastopt/specs.py, fastopt/train_eval.py):
  - fastopt's optimizers start in train mode (the package starts in eval mode and needs train() first; before
    the first step y == z, so its first train() moves nothing);
  - the functional API and the NumPy classes weight the average as for a constant lr (ckp1 does not depend on
    lr); fastopt.torch carries lr_max and weight_sum per param like the package (per group there), so a
    changing lr matches the package through fastopt.torch;
  - the carried lr_max / weight_sum are float64 0-d tensors (the package's Python floats; they were float32,
    torch's scalar dtype, 1.5e-8 off the package after 4 float64 steps).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

import fastopt
from fastopt import reference
from fastopt.specs import REGISTRY, schedule_free_host, schedule_free_weight_sum

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")
import fastopt.torch as ft  # noqa: E402

SHAPES = [(7, 5), (1,), (0,), (33,)]
NAMES = ["schedule_free_sgd", "schedule_free_adamw"]
PACKAGE = {"schedule_free_sgd": schedulefree.SGDScheduleFree, "schedule_free_adamw": schedulefree.AdamWScheduleFree}
# warmup_steps, r, weight_lr_power, weight_decay
CONFIGS = [(0, 0.0, 2.0, 0.0), (5, 0.0, 2.0, 0.05), (10, 1.5, 2.0, 0.0), (3, 0.5, 0.0, 0.1), (0, 2.0, 1.0, 0.01)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-11, atol=1e-12)}


@pytest.fixture
def default_dtype():
    """Set torch's default dtype for a test (fastopt.torch keeps its carried scalars in it), restored after."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


def _hp(name, config, lr):
    warmup, r, power, wd = config
    kw = dict(lr=lr, warmup_steps=warmup, r=r, weight_lr_power=power, weight_decay=wd)
    if name == "schedule_free_sgd":
        kw["momentum"] = 0.8
    else:
        kw["betas"] = (0.85, 0.995)
        kw["eps"] = 1e-6
    return kw


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(steps)]


def _close(got, want, dtype):
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float64), b.detach().double().numpy(), **TOL[dtype])


def _package(name, params, kw):
    opt = PACKAGE[name](params, **kw)
    opt.train()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "w{}-r{}-p{}-wd{}".format(*c))
@pytest.mark.parametrize("name", NAMES)
def test_torch_class_matches_the_package_over_50_steps_and_the_switch(name, config, dtype):
    # (torch's default dtype stays float32: the carried weights are float64 anyway, as the package's floats)
    lr = 0.5 if name == "schedule_free_sgd" else 0.01
    kw = _hp(name, config, lr)
    start = _params(dtype)
    ref = [p.clone() for p in start]
    ours = [p.clone() for p in start]
    ref_opt = _package(name, ref, kw)
    opt = getattr(ft, REGISTRY[name].class_name)(ours, **kw)
    for grads in _grads(start, 50):
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    _close(ours, ref, dtype)
    for p, q in zip(ours, ref):
        _close([opt.state[p]["z"]], [ref_opt.state[q]["z"]], dtype)
    # eval(): both at x; twice is once; train(): both back at y
    for _ in range(2):
        ref_opt.eval()
        opt.eval()
        assert not opt.train_mode
        _close(ours, ref, dtype)
    ref_opt.train()
    opt.train()
    _close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_class_with_a_changing_lr_matches_the_package(name, dtype):
    """lr_max and weight_sum carried like the package's: a warm-up then decay schedule (LambdaLR) and a manual
    change of a group's lr mid-run (under torch's float32 default dtype)."""
    kw = _hp(name, (3, 1.0, 2.0, 0.01), 0.3 if name == "schedule_free_sgd" else 0.02)
    start = _params(dtype)
    ref, ours = [p.clone() for p in start], [p.clone() for p in start]
    ref_opt = _package(name, [{"params": ref[:2]}, {"params": ref[2:], "lr": kw["lr"] / 3}], kw)
    opt = getattr(ft, REGISTRY[name].class_name)([{"params": ours[:2]}, {"params": ours[2:], "lr": kw["lr"] / 3}],
                                                 **kw)
    rule = lambda k: min(1.0, (k + 1) / 10) * 0.97 ** k  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, rule) for o in (ref_opt, opt)]
    for t, grads in enumerate(_grads(start, 50)):
        if t == 30:
            for o in (ref_opt, opt):
                o.param_groups[0]["lr"] *= 4.0  # a jump up: lr_max moves
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
        for s in scheds:
            s.step()
    _close(ours, ref, dtype)
    ref_opt.eval()
    opt.eval()
    _close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "w{}-r{}-p{}-wd{}".format(*c))
@pytest.mark.parametrize("name", NAMES)
def test_numpy_class_and_functional_api_match_the_package(name, config, dtype):
    """The NumPy classes and the functional API (constant lr: the closed form) against the package."""
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    lr = 0.5 if name == "schedule_free_sgd" else 0.01
    kw = _hp(name, config, lr)
    start = _params(tdtype)
    ref = [p.clone() for p in start]
    ref_opt = _package(name, ref, kw)
    arrays = [p.numpy().copy() for p in start]
    opt = getattr(fastopt, REGISTRY[name].class_name)([a.copy() for a in arrays], **kw)
    functional = [a.copy() for a in arrays]
    state = fastopt.init_state(name, functional)
    hp = dict(kw)
    if "betas" in hp:
        hp["beta1"], hp["beta2"] = hp.pop("betas")
    step_fn = getattr(fastopt, f"{name}_step")
    for t, grads in enumerate(_grads(start, 50), start=1):
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        ref_opt.step()
        host = [g.numpy() for g in grads]
        assert opt.step(host) is True
        step_fn(functional, host, **state, step=t, **hp)
    _close(opt.params, ref, tdtype)
    _close(functional, ref, tdtype)
    ref_opt.eval()
    opt.eval()
    _close(opt.params, ref, tdtype)
    ref_opt.train()
    opt.train()
    _close(opt.params, ref, tdtype)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_kernels_equal_the_reference_bit_for_bit(name):
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        params = [rng.standard_normal(n).astype(dtype) for n in (0, 1, 1037, 70001)]
        ref = [p.copy() for p in params]
        state = fastopt.init_state(name, params)
        ref_state = {k: [a.copy() for a in v] for k, v in state.items()}
        hp = dict(lr=0.05, weight_decay=0.01, warmup_steps=4, r=0.5, weight_lr_power=2.0, maximize=True)
        for t in range(1, 21):
            grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
            getattr(fastopt, f"{name}_step")(params, grads, **state, step=t, grad_scale=0.5, backend="cython", **hp)
            for i, (p, g) in enumerate(zip(ref, grads)):
                reference.STEPS[name](p, g, **{k: v[i] for k, v in ref_state.items()}, step=t, grad_scale=0.5, **hp)
        for a, b in zip(params, ref):
            np.testing.assert_array_equal(a, b)
        for k in state:
            for a, b in zip(state[k], ref_state[k]):
                np.testing.assert_array_equal(a, b)
        # eval/train lerp of the NumPy classes == the reference's torch.lerp, bit for bit (beta 0.5: the eval
        # weight 1 - 1/beta = -1 takes torch's other branch, |w| >= 0.5)
        for beta in (0.9, 0.5):
            kw = {"momentum": beta} if name == "schedule_free_sgd" else {"betas": (beta, 0.999)}
            opt = getattr(fastopt, REGISTRY[name].class_name)([p.copy() for p in params[1:]], lr=0.05, **kw)
            opt.step([rng.standard_normal(p.shape).astype(dtype) for p in params[1:]])
            before = [p.copy() for p in opt.params]
            zs = [opt.state_arrays(i)["z"] for i in range(len(before))]
            for switch, weight in ((opt.eval, 1.0 - 1.0 / beta), (opt.train, 1.0 - beta)):
                switch()
                for got, y, z in zip(opt.params, before, zs):
                    reference.schedule_free_switch(y, z, weight)
                    np.testing.assert_array_equal(got, y)


def test_z_starts_as_a_copy_of_the_param_in_every_front_end():
    p = np.arange(6, dtype=np.float32).reshape(2, 3)
    st = fastopt.init_state("schedule_free_adamw", [p, p[0]])
    np.testing.assert_array_equal(st["z"][0], p)
    np.testing.assert_array_equal(st["exp_avg_sq"][0], 0)
    assert st["z"][0] is not p and not np.shares_memory(st["z"][0], p)
    t = torch.arange(6.0).reshape(2, 3).t()  # not contiguous: z keeps the layout
    opt = ft.ScheduleFreeSGD([t], lr=0.0)
    t.grad = torch.ones_like(t)
    opt.step()
    z = opt.state[t]["z"]
    assert torch.equal(z, torch.arange(6.0).reshape(2, 3).t()) and z.stride() == t.stride()


@pytest.mark.parametrize("name", NAMES)
def test_step_in_eval_mode_raises_and_writes_nothing(name):
    p = np.ones(4)
    opt = getattr(fastopt, REGISTRY[name].class_name)([p], lr=0.1)
    opt.eval()  # before any step: nothing to move
    np.testing.assert_array_equal(opt.params[0], 1.0)
    with pytest.raises(RuntimeError, match="eval mode.*train\\(\\)"):
        opt.step([np.ones(4)])
    np.testing.assert_array_equal(opt.params[0], 1.0)
    assert opt.steps() == 0
    opt.train()
    assert opt.step([np.ones(4)]) is True
    tp = torch.ones(4)
    topt = getattr(ft, REGISTRY[name].class_name)([tp], lr=0.1)
    topt.eval()
    tp.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="eval mode"):
        topt.step()
    assert torch.equal(tp, torch.ones(4)) and not topt.state[tp]


@pytest.mark.parametrize("to_eval", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_a_switch_that_fails_on_a_later_group_moves_nothing(name, to_eval):
    """eval()/train() check every group's and dtype's params before the first moves: a read-only param in a
    later group (or the float64 bucket of a group) raised after the earlier ones had moved, the mode unchanged,
    so fixing it and switching again moved them twice."""
    rng = np.random.default_rng(7)
    cls = getattr(fastopt, REGISTRY[name].class_name)

    ps = [rng.standard_normal(s).astype(d) for s, d in [((4, 3), np.float32), ((5,), np.float64), ((3,), np.float32)]]
    twin_ps = [p.copy() for p in ps]
    opt = cls([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1)
    twin = cls([{"params": twin_ps[:2]}, {"params": twin_ps[2:]}], lr=0.1)
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in ps]
        opt.step(grads)
        twin.step([g.copy() for g in grads])
    if not to_eval:
        opt.eval()
        twin.eval()
    for bad in (1, 2):  # the float64 bucket of group 0, then group 1
        before = [p.tobytes() for p in ps]
        state = opt.state_dict()
        ps[bad].setflags(write=False)
        with pytest.raises(ValueError, match=f"params\\[{bad}\\] is read-only"):
            opt.eval() if to_eval else opt.train()
        ps[bad].setflags(write=True)
        assert [p.tobytes() for p in ps] == before and opt.train_mode is to_eval
        after = opt.state_dict()
        assert [(k, v.tobytes()) for k, v in sorted(after["state"][0].items()) if isinstance(v, np.ndarray)] == \
            [(k, v.tobytes()) for k, v in sorted(state["state"][0].items()) if isinstance(v, np.ndarray)]
    opt.eval() if to_eval else opt.train()
    twin.eval() if to_eval else twin.train()
    assert opt.train_mode is twin.train_mode is (not to_eval)
    assert [p.tobytes() for p in ps] == [p.tobytes() for p in twin_ps]


BAD = [("momentum", 1.0, ValueError), ("momentum", 0.0, ValueError), ("beta1", 0.0, ValueError),
       ("warmup_steps", 2.5, ValueError), ("warmup_steps", -1, ValueError), ("r", -0.5, ValueError),
       ("weight_lr_power", float("nan"), ValueError), ("weight_decay", -1.0, ValueError), ("lr", -1.0, ValueError),
       ("r", 16.5, ValueError), ("r", "1", TypeError), ("warmup_steps", True, TypeError)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg, value, error", BAD, ids=[f"{a}={v!r}" for a, v, _ in BAD])
def test_bad_hyperparameters_raise_naming_them_and_write_nothing(name, arg, value, error):
    spec = REGISTRY[name]
    if arg not in spec.defaults:
        pytest.skip(f"{name} has no {arg}")
    p = np.linspace(-1, 1, 5)
    state = fastopt.init_state(name, p)
    before = [p.copy()] + [a.copy() for a in state.values()]
    with pytest.raises(error, match=arg if arg != "lr" else "learning rate"):
        getattr(fastopt, spec.function_name)(p, np.ones(5), **state, step=1, **{arg: value})
    for a, b in zip([p, *state.values()], before):
        np.testing.assert_array_equal(a, b)
    kw = {"betas": (value, 0.999)} if arg == "beta1" else {arg: value}
    with pytest.raises(error, match=arg if arg != "lr" else "learning rate"):
        getattr(fastopt, spec.class_name)([p], **kw)
    with pytest.raises(error):
        getattr(ft, spec.class_name)([torch.zeros(3)], **kw)


def test_the_closed_form_weight_sum_and_huge_steps():
    """The running sums past the cached prefix (Euler-Maclaurin) equal a direct sum; a step of 2**53 takes
    O(1) time; ckp1 then behaves like (r + 1) / t."""
    for warmup, r, power, t in [(0, 0.0, 2.0, 9000), (10, 1.0, 2.0, 20000), (6000, 0.5, 2.0, 10000),
                                (100, 2.5, 0.0, 5000)]:
        exact = math.fsum((i ** r) * ((i / warmup if i - 1 < warmup else 1.0) ** power) for i in range(1, t + 1))
        assert schedule_free_weight_sum(warmup, r, power, t) == pytest.approx(exact, rel=1e-13)
    start = time.perf_counter()
    for r in (0.0, 1.0, 16.0):  # r <= 16: nothing overflows up to step 2**53
        ckp1, lr_t = schedule_free_host({"lr": 0.1, "warmup_steps": 50.0, "r": r, "weight_lr_power": 2.0}, 2 ** 53)
        assert lr_t == 0.1 and ckp1 == pytest.approx((r + 1) / 2 ** 53, rel=1e-9)
    # fastopt.torch's carried path: a huge lr's powers are inf, ckp1 is then 1 (never an exception mid-step)
    hp = {"lr": 1e308, "warmup_steps": 0.0, "r": 16.0, "weight_lr_power": 2.0, "lr_max": 1e308, "weight_sum": 0.0}
    assert schedule_free_host(hp, 5) == (1.0, 1e308)
    assert time.perf_counter() - start < 0.5
    p = np.ones(3)
    fastopt.schedule_free_adamw_step(p, np.ones(3), **fastopt.init_state("schedule_free_adamw", p), step=2 ** 53)
    assert np.isfinite(p).all()
    # lr = 0: every weight is 0 and the package's 0 / 0 is 0 (the params do not move)
    assert schedule_free_host({"lr": 0.0, "warmup_steps": 0.0, "r": 0.0, "weight_lr_power": 2.0}, 3) == (0.0, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_torch_state_dict_round_trip_keeps_the_carried_weights(name, default_dtype):
    """lr_max and weight_sum travel in the state dict: a run resumed from it equals the uninterrupted one."""
    default_dtype(torch.float64)
    kw = _hp(name, (5, 1.0, 2.0, 0.01), 0.05)
    start = _params(torch.float64)
    steps = _grads(start, 30)
    cls = getattr(ft, REGISTRY[name].class_name)
    whole = [p.clone() for p in start]
    o1 = cls(whole, **kw)
    first = [p.clone() for p in start]
    o2 = cls(first, **kw)
    for t, grads in enumerate(steps):
        for p, g in zip(whole, grads):
            p.grad = g.clone()
        o1.step()
        if t < 12:
            for p, g in zip(first, grads):
                p.grad = g.clone()
            o2.step()
    assert set(o2.state_dict()["state"][0]) >= {"z", "lr_max", "weight_sum", "step"}
    resumed = [p.detach().clone() for p in first]
    o3 = cls(resumed, **kw)
    o3.load_state_dict(o2.state_dict())
    for grads in steps[12:]:
        for p, g in zip(resumed, grads):
            p.grad = g.clone()
        o3.step()
    for a, b in zip(resumed, whole):
        assert torch.equal(a, b)


def _numpy_grads(shapes, steps, seed):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("how", ["file", "state_dict"])
@pytest.mark.parametrize("name", NAMES)
def test_numpy_class_saved_in_eval_mode_resumes_after_train(name, how, tmp_path):
    """The package's advice: save in eval mode (the params hold x), load, train() (back to y), go on. The mode is
    restored with the state, so a fresh optimizer (in train mode) loaded from it moves back at train(); it used
    to stay in train mode and train on from x (max error 0.006 after 5 more steps)."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    kw = _hp(name, (3, 1.0, 2.0, 0.01), 0.05)
    kw.pop("betas", None)
    cls = getattr(fastopt, REGISTRY[name].class_name)
    start = [np.random.default_rng(seed).standard_normal(s) for s in SHAPES]
    steps = _numpy_grads(SHAPES, 12, seed + 1)
    whole = [p.copy() for p in start]
    o1 = cls(whole, **kw)
    for t, grads in enumerate(steps):
        o1.step(grads)
        if t == 5:
            o1.eval(), o1.train()
    o1.eval()
    part = [p.copy() for p in start]
    o2 = cls(part, **kw)
    for grads in steps[:6]:
        o2.step(grads)
    o2.eval()
    resumed = [np.zeros_like(p) for p in start]
    o3 = cls(resumed, **kw)
    if how == "file":
        fastopt.save(tmp_path / "sf.npz", o2)
        fastopt.load(tmp_path / "sf.npz", o3)
    else:
        sd = o2.state_dict()
        assert sd["fastopt"]["train_mode"] is False
        o3.load_state_dict(sd)
        for a, b in zip(resumed, part):
            a[...] = b
    assert not o3.train_mode
    o3.train()
    for grads in steps[6:]:
        o3.step(grads)
    o3.eval()
    for a, b in zip(resumed, whole):
        assert a.tobytes() == b.tobytes()


def test_a_bad_or_misplaced_train_mode_is_refused_and_changes_nothing():
    p = [np.ones(4)]
    opt = fastopt.ScheduleFreeAdamW(p, lr=0.1)
    opt.step([np.ones(4)])
    sd = opt.state_dict()
    before = (p[0].tobytes(), opt.state_arrays(0)["z"].tobytes())
    for value in ("no", 1, None):
        bad = dict(sd, fastopt=dict(sd["fastopt"], train_mode=value))
        if value is None:  # an older state dict: no mode recorded, the current one is kept
            bad["fastopt"].pop("train_mode")
            opt.eval()
            opt.load_state_dict(bad)
            assert not opt.train_mode
            opt.train()
            opt.load_state_dict(sd)
            continue
        with pytest.raises(ValueError, match="'train_mode' must be a bool"):
            opt.load_state_dict(bad)
        assert opt.train_mode and (p[0].tobytes(), opt.state_arrays(0)["z"].tobytes()) == before
    adam = fastopt.Adam([np.ones(4)], lr=0.1)
    adam_sd = adam.state_dict()
    adam_sd["fastopt"]["train_mode"] = False
    with pytest.raises(ValueError, match="'train_mode' is for schedule-free optimizers"):
        adam.load_state_dict(adam_sd)


@pytest.mark.parametrize("name", NAMES)
def test_torch_class_saved_in_eval_mode_resumes_after_train_as_the_package(name, default_dtype, tmp_path):
    """fastopt.torch keeps the mode in each param group ("train_mode"), as the package does: torch.save of a state
    dict taken in eval mode, torch.load (weights_only), load_state_dict into a fresh optimizer, train(), more
    steps: equal to the uninterrupted run and to the package doing the same."""
    default_dtype(torch.float64)
    kw = _hp(name, (3, 1.0, 2.0, 0.01), 0.05)
    start = _params(torch.float64, seed=int(torch.seed() % 2**31))
    steps = _grads(start, 12)
    cls = getattr(ft, REGISTRY[name].class_name)
    runs = {}
    for front, make in (("fastopt", lambda ps: cls(ps, **kw)), ("package", lambda ps: _package(name, ps, kw))):
        params = [p.clone() for p in start]
        opt = make(params)
        for grads in steps[:6]:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        opt.eval()
        torch.save(opt.state_dict(), tmp_path / f"{front}.pt")
        saved = torch.load(tmp_path / f"{front}.pt", weights_only=True)
        assert all(group["train_mode"] is False for group in saved["param_groups"])
        resumed = [p.detach().clone() for p in params]
        again = make(resumed)
        again.load_state_dict(saved)
        assert not again.train_mode if front == "fastopt" else True
        again.train()
        for grads in steps[6:]:
            for p, g in zip(resumed, grads):
                p.grad = g.clone()
            again.step()
        again.eval()
        runs[front] = resumed
    whole = [p.clone() for p in start]  # one optimizer with the same eval()/train() round trip after step 6 (the
    o1 = cls(whole, **kw)                # two lerps need not give y back bit for bit: without it, 1 ulp apart)
    for k, grads in enumerate(steps):
        if k == 6:
            o1.eval()
            o1.train()
        for p, g in zip(whole, grads):
            p.grad = g.clone()
        o1.step()
    o1.eval()
    for a, b in zip(runs["fastopt"], whole):
        assert torch.equal(a, b)
    _close(runs["fastopt"], runs["package"], torch.float64)


def test_torch_mode_per_group_and_bad_saved_modes():
    p, q = torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    opt = ft.ScheduleFreeAdamW([p], lr=0.1)
    assert opt.param_groups[0]["train_mode"] is True
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    opt.eval()
    opt.add_param_group({"params": [q]})  # a new group starts in train mode; step() needs every group in it
    assert [g["train_mode"] for g in opt.param_groups] == [False, True] and not opt.train_mode
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    assert opt.train_mode
    sd = opt.state_dict()
    before = p.clone()
    sd["param_groups"][1]["train_mode"] = "yes"
    with pytest.raises(ValueError, match="param group 1: 'train_mode' must be a bool"):
        opt.load_state_dict(sd)
    assert torch.equal(p, before) and opt.train_mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_torch_class_resumes_with_its_float64_carried_weights(name, dtype):
    """torch's load_state_dict casts state to the param's dtype: the float64 lr_max / weight_sum became float32
    (float16) after a resume, and bfloat16 ones made the next step fail (NumPy has no bfloat16). They are kept
    as saved: a resumed run equals the uninterrupted one bit for bit."""
    import copy
    runs = []
    for resume in (False, True):
        gen = torch.Generator().manual_seed(11)
        p = torch.randn(6, generator=gen).to(dtype).requires_grad_()
        cls = getattr(ft, REGISTRY[name].class_name)
        opt = cls([p], lr=0.01)
        for k in range(8):
            p.grad = torch.randn(6, generator=gen).to(dtype)
            opt.param_groups[0]["lr"] = 0.01 / (1 + 0.37 * k)
            opt.step()
            if resume and k == 3:
                saved = copy.deepcopy(opt.state_dict())
                opt = cls([p], lr=0.01)
                opt.load_state_dict(saved)
                assert all(opt.state[p][k].dtype == torch.float64 for k in ("lr_max", "weight_sum"))
        runs.append((p.detach().clone(), {k: opt.state[p][k].item() for k in ("lr_max", "weight_sum")}))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
